"""Readers of a relay's kernel counters and CPU time in ``/proc``.

UDP counters of a network namespace (``net/snmp``), its UDP sockets (``net/udp{,6}``,
restricted to one process's sockets through ``/proc/<pid>/fd``), a process's CPU seconds
(``stat``), processes by command name (``comm``), and the host's steal time.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from turnstorm.errors import TurnstormError


def _proc(pid: int | None, *parts: str) -> str:
    return os.path.join("/proc", str(pid) if pid is not None else "self", *parts)


def parse_snmp_udp(text: str) -> dict[str, int]:
    """The ``Udp:`` header/value line pair of ``/proc/net/snmp`` as a dict."""
    rows = [line.split() for line in text.splitlines() if line.startswith("Udp:")]
    if len(rows) < 2:
        raise ValueError("no Udp: lines in snmp text")
    header, values = rows[0][1:], rows[1][1:]
    return {name: int(value) for name, value in zip(header, values, strict=False)}


def read_snmp_udp(pid: int | None = None) -> dict[str, int]:
    """UDP counters of ``pid``'s network namespace (our own when None)."""
    with open(_proc(pid, "net", "snmp"), encoding="ascii") as handle:
        return parse_snmp_udp(handle.read())


@dataclass(frozen=True)
class UdpSocket:
    local: str
    """``ADDR:PORT`` in the kernel's hex notation."""
    rx_queue: int
    tx_queue: int
    inode: int
    drops: int


def parse_proc_udp(text: str) -> list[UdpSocket]:
    """Rows of ``/proc/net/udp`` or ``udp6`` (queues are hex, drops decimal)."""
    sockets = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 13:
            continue
        tx, _, rx = cols[4].partition(":")
        sockets.append(UdpSocket(local=cols[1], tx_queue=int(tx, 16), rx_queue=int(rx, 16),
                                 inode=int(cols[9]), drops=int(cols[12])))
    return sockets


def socket_inodes(pid: int) -> set[int]:
    """Inodes of every socket ``pid`` holds open (from ``/proc/<pid>/fd``)."""
    inodes = set()
    fd_dir = _proc(pid, "fd")
    try:
        names = os.listdir(fd_dir)
    except OSError as exc:
        raise TurnstormError(f"cannot list {fd_dir}: {exc.strerror} (same user or root "
                             "needed)") from None
    for name in names:
        with contextlib.suppress(OSError):
            target = os.readlink(os.path.join(fd_dir, name))
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def read_udp_sockets(pid: int | None = None, *, own_only: bool = True) -> list[UdpSocket]:
    """UDP sockets (v4 and v6) of ``pid``'s network namespace; with ``own_only`` and a
    pid, only those the process holds."""
    sockets: list[UdpSocket] = []
    for name in ("udp", "udp6"):
        with contextlib.suppress(FileNotFoundError), \
                open(_proc(pid, "net", name), encoding="ascii") as handle:
            sockets += parse_proc_udp(handle.read())
    if pid is not None and own_only:
        inodes = socket_inodes(pid)
        sockets = [s for s in sockets if s.inode in inodes]
    return sockets


STAT_TIMES = (11, 12)
"""utime and stime (fields 14 and 15 of proc_pid_stat(5)): the 12th and 13th fields
after the command name."""
KERNEL_ULL_DIGITS = 20
"""The kernel writes those counters as unsigned 64-bit numbers."""


def _counter(field: str) -> int | None:
    if field.isascii() and field.isdigit() and len(field) <= KERNEL_ULL_DIGITS:
        return int(field)
    return None


def parse_stat_cpu_seconds(text: str, ticks: int) -> float | None:
    """utime+stime of a ``/proc/<pid>/stat`` line, in seconds; None (no data for this
    sample) for a line that is not what the kernel writes.

    The kernel writes ``PID (COMM) STATE PPID ...``: COMM, the command name, is the text
    between the first ``(`` and the last ``)``, and may hold spaces, parentheses and
    line breaks; the fields after it are numbers and the state letter."""
    pid, opening, rest = text.partition(" (")
    end = rest.rfind(")")
    if not (opening and pid.isascii() and pid.isdigit() and end >= 0 and ticks > 0):
        return None
    fields = rest[end + 1:].split()
    if len(fields) <= max(STAT_TIMES):
        return None
    utime, stime = (_counter(fields[i]) for i in STAT_TIMES)
    if utime is None or stime is None:
        return None
    return (utime + stime) / ticks


def _command_name(pid: int | str, proc: str = "/proc") -> str | None:
    """``/proc/<pid>/comm`` (world-readable), or None when the process is gone."""
    try:
        with open(os.path.join(proc, str(pid), "comm"), encoding="utf-8",
                  errors="replace") as handle:
            return handle.read().rstrip("\n")
    except OSError:
        return None


def find_process(name: str, proc: str = "/proc") -> list[int]:
    """Process ids whose command name (``/proc/<pid>/comm``, world-readable) is ``name``,
    this process excluded."""
    me = os.getpid()
    return sorted(int(entry) for entry in os.listdir(proc)
                  if entry.isdigit() and int(entry) != me
                  and _command_name(entry, proc) == name)


class ProcessFinder:
    """The relay process of a pod whose containers share one pid namespace, found by
    command name and found again when it restarts. Two or more of that name (a host
    pid namespace with several relays) is an error: pass ``--pid`` there."""

    def __init__(self, name: str, proc: str = "/proc") -> None:
        self.name = name
        self.proc = proc
        self.pid: int | None = None

    def resolve(self) -> int:
        if self.pid is not None:
            if _command_name(self.pid, self.proc) == self.name:
                return self.pid
            self.pid = None
        pids = find_process(self.name, self.proc)
        if not pids:
            raise TurnstormError(f"no process named {self.name!r} (the relay container "
                                 "must share the pod's process namespace)")
        if len(pids) > 1:
            raise TurnstormError(f"{len(pids)} processes named {self.name!r} "
                                 f"({', '.join(map(str, pids[:5]))}): pass --pid")
        self.pid = pids[0]
        return self.pid


def read_steal_seconds(cpu: int | None = None) -> float:
    """Seconds the hypervisor ran something else while ``cpu`` (all CPUs when None)
    wanted to run (/proc/stat; 0 where it is not counted)."""
    prefix = "cpu " if cpu is None else f"cpu{cpu} "
    with open("/proc/stat", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(prefix):
                fields = line.split()
                return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0
    return 0.0


def read_cpu_seconds(pid: int, proc: str = "/proc") -> float:
    """CPU seconds of process ``pid``: the thread group's total (all threads).
    :class:`TurnstormError` when the process is gone or its stat line cannot be read
    (the collector then reports no CPU for that sample)."""
    path = os.path.join(proc, str(pid), "stat")
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            text = handle.read()
    except OSError as exc:
        raise TurnstormError(f"process {pid}: {exc.strerror}") from None
    seconds = parse_stat_cpu_seconds(text, os.sysconf("SC_CLK_TCK"))
    if seconds is None:
        raise TurnstormError(f"process {pid}: no CPU times in {path} (not the kernel's "
                             "stat format)")
    return seconds

"""Relay exporter: live coturn and kernel signals as Prometheus metrics.

coturn's own traffic counters only move when a session ends (coturn#1340) and Debian's
coturn 4.6.1 has no Prometheus endpoint at all, so this exporter (``turnstorm exporter``,
a sidecar sharing the relay's network namespace, or in-process in local mode) reads:

* coturn's telnet admin CLI (``cli-port`` on 127.0.0.1, password protected): ``pc`` for
  ``total-current-allocs``, ``pu`` for sessions per user, ``ps`` for per-session usage
  (received/sent packets and bytes). ``ps`` lists at most ``cli-max-output-sessions``
  sessions (default 256): beyond that the relayed-traffic counters are partial, which
  ``turnstorm_relay_session_usage_truncated`` says;
* the kernel: ``/proc/<pid>/net/snmp`` UDP counters (whole network namespace) and, per
  socket, ``/proc/<pid>/net/udp{,6}`` receive-queue bytes and drops, restricted to the
  relay process's own sockets (its ``/proc/<pid>/fd`` links ``socket:[inode]``) when a
  pid is known, so relays sharing the host namespace (local mode) are told apart;
* ``/proc/<pid>/stat`` utime+stime (the thread-group total: every thread included), for
  a pid given, or for the process found by command name (``--process turnserver``: in a
  pod with ``shareProcessNamespace`` the sidecar sees the relay's process; found again
  after a restart; several of that name is an error, reported in place of the CPU).

Metrics are collected on scrape (a custom collector) and cached for ``cache_seconds`` so
several scrapers do not multiply the CLI load. Every metric has a ``relay`` label.

==============================================  =======  ===========================================
metric                                          type     meaning
==============================================  =======  ===========================================
turnstorm_relay_up                              gauge    1 when the coturn CLI answered this scrape
turnstorm_relay_allocations                     gauge    ``total-current-allocs`` (``pc``)
turnstorm_relay_sessions                        gauge    ``Total sessions`` (``pu``)
turnstorm_relay_users                           gauge    distinct usernames with sessions (``pu``)
turnstorm_relay_relayed_packets_total           counter  packets of listed sessions, label
                                                         ``direction`` = received|sent (``ps``)
turnstorm_relay_relayed_bytes_total             counter  bytes, same labels and source
turnstorm_relay_session_usage_truncated         gauge    1 when ``ps`` listed fewer sessions than
                                                         exist (cli-max-output-sessions)
turnstorm_relay_udp_in_datagrams_total          counter  Udp InDatagrams (netns)
turnstorm_relay_udp_in_errors_total             counter  Udp InErrors (netns)
turnstorm_relay_udp_rcvbuf_errors_total         counter  Udp RcvbufErrors (netns): receive buffer
                                                         full, datagram dropped
turnstorm_relay_udp_no_ports_total              counter  Udp NoPorts (netns)
turnstorm_relay_udp_out_datagrams_total         counter  Udp OutDatagrams (netns)
turnstorm_relay_udp_sndbuf_errors_total         counter  Udp SndbufErrors (netns)
turnstorm_relay_socket_drops_total              counter  sum of ``drops`` over the relay's UDP
                                                         sockets (all sockets without a pid)
turnstorm_relay_rx_queue_bytes                  gauge    sum of ``rx_queue`` over those sockets
turnstorm_relay_udp_sockets                     gauge    number of those sockets
turnstorm_relay_cpu_seconds_total               counter  relay process user+system CPU (with a pid
                                                         or ``--process``)
turnstorm_relay_scrape_duration_seconds         gauge    time the last collection took
==============================================  =======  ===========================================

The relayed counters are made monotonic by the exporter: it remembers each session's
last ``rp``/``sp``/``rb``/``sb`` by session id and adds only increments, so sessions that
end keep their contribution (traffic of sessions that start and end between two
scrapes, or that are not listed, is missed). Measured on coturn 4.6.1: a session's
``usage`` only takes in relayed ChannelData and Send/Data indications when the
allocation is *refreshed* (or ends), so these counters lag by up to one refresh interval
(clients refresh every few minutes). For a live packet rate use
``turnstorm_relay_udp_in_datagrams_total`` (the relay's network namespace, i.e. the pod)
and ``turnstorm_relay_cpu_seconds_total``.

:func:`scrape_signals` turns one exposition back into numbers and
:class:`SignalTracker` turns two of them into the per-second rates the policy uses.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from turnstorm.errors import TurnstormError

PROMPT = b"> "
PASSWORD_PROMPT = b"Enter password:"
DEFAULT_CACHE_SECONDS = 1.0
METRIC_PREFIX = "turnstorm_relay_"


class CoturnCliError(TurnstormError):
    """The coturn CLI cannot be reached, refused the password or answered nonsense."""


# -- coturn CLI -------------------------------------------------------------------------------


@dataclass
class SessionUsage:
    """Usage of the sessions ``ps`` listed."""

    listed: int = 0
    """Sessions in the listing."""
    total: int = 0
    """``Total sessions`` line (all sessions, listed or not)."""
    received_packets: int = 0
    received_bytes: int = 0
    sent_packets: int = 0
    sent_bytes: int = 0
    per_session: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    """session id -> (rp, rb, sp, sb)."""

    @property
    def truncated(self) -> bool:
        """``ps`` stops at ``cli-max-output-sessions`` (256 by default)."""
        return self.listed < self.total


_ALLOCS = re.compile(r"^\s*total-current-allocs:\s*(\d+)\s*$", re.M)
_USER = re.compile(r"^\s*user:\s*<(.*)>,\s*(\d+)\s+sessions?\s*$", re.M)
_TOTAL_SESSIONS = re.compile(r"^\s*Total sessions:\s*(\d+)\s*$", re.M)
_SESSION = re.compile(r"^\s*\d+\)\s*id=(\S+?),", re.M)
_USAGE = re.compile(r"^\s*usage:\s*rp=(\d+),\s*rb=(\d+),\s*sp=(\d+),\s*sb=(\d+)", re.M)


def parse_total_allocations(text: str) -> int:
    """``total-current-allocs`` from ``pc`` output."""
    match = _ALLOCS.search(text)
    if match is None:
        raise CoturnCliError("coturn CLI 'pc' output has no total-current-allocs line")
    return int(match.group(1))


def parse_users(text: str) -> tuple[dict[str, int], int]:
    """(sessions per username, total sessions) from ``pu`` output."""
    users: dict[str, int] = {}
    for name, count in _USER.findall(text):
        users[name] = users.get(name, 0) + int(count)
    total = _TOTAL_SESSIONS.search(text)
    if total is None:
        raise CoturnCliError("coturn CLI 'pu' output has no 'Total sessions' line")
    return users, int(total.group(1))


def parse_sessions(text: str) -> SessionUsage:
    """Per-session usage from ``ps`` output (blocks of ``N) id=...`` and ``usage:``)."""
    total = _TOTAL_SESSIONS.search(text)
    if total is None:
        raise CoturnCliError("coturn CLI 'ps' output has no 'Total sessions' line")
    usage = SessionUsage(total=int(total.group(1)))
    starts = list(_SESSION.finditer(text))
    for index, start in enumerate(starts):
        end = starts[index + 1].start() if index + 1 < len(starts) else len(text)
        block = text[start.end():end]
        usage.listed += 1
        found = _USAGE.search(block)
        if found is None:
            continue
        rp, rb, sp, sb = (int(v) for v in found.groups())
        usage.per_session[start.group(1)] = (rp, rb, sp, sb)
        usage.received_packets += rp
        usage.received_bytes += rb
        usage.sent_packets += sp
        usage.sent_bytes += sb
    return usage


class CoturnCli:
    """A blocking client for coturn's telnet admin CLI (one connection, reused).

    ``command()`` reconnects once when the connection was lost between calls. Not
    thread-safe: callers serialize (the collector holds a lock).
    """

    def __init__(self, host: str, port: int, password: str, timeout: float = 3.0) -> None:
        self.host = host
        self.port = port
        self.password = password
        self.timeout = timeout
        self._sock: socket.socket | None = None

    @property
    def where(self) -> str:
        return f"coturn CLI {self.host}:{self.port}"

    def _read_until(self, sock: socket.socket, done: Callable[[bytes], bool],
                    what: str) -> bytes:
        buffer = b""
        deadline = time.monotonic() + self.timeout
        while not done(buffer):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CoturnCliError(f"{self.where}: no {what} within {self.timeout:g} s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise CoturnCliError(
                    f"{self.where}: no {what} within {self.timeout:g} s") from None
            except OSError as exc:
                raise CoturnCliError(f"{self.where}: {exc.strerror or exc}") from None
            if not chunk:
                raise CoturnCliError(f"{self.where}: connection closed while waiting for "
                                     f"{what}")
            buffer += chunk
        return buffer

    @staticmethod
    def _at_prompt(buffer: bytes) -> bool:
        return buffer == PROMPT or buffer.endswith(b"\n" + PROMPT)

    def connect(self) -> None:
        self.close()
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except ConnectionRefusedError:
            raise CoturnCliError(f"{self.where}: connection refused (is coturn running "
                                 f"with cli-port={self.port} and without no-cli?)") from None
        except OSError as exc:
            raise CoturnCliError(f"{self.where}: {exc.strerror or exc}") from None
        try:
            greeting = self._read_until(
                sock, lambda b: PASSWORD_PROMPT in b or self._at_prompt(b), "greeting")
            if PASSWORD_PROMPT in greeting:
                sock.sendall(self.password.encode() + b"\r\n")
                answer = self._read_until(
                    sock, lambda b: PASSWORD_PROMPT in b or self._at_prompt(b),
                    "answer to the password")
                if PASSWORD_PROMPT in answer:
                    raise CoturnCliError(f"{self.where}: wrong CLI password")
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def command(self, line: str) -> str:
        """Run one CLI command; its output without the trailing prompt."""
        if "\n" in line or "\r" in line:
            raise ValueError("a CLI command is one line")
        for attempt in (1, 2):
            if self._sock is None:
                self.connect()
            assert self._sock is not None
            try:
                self._sock.sendall(line.encode() + b"\r\n")
                out = self._read_until(self._sock, self._at_prompt, f"answer to {line!r}")
            except (CoturnCliError, OSError):
                self.close()
                if attempt == 2:
                    raise
                continue
            return out[: -len(PROMPT)].decode("utf8", errors="replace").replace("\r\n", "\n")
        raise AssertionError("unreachable")  # pragma: no cover

    def total_allocations(self) -> int:
        return parse_total_allocations(self.command("pc"))

    def sessions_per_user(self) -> tuple[dict[str, int], int]:
        """(sessions per username, total sessions), from ``pu``."""
        return parse_users(self.command("pu"))

    def session_usage(self) -> SessionUsage:
        """Summed usage over ``ps`` (at most cli-max-output-sessions sessions)."""
        return parse_sessions(self.command("ps"))

    def add_alternate_server(self, address: str) -> None:
        """``aas``: new Allocate requests get 300 Try Alternate to ``address``."""
        self.command(f"aas {address}")

    def delete_alternate_server(self, address: str) -> None:
        self.command(f"das {address}")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def __enter__(self) -> CoturnCli:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- kernel readers ---------------------------------------------------------------------------


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


# -- collection -------------------------------------------------------------------------------


@dataclass
class RelaySnapshot:
    """Everything one collection found; None where a source was unavailable."""

    up: bool = False
    allocations: int | None = None
    sessions: int | None = None
    users: int | None = None
    usage: SessionUsage | None = None
    snmp: dict[str, int] | None = None
    sockets: list[UdpSocket] | None = None
    cpu_seconds: float | None = None
    duration: float = 0.0
    errors: list[str] = field(default_factory=list)


class RelayCollector:
    """Collects one relay on demand; a prometheus_client custom collector."""

    def __init__(
        self,
        relay: str,
        cli: CoturnCli | None,
        pid: int | None = None,
        *,
        cache_seconds: float = DEFAULT_CACHE_SECONDS,
        session_usage: bool = True,
        clock: Any = time.monotonic,
        process: str | None = None,
    ) -> None:
        self.relay = relay
        self.cli = cli
        self.pid = pid
        self.finder = ProcessFinder(process) if process is not None else None
        """With ``process`` (and no pid): the relay found by name for its CPU only (the
        socket counters are the pod's network namespace, all the relay's)."""
        self.cache_seconds = cache_seconds
        self.session_usage = session_usage
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, RelaySnapshot] | None = None
        self._last_usage: dict[str, tuple[int, int, int, int]] = {}
        self.relayed = [0, 0, 0, 0]
        """Monotonic (rp, rb, sp, sb) built from per-session increments."""

    def snapshot(self) -> RelaySnapshot:
        """A fresh collection, or the cached one if younger than ``cache_seconds``."""
        with self._lock:
            now = self._clock()
            if self._cached is not None and now - self._cached[0] < self.cache_seconds:
                return self._cached[1]
            snap = self._collect()
            self._cached = (self._clock(), snap)
            return snap

    def _collect(self) -> RelaySnapshot:
        start = time.perf_counter()
        snap = RelaySnapshot()
        if self.cli is not None:
            try:
                snap.allocations = self.cli.total_allocations()
                users, snap.sessions = self.cli.sessions_per_user()
                snap.users = len(users)
                if self.session_usage:
                    snap.usage = self.cli.session_usage()
                    self._accumulate(snap.usage)
                snap.up = True
            except (TurnstormError, OSError) as exc:
                snap.errors.append(str(exc))
                self.cli.close()
        try:
            snap.snmp = read_snmp_udp(self.pid)
            snap.sockets = read_udp_sockets(self.pid)
        except (TurnstormError, OSError, ValueError) as exc:
            snap.errors.append(f"kernel counters: {exc}")
        if self.pid is not None or self.finder is not None:
            try:
                pid = self.pid
                if pid is None and self.finder is not None:
                    pid = self.finder.resolve()
                if pid is not None:
                    snap.cpu_seconds = read_cpu_seconds(pid)
            except TurnstormError as exc:
                snap.errors.append(str(exc))
        snap.duration = time.perf_counter() - start
        return snap

    def _accumulate(self, usage: SessionUsage) -> None:
        for sid, values in usage.per_session.items():
            before = self._last_usage.get(sid, (0, 0, 0, 0))
            for i in range(4):
                self.relayed[i] += max(0, values[i] - before[i])
        self._last_usage = dict(usage.per_session)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.snapshot()
        relay = [self.relay]

        def gauge(name: str, doc: str, value: float | None) -> Iterator[Any]:
            if value is not None:
                family = GaugeMetricFamily(METRIC_PREFIX + name, doc, labels=["relay"])
                family.add_metric(relay, value)
                yield family

        def counter(name: str, doc: str, value: float | None) -> Iterator[Any]:
            if value is not None:
                family = CounterMetricFamily(METRIC_PREFIX + name, doc, labels=["relay"])
                family.add_metric(relay, value)
                yield family

        yield from gauge("up", "1 when the coturn CLI answered this scrape",
                         1.0 if snap.up else 0.0)
        yield from gauge("allocations", "coturn total-current-allocs (CLI pc)",
                         snap.allocations)
        yield from gauge("sessions", "coturn Total sessions (CLI pu)", snap.sessions)
        yield from gauge("users", "usernames with sessions (CLI pu)", snap.users)
        if snap.usage is not None:
            rp, rb, sp, sb = self.relayed
            packets = CounterMetricFamily(
                METRIC_PREFIX + "relayed_packets",
                "packets of sessions listed by CLI ps (per-session increments)",
                labels=["relay", "direction"])
            packets.add_metric([self.relay, "received"], rp)
            packets.add_metric([self.relay, "sent"], sp)
            yield packets
            octets = CounterMetricFamily(
                METRIC_PREFIX + "relayed_bytes",
                "bytes of sessions listed by CLI ps (per-session increments)",
                labels=["relay", "direction"])
            octets.add_metric([self.relay, "received"], rb)
            octets.add_metric([self.relay, "sent"], sb)
            yield octets
            yield from gauge("session_usage_truncated",
                             "1 when CLI ps listed fewer sessions than exist",
                             1.0 if snap.usage.truncated else 0.0)
        if snap.snmp is not None:
            for key, name in (("InDatagrams", "udp_in_datagrams"),
                              ("InErrors", "udp_in_errors"),
                              ("RcvbufErrors", "udp_rcvbuf_errors"),
                              ("NoPorts", "udp_no_ports"),
                              ("OutDatagrams", "udp_out_datagrams"),
                              ("SndbufErrors", "udp_sndbuf_errors")):
                yield from counter(name, f"Udp {key} of the relay's network namespace",
                                   snap.snmp.get(key))
        if snap.sockets is not None:
            yield from counter("socket_drops", "drops summed over the relay's UDP sockets",
                               sum(s.drops for s in snap.sockets))
            yield from gauge("rx_queue_bytes", "rx_queue summed over the relay's UDP sockets",
                             sum(s.rx_queue for s in snap.sockets))
            yield from gauge("udp_sockets", "UDP sockets counted", len(snap.sockets))
        yield from counter("cpu_seconds", "relay process user+system CPU seconds",
                           snap.cpu_seconds)
        yield from gauge("scrape_duration_seconds", "time the last collection took",
                         snap.duration)


class Exporter:
    """An HTTP ``/metrics`` endpoint for one or more relay collectors."""

    def __init__(self, collectors: Iterable[RelayCollector], host: str = "127.0.0.1",
                 port: int = 0) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=False)
        self.collectors = list(collectors)
        for collector in self.collectors:
            self.registry.register(collector)
        self.host = host
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> Exporter:
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(self.port, self.host,
                                                           self.registry)
        except OSError as exc:
            raise TurnstormError(f"cannot listen on {self.host}:{self.port}: "
                                 f"{exc.strerror or exc}") from None
        self.port = self._server.server_port
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def exposition(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for collector in self.collectors:
            if collector.cli is not None:
                collector.cli.close()

    def __enter__(self) -> Exporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reading an exposition back into policy signals -------------------------------------------


def scrape_signals(text: str, relay: str | None = None) -> dict[str, float]:
    """Raw values of one relay from an exporter exposition.

    Keys: the metric names without the ``turnstorm_relay_`` prefix (counters keep
    ``_total``); ``relayed_packets_total`` and ``relayed_bytes_total`` are summed over
    directions. With several relays in ``text``, ``relay`` picks one.
    """
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            _add_sample(values, sample.name, sample.labels, sample.value)
    if relay is not None:
        return values.get(relay, {})
    if len(values) > 1:
        raise ValueError(f"exposition holds several relays ({', '.join(sorted(values))}): "
                         "name one")
    return next(iter(values.values()), {})


def _add_sample(values: dict[str, dict[str, float]], name: str, labels: Mapping[str, str],
                value: float) -> None:
    if not name.startswith(METRIC_PREFIX) or name.endswith("_created"):
        return
    bucket = values.setdefault(labels.get("relay", ""), {})
    key = name[len(METRIC_PREFIX):]
    bucket[key] = bucket.get(key, 0.0) + value


def collector_values(collector: RelayCollector) -> dict[str, float]:
    """What :func:`scrape_signals` would return for this collector's exposition."""
    values: dict[str, dict[str, float]] = {}
    for family in collector.collect():
        for sample in family.samples:
            _add_sample(values, sample.name, sample.labels, sample.value)
    return values.get(collector.relay, {})


@dataclass
class _Previous:
    now: float
    values: dict[str, float]


class SignalTracker:
    """Turns successive scrapes into policy signals (see :data:`turnstorm.policy.SIGNALS`).

    Gauges pass through; counters become per-second rates between two scrapes of the same
    relay (None on the first scrape, after a counter reset, or while the relay is down:
    missing data, which never scales down).
    """

    RATES: Mapping[str, str] = {
        "udp_rcvbuf_errors": "udp_rcvbuf_errors_total",
        "relayed_pps": "relayed_packets_total",
        "udp_in_pps": "udp_in_datagrams_total",
        "socket_drops": "socket_drops_total",
        # Not exported by RelayCollector (coturn's CLI has no Binding counter); a series
        # of that name from Prometheus feeds bindingRatePerRelay.
        "binding_rate": "binding_requests_total",
    }

    def __init__(self, cpu_limit_cores: float | None = None,
                 drops_source: str = "udp_rcvbuf_errors_total") -> None:
        self.cpu_limit_cores = cpu_limit_cores
        """CPU percent is relative to this (the pod limit); one core when None."""
        self.drops_source = drops_source
        """Counter behind the ``udp_rcvbuf_errors`` signal: the netns-wide one (a pod) or
        ``socket_drops_total`` (relays sharing one namespace)."""
        self._previous: dict[str, _Previous] = {}

    def update(self, relay: str, now: float, scraped: Mapping[str, float]
               ) -> dict[str, float | None]:
        up = scraped.get("up", 0.0) >= 1.0
        signals: dict[str, float | None] = {
            "allocations": scraped.get("allocations") if up else None,
            "sessions": scraped.get("sessions") if up else None,
            "rx_queue_bytes": scraped.get("rx_queue_bytes"),
        }
        previous = self._previous.get(relay)
        rates = dict(self.RATES, udp_rcvbuf_errors=self.drops_source)
        rates["cpu_percent"] = "cpu_seconds_total"
        for signal, source in rates.items():
            value = None
            if previous is not None and source in scraped and source in previous.values:
                elapsed = now - previous.now
                delta = scraped[source] - previous.values[source]
                if elapsed > 0 and delta >= 0:
                    value = delta / elapsed
            if signal == "cpu_percent" and value is not None:
                value = 100.0 * value / (self.cpu_limit_cores or 1.0)
            if signal == "relayed_pps" and not up:
                value = None
            signals[signal] = value
        self._previous[relay] = _Previous(now, dict(scraped))
        return signals

    def forget(self, relay: str) -> None:
        self._previous.pop(relay, None)


# -- command line -----------------------------------------------------------------------------


def read_password(password_file: str | None, env: Mapping[str, str]) -> str:
    """The CLI password: from ``password_file`` (first line) or TURNSTORM_CLI_PASSWORD."""
    if password_file:
        try:
            with open(password_file, encoding="utf8") as handle:
                password = handle.readline().strip()
        except OSError as exc:
            raise TurnstormError(f"cannot read {password_file}: {exc.strerror}") from None
        if not password:
            raise TurnstormError(f"{password_file} is empty")
        return password
    password = env.get("TURNSTORM_CLI_PASSWORD", "")
    if not password:
        raise TurnstormError("the coturn CLI password is missing: give --cli-password-file "
                             "or set TURNSTORM_CLI_PASSWORD")
    return password


def serve(cli_address: tuple[str, int], password: str, listen: tuple[str, int], *,
          pid: int | None = None, relay: str | None = None,
          cache_seconds: float = DEFAULT_CACHE_SECONDS,
          stop: threading.Event | None = None, process: str | None = None) -> None:
    """Run the exporter until ``stop`` is set (or SIGTERM/SIGINT in the main thread)."""
    import signal

    cli = CoturnCli(cli_address[0], cli_address[1], password)
    try:
        cli.connect()  # fail fast on a wrong password; later outages only set up=0
    except CoturnCliError as exc:
        if "password" in str(exc):
            raise
    name = relay or os.environ.get("HOSTNAME") or socket.gethostname()
    collector = RelayCollector(name, cli, pid, cache_seconds=cache_seconds, process=process)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    with Exporter([collector], listen[0], listen[1]) as exporter:
        print(f"turnstorm exporter: serving {exporter.url} for relay {name!r}", flush=True)
        stop.wait()


def _address(text: str, option: str) -> tuple[str, int]:
    from turnstorm.client import parse_host_port

    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise TurnstormError(f"{option} {exc}") from None


def add_arguments(parser: Any) -> None:
    """Options of ``turnstorm exporter`` (an argparse parser)."""
    parser.add_argument("--cli", required=True, metavar="HOST:PORT",
                        help="coturn admin CLI address (cli-ip:cli-port), e.g. 127.0.0.1:5766")
    parser.add_argument("--cli-password-file", metavar="FILE",
                        help="file holding the CLI password (default: env "
                             "TURNSTORM_CLI_PASSWORD)")
    parser.add_argument("--pid", type=int,
                        help="relay process id: adds CPU seconds and restricts socket "
                             "counters to its sockets (needs a shared pid namespace)")
    parser.add_argument("--process", metavar="NAME",
                        help="find the relay process by command name (e.g. turnserver) for "
                             "its CPU seconds: a pod whose containers share the process "
                             "namespace (shareProcessNamespace); socket counters stay the "
                             "whole network namespace's")
    parser.add_argument("--listen", default="0.0.0.0:9641", metavar="HOST:PORT",
                        help="where to serve /metrics (default 0.0.0.0:9641)")
    parser.add_argument("--relay", help="relay label (default: $HOSTNAME, the pod name)")
    parser.add_argument("--cache", type=float, default=DEFAULT_CACHE_SECONDS,
                        metavar="SECONDS",
                        help=f"reuse a collection this long (default {DEFAULT_CACHE_SECONDS:g})")


def main_run(args: Any) -> int:
    """``turnstorm exporter``: serve until SIGTERM/SIGINT."""
    if args.cache < 0:
        raise TurnstormError("--cache must be 0 or more")
    if args.pid is not None and not os.path.isdir(f"/proc/{args.pid}"):
        raise TurnstormError(f"--pid {args.pid}: no such process")
    if args.pid is not None and args.process is not None:
        raise TurnstormError("--pid and --process are exclusive")
    if args.process is not None and not re.fullmatch(r"[^/\s]{1,15}", args.process):
        raise TurnstormError(f"--process {args.process!r}: a command name is 1-15 "
                             "characters without '/' or spaces (as in /proc/<pid>/comm)")
    password = read_password(args.cli_password_file, os.environ)
    serve(_address(args.cli, "--cli"), password, _address(args.listen, "--listen"),
          pid=args.pid, relay=args.relay, cache_seconds=args.cache, process=args.process)
    return 0

"""What a process tree holds and leaves: its processes, the relays among them, their
cgroups, the ports and directories its processes hold or name; and a reader of its pipes
to their end (the end comes only once every process holding them exited)."""

from __future__ import annotations

import os
import re
import subprocess
import threading
from dataclasses import dataclass, field
from typing import IO

from tests.integration.test_localmode import marked_processes

LEFT_WITHIN = 10.0
TRACEBACK_SIGNS = ("Traceback", "Error:", "Exception ignored")
TCP_LISTEN = "0A"
WORKDIR = re.compile(r"/[^\0=]*?/turnstorm-(?:run|relay)-[A-Za-z0-9_]+")
"""The run's and the relays' directories, on their processes' command lines."""


@dataclass
class Reader:
    """Reads a pipe to its end in a thread; ``seen`` is set once a line holds ``wanted``."""

    stream: IO[str]
    wanted: str = "\0"
    lines: list[str] = field(default_factory=list)
    seen: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.stream:
            self.lines.append(line)
            if self.wanted in line:
                self.seen.set()

    @property
    def text(self) -> str:
        return "".join(self.lines)


@dataclass
class Footprint:
    """What a run holds: processes, the relays among them, their cgroups, the ports and
    directories its processes hold or name."""

    pids: set[int]
    relays: set[int]
    cgroups: set[str]
    pools: set[str]
    """The prefixes (``<parent>/pool-<random>-<phase>-relay-``) of the relays' cgroups: a
    relay starting is not in its group yet."""
    ports: set[tuple[str, str]]
    """(``/proc/net`` table, local ADDR:PORT in the kernel's hex)."""
    directories: set[str]


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _socket_inodes(pids: set[int]) -> set[int]:
    inodes = set()
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def bound_ports(inodes: set[int] | None = None) -> set[tuple[str, str]]:
    """Local addresses of the UDP sockets and listening TCP sockets with ``inodes``
    (when None: that a process holds; TIME_WAIT, inode 0, is the kernel's alone)."""
    found = set()
    for table in ("udp", "tcp", "udp6", "tcp6"):
        for line in _read(f"/proc/net/{table}").splitlines()[1:]:
            cols = line.split()
            if len(cols) <= 9 or int(cols[9]) == 0 or (table.startswith("tcp")
                                                        and cols[3] != TCP_LISTEN):
                continue
            if inodes is None or int(cols[9]) in inodes:
                found.add((table, cols[1]))
    return found


def cpu_cgroup(pid: int) -> str | None:
    from turnstorm.relay.cgroup import detect

    hierarchy = detect()
    for line in _read(f"/proc/{pid}/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        if (hierarchy.version == 2 and controllers == "") or "cpu" in controllers.split(","):
            return os.path.join(hierarchy.root, path.lstrip("/"))
    return None


def pool_cgroups(pool: str) -> set[str]:
    """The relay cgroups of ``pool`` (``<parent>/<its prefix>``) that exist."""
    parent, prefix = os.path.split(pool)
    return {os.path.join(parent, name) for name in _listdir(parent) if name.startswith(prefix)}


def footprint(mark: str) -> Footprint:
    pids = set(marked_processes(mark))
    relays = {pid for pid in pids if _read(f"/proc/{pid}/comm").strip() == "turnserver"}
    groups = {c for c in map(cpu_cgroup, relays) if c is not None and "/turnstorm/" in c}
    # a pool's groups share a prefix: pool-<random>-<phase>-relay-<n>
    pools = {group.rsplit("-relay-", 1)[0] + "-relay-" for group in groups}
    cgroups = set().union(*map(pool_cgroups, pools))
    directories = {found for pid in pids
                   for found in WORKDIR.findall(_read(f"/proc/{pid}/cmdline"))}
    return Footprint(pids, relays, cgroups, pools, bound_ports(_socket_inodes(pids)),
                     directories)


def held_by_run(ports: set[tuple[str, str]], mark: str) -> set[tuple[str, str]]:
    """Those of ``ports`` a process of the run (carrying ``mark``) still holds. Not
    whoever holds them now: another run on this machine takes the same addresses (the
    emulated CGNAT's, the first relay's) as soon as they are free."""
    return ports & bound_ports(_socket_inodes(set(marked_processes(mark))))


def nft_tables() -> set[str]:
    done = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                          check=True, timeout=30)
    return set(done.stdout.splitlines())


def left_of(before: Footprint, tables: set[str], mark: str) -> dict[str, object]:
    """What is still there of the run ``before`` described (empty when nothing is)."""
    left: dict[str, object] = {
        "processes": [f"{pid} {_read(f'/proc/{pid}/cmdline').replace(chr(0), ' ')}"
                      for pid in marked_processes(mark)],
        "cgroups": sorted(set().union(*map(pool_cgroups, before.pools))),
        "ports": sorted(held_by_run(before.ports, mark)),
        "directories": sorted(d for d in before.directories if os.path.exists(d)),
        "nft tables": sorted(nft_tables() - tables),
    }
    return {what: value for what, value in left.items() if value}

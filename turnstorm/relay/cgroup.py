"""CPU-capped cgroups for local relays, like a pod's CPU limit.

cgroup v2 (``cpu.max``) when a cgroup2 hierarchy offers the ``cpu`` controller, else
cgroup v1's ``cpu`` hierarchy (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``). Groups live
under ``<root>/turnstorm/<name>``. Writing a pid to ``cgroup.procs`` moves the whole
process (every thread). :meth:`CpuCgroup.remove` moves remaining processes back to the
cgroup each came from (or the root), waits until the group is empty and removes it.

Needs write access to the cgroup filesystem (root, or a delegated subtree); without it
:class:`CgroupError` names the path and what is missing.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import time
from dataclasses import dataclass, field

from turnstorm import lifeline
from turnstorm.errors import TurnstormError

PARENT = "turnstorm"
DEFAULT_PERIOD_US = 100_000
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class CgroupError(TurnstormError):
    """A cgroup cannot be found, created, written or removed."""


@dataclass(frozen=True)
class Hierarchy:
    version: int
    """1 or 2."""
    root: str
    """Mount point holding the cpu controller."""


def _mounts(path: str = "/proc/self/mounts") -> list[tuple[str, str, list[str]]]:
    entries = []
    with open(path, encoding="utf8") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 4:
                entries.append((parts[1], parts[2], parts[3].split(",")))
    return entries


def detect(mounts: list[tuple[str, str, list[str]]] | None = None) -> Hierarchy:
    """The hierarchy carrying the cpu controller: v2 preferred, else v1."""
    mounts = _mounts() if mounts is None else mounts
    for point, fstype, _ in mounts:
        if fstype == "cgroup2":
            with contextlib.suppress(OSError), \
                    open(os.path.join(point, "cgroup.controllers"), encoding="ascii") as f:
                if "cpu" in f.read().split():
                    return Hierarchy(2, point)
    for point, fstype, options in mounts:
        if fstype == "cgroup" and "cpu" in options:
            return Hierarchy(1, point)
    raise CgroupError("no cgroup hierarchy with the cpu controller is mounted (need cgroup "
                      "v1 'cpu' or cgroup2 with 'cpu' in cgroup.controllers)")


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="ascii") as handle:
            handle.write(text)
    except PermissionError:
        raise CgroupError(f"cannot write {path}: permission denied (run as root or "
                          "delegate that cgroup subtree to this user)") from None
    except OSError as exc:
        raise CgroupError(f"cannot write {text.strip()!r} to {path}: "
                          f"{exc.strerror or exc}") from None


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read()
    except OSError as exc:
        raise CgroupError(f"cannot read {path}: {exc.strerror or exc}") from None


def _pid_cgroup(pid: int, hierarchy: Hierarchy) -> str | None:
    """The path (relative to the hierarchy's root) of the cgroup holding ``pid``."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf8") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if hierarchy.version == 2 and controllers == "":
            return path
        if hierarchy.version == 1 and "cpu" in controllers.split(","):
            return path
    return None


@dataclass
class CpuCgroup:
    """One capped group ``<root>/turnstorm/<name>``."""

    name: str
    cpus: float
    """CPU limit in cores (0.5 = half a core), like ``resources.limits.cpu``."""
    period_us: int = DEFAULT_PERIOD_US
    hierarchy: Hierarchy | None = None
    origins: dict[int, str] = field(default_factory=dict)
    """pid -> the cgroup it came from (moved back on remove)."""
    created: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise CgroupError(f"cgroup name {self.name!r} must be 1-64 of [A-Za-z0-9_.-]")
        if not self.cpus > 0:
            raise CgroupError("the CPU limit must be positive")

    @property
    def quota_us(self) -> int:
        return max(1000, round(self.cpus * self.period_us))

    @property
    def parent(self) -> str:
        assert self.hierarchy is not None
        return os.path.join(self.hierarchy.root, PARENT)

    @property
    def path(self) -> str:
        return os.path.join(self.parent, self.name)

    def create(self) -> CpuCgroup:
        self.hierarchy = self.hierarchy or detect()
        root = self.hierarchy.root
        if not os.path.isdir(root):
            raise CgroupError(f"cgroup hierarchy {root} does not exist (is the cgroup "
                              "filesystem mounted?)")
        if not os.access(root, os.W_OK):
            raise CgroupError(f"cannot create cgroups under {root}: no write access (run as "
                              "root or delegate that cgroup subtree to this user)")
        lifeline.track("cgroup", self.path)  # made by this process: undone if it dies
        try:
            for attempt in range(3):
                os.makedirs(self.parent, exist_ok=True)
                if self.hierarchy.version == 2:
                    self._enable_cpu_v2()
                try:
                    os.mkdir(self.path)
                except FileNotFoundError:
                    # Another group's remove() took the shared parent away meanwhile.
                    if attempt == 2:
                        raise
                    continue
                break
        except FileExistsError:
            lifeline.untrack(self.path)  # someone else's
            raise CgroupError(f"{self.path} already exists (a leftover: remove it with "
                              f"rmdir once it is empty)") from None
        except PermissionError:
            lifeline.untrack(self.path)
            raise CgroupError(f"cannot create {self.path}: permission denied (run as root "
                              "or delegate that cgroup subtree to this user)") from None
        except OSError as exc:
            lifeline.untrack(self.path)
            raise CgroupError(f"cannot create {self.path}: {exc.strerror or exc}") from None
        self.created = True
        try:
            self._write_limit(period=True)
        except CgroupError:
            self.remove()
            raise
        return self

    def _write_limit(self, period: bool) -> None:
        """Write ``cpus`` as the group's quota (and, with ``period``, its v1 period)."""
        assert self.hierarchy is not None
        if self.hierarchy.version == 2:
            _write(os.path.join(self.path, "cpu.max"), f"{self.quota_us} {self.period_us}")
            return
        if period:
            _write(os.path.join(self.path, "cpu.cfs_period_us"), str(self.period_us))
        _write(os.path.join(self.path, "cpu.cfs_quota_us"), str(self.quota_us))

    def set_cpus(self, cpus: float) -> None:
        """Change the CPU limit of the live group, in place (its processes keep running)."""
        if not (math.isfinite(cpus) and cpus > 0):
            raise CgroupError(f"the CPU limit must be positive, not {cpus!r}")
        if not self.created or self.hierarchy is None:
            raise CgroupError(f"cgroup {self.name} is not created")
        previous = self.cpus
        self.cpus = cpus
        try:
            self._write_limit(period=False)
        except CgroupError:
            self.cpus = previous
            raise

    def _enable_cpu_v2(self) -> None:
        assert self.hierarchy is not None
        for directory in (self.hierarchy.root, self.parent):
            control = os.path.join(directory, "cgroup.subtree_control")
            if "cpu" not in _read(control).split():
                _write(control, "+cpu")

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the group."""
        if not self.created:
            raise CgroupError(f"cgroup {self.name} is not created")
        assert self.hierarchy is not None
        origin = _pid_cgroup(pid, self.hierarchy)
        _write(os.path.join(self.path, "cgroup.procs"), str(pid))
        if origin is not None and not origin.startswith(f"/{PARENT}/"):
            self.origins[pid] = origin

    def pids(self) -> list[int]:
        if not self.created:
            return []
        try:
            text = _read(os.path.join(self.path, "cgroup.procs"))
        except CgroupError:
            return []
        return [int(p) for p in text.split()]

    def usage_seconds(self) -> float | None:
        """CPU used by the group (v2 cpu.stat usage_usec; v1 needs cpuacct: None)."""
        if not self.created or self.hierarchy is None or self.hierarchy.version != 2:
            return None
        for line in _read(os.path.join(self.path, "cpu.stat")).splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        return None

    def throttled(self) -> dict[str, int]:
        """``cpu.stat`` counters (nr_periods, nr_throttled, throttled_time/usec)."""
        if not self.created:
            return {}
        stats = {}
        for line in _read(os.path.join(self.path, "cpu.stat")).splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                stats[key] = int(value)
        return stats

    def remove(self, timeout: float = 5.0) -> None:
        """Move remaining processes back, wait until empty, rmdir. Idempotent."""
        if not self.created or self.hierarchy is None:
            return
        root = self.hierarchy.root
        deadline = time.monotonic() + timeout
        while True:
            for pid in self.pids():
                origin = self.origins.get(pid, "/")
                target = os.path.join(root, origin.lstrip("/"), "cgroup.procs")
                with contextlib.suppress(CgroupError):
                    _write(target, str(pid))
            try:
                os.rmdir(self.path)
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove {self.path}: {exc.strerror} "
                                      f"(processes left: {self.pids()})") from None
                time.sleep(0.02)
                continue
            break
        self.created = False
        self.origins.clear()
        lifeline.untrack(self.path)
        # The shared parent goes too once the last group is gone.
        with contextlib.suppress(OSError):
            os.rmdir(self.parent)

    def __enter__(self) -> CpuCgroup:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()

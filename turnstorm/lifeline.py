"""What a process starts outlives it by a few seconds at most, however it ends.

Two halves, both for a parent killed without warning (SIGKILL, a closed terminal):

* A child process calls :func:`bind_to_parent` first: the kernel sends it SIGTERM when
  its parent dies (Linux ``PR_SET_PDEATHSIG``, through ctypes), and the returned
  :class:`ParentWatch` tells, by polling ``getppid``, whether the parent is gone already
  (before the signal was armed, or where there is no such signal). A closed pipe to the
  parent says the same; the child then stops what it started and exits quietly.
* A parent that starts what no signal of its own stops (relays in sessions of their own,
  cgroups, directories) calls :func:`arm` once. That starts a guard,
  ``python -m turnstorm.lifeline``, reading a pipe from the parent. Each thing is named
  with :func:`track` before it is made and :func:`untrack` once it is undone. When the
  pipe closes, on any exit, the guard undoes what is still tracked: it ends every process
  in a tracked cgroup, and every child the parent left naming a tracked directory on its
  command line (SIGTERM, then SIGKILL after :data:`GRACE` seconds), then removes those
  cgroups and directories. An orderly exit has untracked everything: the guard just
  exits.

Without :func:`arm`, :func:`track` and :func:`untrack` do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

PR_SET_PDEATHSIG = 1
GRACE = 3.0
"""Seconds the guard gives a process between SIGTERM and SIGKILL."""
KINDS = ("cgroup", "dir")


# -- the child's half -------------------------------------------------------------------------


class ParentWatch:
    """The parent this process had when it was made; gone once the kernel re-parents it."""

    def __init__(self) -> None:
        self.parent = os.getppid()

    @property
    def gone(self) -> bool:
        return os.getppid() != self.parent


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel for ``signum`` when the parent dies, however it dies (best effort:
    Linux only). The signal may come more than once: the kernel sends it each time this
    process is handed to a new parent, and a parent with threads, dying, hands it from
    one thread to the next before the adopter gets it; a handler must take repeats."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum)


def bind_to_parent(signum: int = signal.SIGTERM) -> ParentWatch:
    """:func:`die_with_parent`, and the watch that says if the parent died before it was
    armed (then no signal comes)."""
    watch = ParentWatch()
    die_with_parent(signum)
    return watch


# -- the parent's half ------------------------------------------------------------------------


@dataclass
class _Guard:
    process: subprocess.Popen[str]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, *message: str) -> None:
        assert self.process.stdin is not None
        with self.lock, contextlib.suppress(OSError, ValueError):  # the guard is gone
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()


_guard: _Guard | None = None


def arm() -> None:
    """Start this process's guard (once)."""
    global _guard
    if _guard is None:
        process = subprocess.Popen(
            [sys.executable, "-m", "turnstorm.lifeline"], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, text=True, start_new_session=True)
        _guard = _Guard(process)


def disarm(timeout: float = 10.0) -> None:
    """Close the pipe: the guard undoes what is still tracked (normally nothing) and
    exits; wait at most ``timeout`` seconds for it."""
    global _guard
    guard, _guard = _guard, None
    if guard is None:
        return
    assert guard.process.stdin is not None
    with guard.lock, contextlib.suppress(OSError):
        guard.process.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        guard.process.wait(timeout)


def track(kind: str, path: str) -> None:
    """``path``, a ``cgroup`` or a ``dir``, is made (or about to be) by this process:
    the guard undoes it if this process dies first."""
    if kind not in KINDS:
        raise ValueError(f"track: kind must be one of {KINDS}, not {kind!r}")
    if _guard is not None:
        _guard.send("track", kind, os.path.abspath(path))


def untrack(path: str) -> None:
    """``path`` is undone (or was never made): nothing left for the guard."""
    if _guard is not None:
        _guard.send("untrack", os.path.abspath(path))


# -- the guard --------------------------------------------------------------------------------


def _cgroup_pids(path: str) -> set[int]:
    try:
        with open(os.path.join(path, "cgroup.procs"), encoding="ascii") as handle:
            return {int(pid) for pid in handle.read().split()}
    except (OSError, ValueError):
        return set()


def _parent_of(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rpartition(")")[2].split()
        return int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def _arguments(pid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().decode("utf8", "replace").split("\0")
    except OSError:
        return []


def _naming(directories: list[str], parents: set[int]) -> set[int]:
    """Children of ``parents`` with one of ``directories`` or a path under it among
    their arguments."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or _parent_of(entry) not in parents:
            continue
        arguments = _arguments(entry)
        if any(a == d or d + os.sep in a for a in arguments for d in directories):
            found.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    """False once ``pid`` has exited (a zombie waiting for its new parent included)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rpartition(")")[2].split()[:1] not in (["Z"], ["X"])
    except OSError:
        return False


def _signal_all(pids: set[int], signum: int, wait: float) -> set[int]:
    """Send ``signum`` to ``pids``; those still alive after ``wait`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)
    deadline = time.monotonic() + wait
    while True:
        pids = {pid for pid in pids if _alive(pid)}
        if not pids or time.monotonic() >= deadline:
            return pids
        time.sleep(0.05)


def end_processes(tracked: dict[str, str], parents: set[int]) -> set[int]:
    """End every process of ``tracked`` (path -> kind): those in its cgroups, and the
    children of ``parents`` naming its directories. Returns the pids that would not die."""
    pids: set[int] = set()
    for path, kind in tracked.items():
        if kind == "cgroup":
            pids |= _cgroup_pids(path)
    directories = [path for path, kind in tracked.items() if kind == "dir"]
    if directories:
        pids |= _naming(directories, parents)
    pids.discard(os.getpid())
    left = _signal_all(pids, signal.SIGTERM, GRACE)
    return _signal_all(left, signal.SIGKILL, 2.0) if left else left


def _remove_cgroup(path: str, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
        except FileNotFoundError:
            break
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        break
    with contextlib.suppress(OSError):  # the shared parent, once its last group is gone
        os.rmdir(os.path.dirname(path))


def undo(tracked: dict[str, str], parents: set[int]) -> list[str]:
    """End the processes of ``tracked`` (see :func:`end_processes`), then remove its
    paths, newest first; one line for each thing that could not be undone."""
    problems = [f"process {pid} would not end"
                for pid in sorted(end_processes(tracked, parents))]
    for path, kind in reversed(tracked.items()):
        try:
            if kind == "cgroup":
                _remove_cgroup(path)
            else:
                shutil.rmtree(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"cannot remove {path}: {exc.strerror or exc}")
    return problems


def read_tracked(lines: Iterable[str]) -> dict[str, str]:
    """What is still tracked (path -> kind) once ``lines`` end; a line cut short by the
    parent's death is left out (lines shorter than the pipe's atomic size never are)."""
    tracked: dict[str, str] = {}
    for line in lines:
        if not line.endswith("\n"):
            break
        message = json.loads(line)
        if message[0] == "track":
            tracked[message[2]] = message[1]
        else:
            tracked.pop(message[1], None)
    return tracked


def adopter(parent: int, timeout: float = 1.0) -> int:
    """Who adopts ``parent``'s orphans: the new parent of this process once ``parent``
    died (the pipe closes a moment before the kernel re-parents its children), or
    ``parent`` itself, alive, after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getppid()


def main() -> int:
    """The guard: read ``track``/``untrack`` lines until the pipe closes, then undo.
    The parent's orphans are the children of the parent or of its adopter."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's Ctrl-C is the parent's
    parent = os.getppid()
    tracked = read_tracked(sys.stdin)
    if not tracked:
        return 0
    for problem in undo(tracked, {parent, adopter(parent)}):
        print(f"turnstorm: left behind by a process that died: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

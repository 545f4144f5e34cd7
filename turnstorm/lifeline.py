"""A child process that outlives its parent by a moment at most, however the parent dies.

A child calls :func:`bind_to_parent` first: the kernel sends it SIGTERM when its parent
dies (Linux ``PR_SET_PDEATHSIG``, through ctypes), SIGKILL included, and the returned
:class:`ParentWatch` tells, by polling ``getppid``, whether the parent is gone already
(before the signal was armed, or where there is no such signal). A closed pipe to the
parent says the same; the child then stops what it started and exits quietly.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal

PR_SET_PDEATHSIG = 1


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
    Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum)


def bind_to_parent(signum: int = signal.SIGTERM) -> ParentWatch:
    """:func:`die_with_parent`, and the watch that says if the parent died before it was
    armed (then no signal comes)."""
    watch = ParentWatch()
    die_with_parent(signum)
    return watch

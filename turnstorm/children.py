"""Ending child processes: ask, wait, then kill. One way for every child we start.

Works with :class:`subprocess.Popen` and gevent's (same ``poll``/``wait``/``pid`` and
the same ``TimeoutExpired``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any


def _signal(process: Any, signum: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(process.pid, signum)
        else:
            os.kill(process.pid, signum)


def reap(process: Any, timeout: float, *, group: bool = False) -> None:
    """Wait up to ``timeout`` seconds for ``process`` (already asked to end) to exit,
    then SIGKILL it (its process group with ``group``) and wait for it."""
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal(process, signal.SIGKILL, group)
        process.wait()


def stop(*processes: Any, timeout: float = 5.0, group: bool = False) -> None:
    """SIGTERM every process still running (each one's process group with ``group``),
    then :func:`reap` each: they all end in parallel, each within ``timeout``."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        _signal(process, signal.SIGTERM, group)
    for process in running:
        reap(process, timeout, group=group)

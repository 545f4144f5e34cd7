"""Run the users in-process with Locust's own runner (headless), bounded in time.

Import this module before kubernetes/kopf in any process that loads both: Locust
monkey-patches with gevent at import.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gevent
import locust  # noqa: F401 - first: it monkey-patches the process with gevent
from locust.env import Environment
from locust.event import Events
from locust.runners import STATE_STOPPED

from turnstorm.loadgen.config import LoadgenConfig
from turnstorm.loadgen.users import LoadgenState, install

Progress = Callable[[float, Any], None]
"""Called about once a second with (elapsed seconds, environment)."""


@dataclass
class RunResult:
    environment: Any
    state: LoadgenState
    elapsed: float


def run_locust(
    config: LoadgenConfig,
    user_classes: Sequence[type[Any]],
    *,
    duration: float,
    users: int = 1,
    spawn_rate: float = 1.0,
    shape: Any = None,
    cgnat: Any = None,
    progress: Progress | None = None,
    tick: float = 1.0,
) -> RunResult:
    """Run ``user_classes`` for at most ``duration`` seconds (a shape may end it sooner).

    Without a shape, ``users`` are spawned at ``spawn_rate``. Users are stopped at the
    end, which releases their allocations (each user's call ends in its ``finally``).
    """
    if duration <= 0:
        raise ValueError("duration must be positive")
    environment = Environment(user_classes=list(user_classes), shape_class=shape,
                              events=Events())  # type: ignore[no-untyped-call]
    state = install(environment, config)
    assert state is not None
    state.cgnat = cgnat
    runner = environment.create_local_runner()
    started = time.monotonic()
    if shape is not None:
        shape.reset_time()
        runner.start_shape()
    else:
        runner.start(users, spawn_rate=spawn_rate)
    try:
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= duration or (runner.state == STATE_STOPPED and elapsed > tick):
                break
            gevent.sleep(min(tick, duration - elapsed))
            if progress is not None:
                progress(time.monotonic() - started, environment)
    finally:
        runner.quit()
    return RunResult(environment, state, time.monotonic() - started)


def transactions(environment: Any) -> dict[str, dict[str, int]]:
    """Locust's request statistics as ``{"TYPE name": {"count", "failures"}}``."""
    return {
        f"{entry.method} {entry.name}": {"count": entry.num_requests,
                                         "failures": entry.num_failures}
        for entry in environment.stats.entries.values()
    }

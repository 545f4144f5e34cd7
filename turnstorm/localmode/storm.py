"""The storm of one phase, in its own process: ``python -m turnstorm.localmode.storm``.

The load generator runs gevent-patched and needs a core of its own: sharing a process
with the autoscaler loop (coturn CLI reads, /proc parsing, relay starts) made its media
pump late by 100+ ms under load. So the orchestrator starts this process per phase and
keeps the relay pool and the policy to itself.

Protocol: one JSON object on stdin (the :class:`~turnstorm.loadgen.config.LoadgenConfig`
as :func:`~turnstorm.loadgen.config.config_to_dict` gives it, secret included, plus the
shape, user mix, duration, CGNAT, workers and web port). On stdout, one ``row`` line per
second (:class:`~turnstorm.localmode.series.Row` fields without the pool's columns), then
one ``result`` line; or one ``error`` line and exit code 2 for a setting that cannot
run. The relays in rotation come from the file named by
:data:`~turnstorm.localmode.rotation.ROTATION_ENV`. SIGTERM and SIGINT stop the users
at the next tick (their allocations are released) and the Locust workers; so does the
orchestrator's death, however it dies (the kernel's parent-death signal, a closed pipe,
or a new parent), with exit code 130 and nothing on stderr.
"""

from __future__ import annotations

# isort: off
from turnstorm.loadgen.runner import run_locust  # first: Locust patches with gevent
# isort: on

import contextlib
import json
import os
import signal
import sys
from typing import Any

from turnstorm.errors import TurnstormError
from turnstorm.lifeline import bind_to_parent
from turnstorm.loadgen.cgnat import Population
from turnstorm.loadgen.config import config_from_dict
from turnstorm.loadgen.metrics import total
from turnstorm.loadgen.shapes import make_shape
from turnstorm.localmode.control import PoolStatus
from turnstorm.localmode.series import PhaseRecorder
from turnstorm.localmode.users import RotatingBindingUser, RotatingTurnUser


def emit(kind: str, data: Any) -> bool:
    """One line to the orchestrator; False once it is gone (its end of the pipe closed):
    this process then stops what it started and exits quietly."""
    try:
        sys.stdout.write(json.dumps({"kind": kind, "data": data}) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        orphaned()
        return False
    return True


def orphaned() -> None:
    """The orchestrator is gone: what is still buffered for it goes nowhere (no
    BrokenPipeError at exit), and the next progress tick stops the users."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    _stopping.append(signal.SIGPIPE)


_stopping: list[int] = []


def _interrupt(signum: int, frame: Any) -> None:
    # Raised from the next progress tick, in the main greenlet: an exception raised here
    # could land in gevent's hub, which prints it before passing it on.
    _stopping.append(signum)


def main() -> int:
    from turnstorm.localmode.run import PRIORITY, quiet_locust

    parent = bind_to_parent()  # SIGTERM when the orchestrator dies, however it dies
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    quiet_locust()
    with contextlib.suppress(OSError):  # root only: the generator must not be starved
        os.nice(PRIORITY - os.nice(0))
    try:
        job = json.loads(sys.stdin.read())
    except ValueError:  # empty or cut short: the orchestrator died handing it over
        return 130
    if parent.gone:
        return 130
    try:
        config = config_from_dict(job["config"])
        shape = make_shape(job["shape"], **dict(job["shape_params"], duration=job["duration"]))
        config.no_backoff_fraction = float(getattr(shape, "no_backoff_fraction", 0.0))
        cgnat = Population.build(*job["cgnat"], hold=2.0) if job["cgnat"] else None
    except (TurnstormError, ValueError) as exc:
        emit("error", str(exc))
        return 2
    RotatingTurnUser.weight = job["turn_weight"]
    RotatingBindingUser.weight = job["binding_weight"]
    classes = [c for c in (RotatingTurnUser, RotatingBindingUser) if c.weight > 0]
    recorder = PhaseRecorder(job["phase"], PoolStatus(), 0.0)

    def tick(elapsed: float, environment: Any) -> None:
        if _stopping or parent.gone or not emit(
                "row", recorder.sample(elapsed, environment).as_dict()):
            raise KeyboardInterrupt

    try:
        result = run_locust(config, classes, duration=job["duration"], users=job["users"],
                            shape=shape, cgnat=cgnat, progress=tick,
                            metrics_port=job["metrics_port"], workers=job["workers"],
                            web_port=job["web"])
    except KeyboardInterrupt:
        return 130
    except TurnstormError as exc:
        emit("error", str(exc))
        return 1
    state = result.state.cumulative(live=False)
    emit("result", {"duration_s": round(result.elapsed, 3),
                    "media": total(state.media.values()).as_dict(),
                    "counters": dict(state.counters),
                    "send_lag_ms": state.send_lag.summary_ms()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

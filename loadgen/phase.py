"""The storm of one local-mode phase, in its own process: ``python -m turnstorm.loadgen.phase``.

The load generator runs gevent-patched and needs a core of its own: sharing a process
with the autoscaler loop (coturn CLI reads, /proc parsing, relay starts) made its media
pump late by 100+ ms under load. So the orchestrator (:mod:`turnstorm.localmode.run`)
starts this process per phase and keeps the relay pool and the policy to itself.

It speaks :mod:`turnstorm.loadgen.phaseio`: one :class:`~turnstorm.loadgen.phaseio.PhaseJob`
on stdin; on stdout a :class:`~turnstorm.loadgen.phaseio.GeneratorRow` a second, then a
:class:`~turnstorm.loadgen.phaseio.PhaseResult`, or a
:class:`~turnstorm.loadgen.phaseio.PhaseError` (exit code 2 for a setting that cannot
run). The relays in rotation come from the file named by
:data:`~turnstorm.loadgen.rotation.ROTATION_ENV`. SIGTERM and SIGINT stop the users at
the next tick (their allocations are released) and the Locust workers; so does the
orchestrator's death, however it dies (the kernel's parent-death signal, a closed pipe,
or a new parent), with exit code 130 and nothing on stderr.
"""

from __future__ import annotations

# isort: off
from turnstorm.loadgen.runner import run_locust  # first: Locust patches with gevent
# isort: on

import contextlib
import os
import signal
import sys
from typing import Any

from turnstorm.errors import TurnstormError
from turnstorm.lifeline import bind_to_parent
from turnstorm.loadgen.cgnat import Population
from turnstorm.loadgen.config import config_from_dict
from turnstorm.loadgen.metrics import percentile_ms, std_ms, total
from turnstorm.loadgen.phaseio import (
    GeneratorRow,
    PhaseError,
    PhaseJob,
    PhaseResult,
    Record,
    decode,
    encode,
)
from turnstorm.loadgen.rotating import RotatingBindingUser, RotatingTurnUser
from turnstorm.loadgen.shapes import make_shape


def emit(record: Record) -> bool:
    """One line to the orchestrator; False once it is gone (its end of the pipe closed):
    this process then stops what it started and exits quietly."""
    try:
        sys.stdout.write(encode(record))
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


def quiet_locust() -> None:
    """Locust's INFO lines, its warning about the shapes' instant steps and the one about
    the media pump's greenlet (not a user) stay out of the progress view."""
    import logging

    from turnstorm.loadgen.storm import configure_logging

    configure_logging()
    noise = ("spawn rate is very high", "didn't have proper args")
    logging.getLogger("locust.runners").addFilter(
        lambda record: not any(text in record.getMessage() for text in noise))


class GeneratorRecorder:
    """Turns the Locust environment into one :class:`GeneratorRow` per :meth:`sample`.

    The users' aggregates are cumulative (finished calls plus, in the same process, the
    calls in progress); one second's figures are the difference of two cumulative views:
    the RTT histogram bucket by bucket (exact percentiles of that second's echoes),
    packets sent and lost, Locust's request count.
    """

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self._buckets: dict[int, int] = {}
        self._sent = 0
        self._lost = 0
        self._requests = 0
        self._pump = 0
        self._elapsed = 0.0

    def sample(self, elapsed: float, environment: Any) -> GeneratorRow:
        state = environment.turnstorm
        view = state.cumulative(live=True)
        media = total(view.media.values())
        buckets = dict(media.rtt.buckets)
        second = {i: n - self._buckets.get(i, 0) for i, n in buckets.items()}
        second = {i: n for i, n in second.items() if n > 0}
        sent, lost = media.sent - self._sent, media.lost - self._lost
        requests = environment.stats.total.num_requests
        pump = getattr(getattr(state, "pump", None), "sent", None)
        dt = max(elapsed - self._elapsed, 1e-3)
        packets = requests - self._requests
        if pump is not None:
            packets += pump - self._pump
            self._pump = pump
        else:
            packets += sent
        row = GeneratorRow(
            phase=self.phase, phase_time_s=round(elapsed, 3),
            users=int(environment.runner.user_count), offered_pps=round(packets / dt, 1),
            rtt_p50_ms=percentile_ms(second, 50), rtt_p99_ms=percentile_ms(second, 99),
            loss_pct=round(min(100.0, max(0.0, 100.0 * lost / sent)), 3) if sent > 0 else None,
            jitter_ms=std_ms(second))
        self._buckets, self._sent, self._lost = buckets, media.sent, media.lost
        self._requests, self._elapsed = requests, elapsed
        return row


def main() -> int:
    parent = bind_to_parent()  # SIGTERM when the orchestrator dies, however it dies
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    quiet_locust()
    try:
        job = decode(sys.stdin.read())
    except ValueError:  # empty or cut short: the orchestrator died handing it over
        return 130
    if parent.gone:
        return 130
    if not isinstance(job, PhaseJob):
        emit(PhaseError(f"expected a phase job on stdin, not {type(job).__name__}"))
        return 2
    with contextlib.suppress(OSError):  # root only: the generator must not be starved
        os.nice(job.priority - os.nice(0))
    try:
        config = config_from_dict(job.config)
        shape = make_shape(job.shape, **dict(job.shape_params, duration=job.duration))
        config.no_backoff_fraction = float(getattr(shape, "no_backoff_fraction", 0.0))
        cgnat = Population.build(*job.cgnat, hold=2.0) if job.cgnat else None
    except (TurnstormError, ValueError) as exc:
        emit(PhaseError(str(exc)))
        return 2
    RotatingTurnUser.weight = job.turn_weight
    RotatingBindingUser.weight = job.binding_weight
    classes = [c for c in (RotatingTurnUser, RotatingBindingUser) if c.weight > 0]
    recorder = GeneratorRecorder(job.phase)

    def tick(elapsed: float, environment: Any) -> None:
        if _stopping or parent.gone or not emit(recorder.sample(elapsed, environment)):
            raise KeyboardInterrupt

    try:
        result = run_locust(config, classes, duration=job.duration, users=job.users,
                            shape=shape, cgnat=cgnat, progress=tick,
                            metrics_port=job.metrics_port, workers=job.workers,
                            web_port=job.web)
    except KeyboardInterrupt:
        return 130
    except TurnstormError as exc:
        emit(PhaseError(str(exc)))
        return 1
    state = result.state.cumulative(live=False)
    emit(PhaseResult(duration_s=round(result.elapsed, 3),
                     media=total(state.media.values()).as_dict(),
                     counters=dict(state.counters),
                     send_lag_ms=state.send_lag.summary_ms()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

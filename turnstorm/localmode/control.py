"""The autoscaler loop of the local mode: relay signals -> policy -> process actuator.

Every ``interval`` seconds the controller reads each relay's signals
(:meth:`~turnstorm.relay.actuator.LocalPool.samples`: coturn CLI allocations, kernel socket
drops, CPU against the cgroup limit), evaluates the :class:`~turnstorm.policy.Autoscaler`
on the scenario clock (wall clock x ``time_scale``, see
:class:`~turnstorm.localmode.scenario.LocalTiming`) and, for the autoscaled pool, applies
the decision (start, drain, undrain, remove relays) and publishes the new rotation. For
the fixed pool it evaluates too (the ``desired`` column shows what the policy would do)
but changes nothing.

It runs in a thread of the orchestrator, a process apart from the load generator (see
:mod:`turnstorm.loadgen.phase`), so its coturn CLI reads and relay starts never delay
the media pump.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from turnstorm.errors import TurnstormError
from turnstorm.loadgen.rotation import Rotation
from turnstorm.policy import Autoscaler, Decision, RelaySample, saturated
from turnstorm.relay.actuator import LocalPool

NOTE_EVERY = 5.0
"""Seconds between the fixed pool's "the policy would want N" notes."""


@dataclass
class PoolStatus:
    """What the progress display and the time series read (updated each evaluation)."""

    active: int = 0
    ready: int = 0
    draining: int = 0
    desired: int = 0
    allocations: int = 0
    cpu_percent: float | None = None
    """Mean CPU of the relays in rotation, percent of each relay's limit."""
    last_decision: str = ""
    max_active: int = 0
    min_active: int = 0


@dataclass
class ScaleEvent:
    time: float
    """Seconds since the phase started."""
    text: str


@dataclass
class Controller:
    pool: LocalPool
    autoscaler: Autoscaler
    rotation: Rotation
    interval: float
    time_scale: float
    apply: bool
    """False: the fixed pool (evaluate, change nothing)."""
    clock: Callable[[], float] = time.monotonic
    status: PoolStatus = field(default_factory=PoolStatus)
    events: list[ScaleEvent] = field(default_factory=list)
    relay_seconds: float = 0.0
    started_relays: int = 0
    removed_relays: int = 0
    drained_relays: int = 0
    error: BaseException | None = None
    on_new_relay: Callable[[int], None] | None = None
    """Called with the pid of every relay the controller starts."""
    fill: float | None = None
    """``placement: pack``: calls each relay is packed with (published with the
    rotation); None spreads them."""
    processes: int = 1
    """Locust processes the calls are split over (each packs its share of ``fill``)."""

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = self.clock()
        self._last = self._started
        self._last_note = -NOTE_EVERY
        self._full: frozenset[str] = frozenset()
        count = len(self.pool.relays)
        self.status.active = self.status.max_active = self.status.min_active = count
        self.status.desired = count

    def publish(self, full: frozenset[str] = frozenset()) -> None:
        """Hand the pool's rotation (start order) and placement to the load generator;
        ``full``: the relays (URIs) packing must skip."""
        self._full = full
        self.rotation.publish(self.pool.rotation(), self.fill, self.processes, full)

    def _saturated(self, samples: list[RelaySample]) -> frozenset[str]:
        if self.fill is None:
            return frozenset()
        targets = self.autoscaler.policy.targets
        return frozenset(self.pool.relays[s.name].uri for s in samples
                         if s.name in self.pool.relays and saturated(s, targets))

    def start(self) -> Controller:
        self._started = self._last = self.clock()
        self._thread = threading.Thread(target=self._run, name="turnstorm-autoscaler",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def finish_drains(self, timeout: float) -> bool:
        """Keep the loop running until no relay is draining (at most ``timeout`` seconds).

        When the load stops, its calls end, and the drains already started can finish:
        the next steps remove those relays. True when none is left draining."""
        deadline = self.clock() + timeout
        while self._draining() and self.clock() < deadline:
            if self._thread is None or not self._thread.is_alive() or self.error is not None:
                break
            self._stop.wait(0.1)
        return not self._draining()

    def _draining(self) -> bool:
        return any(relay.draining for relay in list(self.pool.relays.values()))

    def _run(self) -> None:
        while not self._stop.is_set():
            began = self.clock()
            try:
                self.step()
            except (TurnstormError, OSError) as exc:
                self.error = exc
                return
            except Exception as exc:  # a bug: report it, do not hang the run
                self.error = exc
                return
            self._stop.wait(max(0.05, self.interval - (self.clock() - began)))

    def step(self) -> Decision:
        now = self.clock()
        samples = self.pool.samples(now)
        decision = self.autoscaler.evaluate(now * self.time_scale, samples)
        if self.apply:
            done = self.pool.apply(decision, now * self.time_scale)
            self.started_relays += len(done["started"])
            for name in done["started"]:
                pid = self.pool.relays[name].pid
                if self.on_new_relay is not None and pid is not None:
                    self.on_new_relay(pid)
            self.removed_relays += len(done["removed"])
            self.drained_relays += len(done["drained"])
            full = self._saturated(samples)
            if any(done.values()) or full != self._full:
                self.publish(full)
            if any(done.values()):
                by_verb = cast(dict[str, list[str]], done)
                actions = ", ".join(f"{verb} {' '.join(names)}"
                                    for verb, names in by_verb.items() if names)
                self._event(now, f"{actions}: {decision.reason}")
            desired = decision.desired
        else:
            # The fixed pool never changes: show what the signals ask for, unthrottled by
            # the behavior (whose rate limits assume its decisions were carried out).
            wanted = max(decision.recommendations.values(), default=decision.active)
            desired = max(self.autoscaler.min_replicas,
                          min(self.autoscaler.max_replicas, wanted))
            if desired != self.status.desired and now - self._last_note >= NOTE_EVERY:
                self._last_note = now
                reason = decision.reason.split("; behavior")[0]
                self._event(now, f"fixed pool; the policy would want {desired}: {reason}")
        self._account(now, samples, decision, desired)
        return decision

    def _event(self, now: float, text: str) -> None:
        self.events.append(ScaleEvent(round(now - self._started, 3), text))
        self.status.last_decision = text

    def _account(self, now: float, samples: list[RelaySample], decision: Decision,
                 desired: int) -> None:
        relays = list(self.pool.relays.values())
        active = sum(1 for r in relays if not r.draining)
        draining = len(relays) - active
        self.relay_seconds += len(relays) * (now - self._last)
        self._last = now
        status = self.status
        status.active, status.draining = active, draining
        status.ready = sum(1 for s in samples if s.ready and not s.draining)
        status.desired = desired
        status.allocations = int(sum(s.allocations or 0 for s in samples))
        cpu = [s.signals.get("cpu_percent") for s in samples if not s.draining]
        known = [c for c in cpu if c is not None]
        status.cpu_percent = sum(known) / len(known) if known else None
        status.max_active = max(status.max_active, active)
        status.min_active = min(status.min_active, active)
        if not status.last_decision:
            status.last_decision = f"holding {active}: {decision.reason}"

    def summary(self) -> dict[str, Any]:
        return {
            "relay_seconds": round(self.relay_seconds, 1),
            "relays_started": self.started_relays,
            "relays_drained": self.drained_relays,
            "relays_removed": self.removed_relays,
            "relays_max": self.status.max_active,
            "relays_min": self.status.min_active,
            "events": [{"t": e.time, "what": e.text} for e in self.events],
        }

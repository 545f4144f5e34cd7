"""Load shapes (Locust ``LoadTestShape``) for relay storms, parameterized and bounded.

Every shape ends at ``duration`` seconds (``tick()`` returns None). Parameters are class
attributes, overridden by ``TURNSTORM_SHAPE_<PARAM>`` environment variables (for plain
``locust -f`` runs), overridden in turn by constructor keywords (``turnstorm storm
--shape NAME --shape-param KEY=VALUE``).

==================  ===========================================================================
``steady``          ``users`` from the start (spawned at ``spawn_rate``)
``ramp``            linear from ``start_users`` to ``end_users`` over ``ramp_seconds``, then hold
``reconnect-storm`` ``users`` steady; at ``storm_at`` a ``fraction`` of them drops at once (a
                    mapping-expiry or handover wave) and re-allocates within ``window`` seconds
``flash-crowd``     ``base_users``; at ``at`` it jumps to ``peak_users`` within ``rise_seconds``,
                    holds ``hold_seconds``, falls back to ``base_users``
``diurnal``         ``min_users`` .. ``max_users`` as a raised cosine with period ``period``
                    (a day compressed into seconds)
``retransmit-       ``base_users`` steady; at ``storm_at`` ``wave_users`` more arrive within
amplification``     ``window`` seconds (a relay restart, a mapping-expiry wave); a
                    ``no_backoff_fraction`` of all users are clients that retransmit every RTO
                    instead of doubling it (RFC 8489 section 6.2.1 violated)
==================  ===========================================================================

Retransmission amplification
----------------------------
RFC 8489 clients send a request at 0, RTO, 3 RTO, 7 RTO, ... (Rc = 7 sends, RTO 500 ms:
0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s). A client that does not back off sends at 0, RTO,
2 RTO, ... (0, 0.5, 1.0, ... 3.0 s): the same 7 packets squeezed into 3 s. When a relay
drops requests (overload, restart), every unanswered transaction multiplies the offered
load; :func:`amplification` gives the factor (sends per transaction within a stretch of
unresponsiveness), e.g. over a 3.5 s outage 3 sends (backoff) vs 7 (no backoff). The
no-backoff users are chosen by user number (evenly spread, exactly
``floor(n * no_backoff_fraction)`` among the first n users): ``turnstorm storm`` passes the
fraction to :class:`turnstorm.loadgen.config.LoadgenConfig.no_backoff_fraction`, and each
user's ``UdpClient`` then runs ``RetransmitPolicy(backoff=False)``. The users count their
retransmissions (``retransmits_backoff`` / ``retransmits_no_backoff`` counters).
"""

from __future__ import annotations

import math
import os
from typing import ClassVar

from locust import LoadTestShape

from turnstorm.loadgen.config import ConfigError
from turnstorm.proto.transaction import RetransmitPolicy

FAST_RATE = 1000.0
"""Spawn/stop rate for steps meant to be instantaneous (users per second)."""


class StormShape(LoadTestShape):
    """Base: parameter handling and the ``duration`` bound."""

    abstract = True
    name: ClassVar[str] = ""
    params: ClassVar[tuple[str, ...]] = ()
    duration: float = 60.0
    """Seconds until the test stops."""

    def __init__(self, **overrides: float) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        names = (*self.params, "duration")
        for key in names:
            text = os.environ.get(f"TURNSTORM_SHAPE_{key.upper()}")
            if text:
                setattr(self, key, _number(self.name, key, text))
        for key, value in overrides.items():
            if key not in names:
                raise ConfigError(f"shape {self.name} has no parameter {key!r}; it takes "
                                  f"{', '.join(names)}")
            setattr(self, key, _number(self.name, key, value))
        if self.duration <= 0:
            raise ConfigError(f"shape {self.name}: duration must be positive")
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for impossible parameters."""

    def tick(self) -> tuple[int, float] | None:
        run_time = float(self.get_run_time())  # type: ignore[no-untyped-call]
        if run_time >= self.duration:
            return None
        return self.at(run_time)

    def at(self, t: float) -> tuple[int, float]:
        """(users, spawn rate) at ``t`` seconds into the run."""
        raise NotImplementedError

    def describe(self) -> dict[str, float]:
        return {key: float(getattr(self, key)) for key in (*self.params, "duration")}


def _number(shape: str, key: str, value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"shape {shape}: {key} must be a number, not {value!r}") from None
    if number < 0 or not math.isfinite(number):
        raise ConfigError(f"shape {shape}: {key} must be a finite number >= 0")
    return number


class SteadyShape(StormShape):
    """A constant population."""

    name = "steady"
    params = ("users", "spawn_rate")
    users: float = 10
    spawn_rate: float = 10

    def at(self, t: float) -> tuple[int, float]:
        return int(self.users), self.spawn_rate or FAST_RATE


class RampShape(StormShape):
    """A linear ramp, then a plateau."""

    name = "ramp"
    params = ("start_users", "end_users", "ramp_seconds")
    start_users: float = 0
    end_users: float = 100
    ramp_seconds: float = 30

    def at(self, t: float) -> tuple[int, float]:
        if self.ramp_seconds == 0 or t >= self.ramp_seconds:
            return int(self.end_users), FAST_RATE
        users = self.start_users + (self.end_users - self.start_users) * t / self.ramp_seconds
        # twice the slope: the runner keeps up with the line between 1 s ticks
        rate = max(1.0, 2 * abs(self.end_users - self.start_users) / self.ramp_seconds)
        return round(users), rate


class ReconnectStormShape(StormShape):
    """Synchronized reconnect: ``fraction`` of ``users`` drop at ``storm_at`` (their
    allocations released or orphaned) and all of them come back within ``window``."""

    name = "reconnect-storm"
    params = ("users", "storm_at", "fraction", "window", "drop_seconds")
    users: float = 100
    storm_at: float = 20
    fraction: float = 0.5
    window: float = 5
    drop_seconds: float = 1
    """How long the dropped subscribers stay away before reconnecting."""

    def validate(self) -> None:
        if not 0 <= self.fraction <= 1:
            raise ConfigError(f"shape {self.name}: fraction must be between 0 and 1")
        if self.window <= 0:
            raise ConfigError(f"shape {self.name}: window must be positive")

    def at(self, t: float) -> tuple[int, float]:
        users = int(self.users)
        dropped = round(users * self.fraction)
        if t < self.storm_at:
            return users, FAST_RATE
        if t < self.storm_at + self.drop_seconds:
            return users - dropped, FAST_RATE
        return users, max(1.0, dropped / self.window)


class FlashCrowdShape(StormShape):
    """A sudden crowd (a televised event, an outage elsewhere) and its departure."""

    name = "flash-crowd"
    params = ("base_users", "peak_users", "at_seconds", "rise_seconds", "hold_seconds")
    base_users: float = 10
    peak_users: float = 200
    at_seconds: float = 10
    rise_seconds: float = 2
    hold_seconds: float = 20

    def at(self, t: float) -> tuple[int, float]:
        if t < self.at_seconds or t >= self.at_seconds + self.rise_seconds + self.hold_seconds:
            return int(self.base_users), FAST_RATE
        extra = self.peak_users - self.base_users
        rate = max(1.0, extra / self.rise_seconds) if self.rise_seconds else FAST_RATE
        return int(self.peak_users), rate


class DiurnalShape(StormShape):
    """A day in ``period`` seconds: ``min_users`` at t = 0, ``max_users`` at period / 2."""

    name = "diurnal"
    params = ("min_users", "max_users", "period")
    min_users: float = 5
    max_users: float = 100
    period: float = 120

    def validate(self) -> None:
        if self.period <= 0 or self.max_users < self.min_users:
            raise ConfigError(f"shape {self.name}: needs period > 0 and max_users >= min_users")

    def at(self, t: float) -> tuple[int, float]:
        span = self.max_users - self.min_users
        users = self.min_users + span * (1 - math.cos(2 * math.pi * t / self.period)) / 2
        # the steepest slope is span * pi / period users/s; twice that keeps up
        return round(users), max(1.0, 2 * math.pi * span / self.period)


class RetransmitAmplificationShape(StormShape):
    """A wave of new clients on top of a steady base, part of them not backing off."""

    name = "retransmit-amplification"
    params = ("base_users", "wave_users", "storm_at", "window", "no_backoff_fraction")
    base_users: float = 10
    wave_users: float = 100
    storm_at: float = 5
    window: float = 1
    """Seconds over which the wave's users start."""
    no_backoff_fraction: float = 0.5
    """Fraction of users (base and wave alike) that retransmit without exponential backoff."""

    def validate(self) -> None:
        if not 0 <= self.no_backoff_fraction <= 1:
            raise ConfigError(f"shape {self.name}: no_backoff_fraction must be between 0 and 1")
        if self.window <= 0:
            raise ConfigError(f"shape {self.name}: window must be positive")

    def at(self, t: float) -> tuple[int, float]:
        if t < self.storm_at:
            return int(self.base_users), FAST_RATE
        return int(self.base_users + self.wave_users), max(1.0, self.wave_users / self.window)


def send_times(policy: RetransmitPolicy) -> list[float]:
    """Offsets (seconds) at which one unanswered UDP request is sent under ``policy``."""
    times = [0.0]
    interval = policy.rto
    for _ in range(policy.rc - 1):
        times.append(times[-1] + interval)
        if policy.backoff:
            interval *= 2
    return times


def sends_within(policy: RetransmitPolicy, outage: float) -> int:
    """Datagrams one transaction sends while the server stays silent for ``outage`` s."""
    return sum(1 for at in send_times(policy) if at < outage)


def amplification(outage: float, no_backoff_fraction: float,
                  policy: RetransmitPolicy | None = None) -> float:
    """Offered load of a mixed population during an outage, relative to an all-compliant
    one (1.0 when every client backs off)."""
    compliant = policy or RetransmitPolicy()
    aggressive = RetransmitPolicy(compliant.rto, compliant.rc, compliant.rm, compliant.ti,
                                  backoff=False)
    base = sends_within(compliant, outage)
    mixed = ((1 - no_backoff_fraction) * base
             + no_backoff_fraction * sends_within(aggressive, outage))
    return mixed / base


def no_backoff(user_number: int, fraction: float) -> bool:
    """Whether user ``user_number`` is one of the non-backing-off clients: exactly
    ``floor(n * fraction)`` of users 0 .. n-1 are, spread evenly."""
    return math.floor((user_number + 1) * fraction) > math.floor(user_number * fraction)


SHAPES: dict[str, type[StormShape]] = {
    cls.name: cls
    for cls in (SteadyShape, RampShape, ReconnectStormShape, FlashCrowdShape, DiurnalShape,
                RetransmitAmplificationShape)
}


def make_shape(name: str, **params: float) -> StormShape:
    cls = SHAPES.get(name)
    if cls is None:
        raise ConfigError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return cls(**params)

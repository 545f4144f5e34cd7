"""The scaling policy: per-relay saturation samples in, desired relays and drains out.

Pure: no clocks (``now`` is passed in), no I/O. The same engine drives the kopf operator
and the local process actuator.

Baseline semantics are the HorizontalPodAutoscaler v2's:

* per signal, ``ratio = mean(value over ready relays) / target`` and
  ``desired = ceil(active * ratio)``, skipped while ``|ratio - 1| <= tolerance``;
* on scale-up, not-ready relays and relays missing the signal count as 0; on scale-down
  relays missing it count as exactly at target (so missing data never scales down);
* desired = max over signals; the scale-down stabilization window takes the highest
  recommendation of the window, the scale-up window the lowest;
* rate limits per period: up by max(percent of the period's starting count, pods),
  down by percent; then clamped to [min, max].

Storm extensions (``StormOptions``): project fast-growing allocation and binding signals
forward by the time a new relay takes to start, enforce relay-port capacity as a hard
floor (each allocation holds one relay port), and scale up at once when the kernel
drops UDP datagrams, at least ``UDP_DROP_MIN_RATE`` a second (an isolated drop, as when a
CPU-throttling stall fills the socket buffer once, is far inside any loss SLO and no
reason to start a relay).

Vertical resizing (``spec.scaling.vertical``): a relay's CPU, as a factor of
``spec.resources.cpu``, follows its allocations against the ``allocationsPerRelay``
target, in multiples of ``step``. A relay over the target gets more CPU at once (up to
``max_factor``): a resize takes effect in about a second where a new relay takes its
start-up time, so the relays that take a storm's first calls are not left overloaded,
with those calls stuck on them, while new relays start. A relay in rotation comes back to
1 when its allocations, plus the tolerance (at least 5 % and one allocation), fit under
the target again. A draining relay's CPU shrinks with its remaining calls (down to
``min_factor``), since it takes no new ones.

Scale-down never removes a relay with live allocations: the relays with the fewest
allocations are *drained* (taken out of rotation) and removed only when their
allocations reach zero or the drain deadline passes.

Placement (``spec.scaling.placement``): with ``pack``, new allocations fill the oldest
relays up to the ``allocationsPerRelay`` target before the next relay takes any. A
drained relay can only leave when its last call ends, so every relay that takes calls
costs at least the length of its longest call: packing keeps the relays started ahead of
a storm empty until they are really needed (removed at no cost when they are not), and
sends the calls that come after a storm to the relays that stay, not to those about to
drain. A relay resized above 100 % counts as full (:func:`saturated`) until its calls
bring it back: refilled to the target, it would keep its extra CPU for good. The local
mode's balancer packs call by call; the operator approximates it with
:func:`open_relays` (relays outside that set wait out of the Service, label
``turnstorm.io/rotation=standby``, from the evaluation after they become ready).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import TypedDict

from turnstorm.signals import SIGNALS
from turnstorm.spec import ScalingPolicy

RATE_SIGNALS = ("allocations", "binding_rate")
"""Signals whose rate of change is projected forward during storms."""

UDP_DROP_MIN_RATE = 1.0
"""Kernel UDP drops (datagrams/s, a relay's counter rate over the evaluation interval)
below which a relay counts as not dropping: for the storm's scale-up and for ``pack``."""


@dataclass
class RelaySample:
    """What is known about one relay at one instant."""

    name: str
    ready: bool = True
    signals: dict[str, float | None] = field(default_factory=dict)
    """Signal name -> value; None or absent means missing."""
    draining: bool = False
    drain_started: float | None = None
    port_capacity: int | None = None
    """Relay ports of this relay (allocations it can hold at most)."""
    cpu_factor: float = 1.0
    """The relay's CPU now, as a factor of the pool's ``spec.resources.cpu``."""

    @property
    def allocations(self) -> float | None:
        return self.signals.get("allocations")


@dataclass
class StormOptions:
    """How the policy departs from plain HPA to get ahead of a storm."""

    enabled: bool = True
    """False gives pure HPA v2 behaviour (the baseline)."""
    lookahead_seconds: float = 30.0
    """Project rate signals this far ahead: about the time a new relay needs to serve."""
    slope_window_seconds: float = 30.0
    """History used to estimate each signal's slope."""
    port_headroom: float = 0.9
    """Use at most this share of each relay's ports before adding relays."""
    udp_drop_step: int = 1
    """Relays added at once when the kernel drops datagrams, no other signal asks for
    more and no relay is already starting."""

    @classmethod
    def from_policy(cls, policy: ScalingPolicy) -> StormOptions:
        """The options a TurnPool's ``spec.scaling.storm`` sets."""
        return cls(enabled=policy.storm_enabled, lookahead_seconds=policy.lookahead_seconds,
                   slope_window_seconds=policy.slope_window_seconds,
                   port_headroom=policy.port_headroom)


@dataclass
class Decision:
    """One evaluation's outcome and its explanation."""

    desired: int
    """Relays that should be in rotation."""
    active: int
    """Relays in rotation now (ready or starting, not draining)."""
    ratios: dict[str, float]
    """Signal -> mean/target over the active relays."""
    recommendations: dict[str, int]
    """Signal -> relays it asks for."""
    limiting_signal: str | None
    drain: list[str]
    """Relays to take out of rotation now."""
    undrain: list[str]
    """Draining relays to put back in rotation (cheaper than starting new ones)."""
    remove: list[str]
    """Drained relays to delete now (no allocations left, or deadline passed)."""
    reason: str
    resize: dict[str, float] = field(default_factory=dict)
    """Relay -> its new CPU factor (vertical resizing); only relays whose factor changes."""

    @property
    def scale_up(self) -> int:
        return max(0, self.desired - self.active - len(self.undrain))


class Applied(TypedDict):
    """What an actuator did with a :class:`Decision`, relay names per action: the result
    of the local pool's and of the operator's actuator alike."""

    undrained: list[str]
    drained: list[str]
    removed: list[str]
    started: list[str]
    """Relays started; on a cluster the Deployment's new pods, not named yet
    (``(pending-N)``)."""
    resized: list[str]


class Autoscaler:
    """Stateful across evaluations (recommendation history, scale events); pure."""

    def __init__(
        self,
        policy: ScalingPolicy,
        min_replicas: int,
        max_replicas: int,
        storm: StormOptions | None = None,
    ) -> None:
        self.policy = policy
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.storm = storm or StormOptions()
        self._recommendations: deque[tuple[float, int]] = deque()
        self._scale_events: deque[tuple[float, int]] = deque()
        self._history: dict[str, deque[tuple[float, dict[str, float]]]] = {}
        self._first: tuple[float, int] | None = None

    # -- per-signal recommendations ---------------------------------------------------------

    def _targets(self) -> dict[str, float]:
        return {SIGNALS[name]: value for name, value in self.policy.targets.items()
                if name in SIGNALS}

    def _record(self, now: float, signal: str, values: dict[str, float]) -> None:
        history = self._history.setdefault(signal, deque())
        history.append((now, values))
        while history and history[0][0] < now - self.storm.slope_window_seconds:
            history.popleft()

    def _slope(self, signal: str) -> float:
        """The signal's growth per second over the slope window, summed relay by relay:
        each relay from its first sample in the window to its last. A relay that skips a
        scrape, or leaves and rejoins the rotation (drained, then undrained), adds no
        phantom growth when it reports again; a new relay adds what it gained since it
        first reported (it starts empty)."""
        history = self._history.get(signal)
        if not history or len(history) < 2:
            return 0.0
        t0, t1 = history[0][0], history[-1][0]
        if t1 <= t0:
            return 0.0
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        for _, values in history:
            for name, value in values.items():
                first.setdefault(name, value)
                last[name] = value
        return sum(last[name] - first[name] for name in last) / (t1 - t0)

    def _signal_recommendation(
        self, now: float, signal: str, target: float, active: list[RelaySample]
    ) -> tuple[float, int] | None:
        """(ratio, relays wanted) for one signal, or None when no relay reports it."""
        # a NaN or infinite sample (a broken scrape) counts as missing, never as a load
        reporting = [r for r in active if r.ready and r.signals.get(signal) is not None
                     and math.isfinite(float(r.signals[signal] or 0.0))]
        if not reporting:
            return None
        count = len(active)
        values = [float(r.signals[signal] or 0.0) for r in reporting]
        total = sum(values)
        if self.storm.enabled and signal in RATE_SIGNALS:
            self._record(now, signal, {r.name: v for r, v in zip(reporting, values,
                                                                  strict=True)})
            slope = self._slope(signal)
            if slope > 0:
                total += slope * self.storm.lookahead_seconds
        target = max(target, 1e-9)
        ratio = (total / len(reporting)) / target
        if ratio > 1.0:
            # Scale-up: unready relays and relays missing the signal count as 0.
            ratio_all = total / count / target
            if abs(ratio_all - 1.0) <= self.policy.tolerance or ratio_all <= 1.0:
                return ratio_all, count
            return ratio_all, math.ceil(count * ratio_all)
        # Scale-down: relays missing the signal count as exactly at target.
        missing = count - len(reporting)
        ratio_down = (total + missing * target) / count / target
        if abs(ratio_down - 1.0) <= self.policy.tolerance:
            return ratio_down, count
        return ratio_down, math.ceil(count * ratio_down)

    # -- evaluation ---------------------------------------------------------------------

    def evaluate(self, now: float, relays: list[RelaySample]) -> Decision:
        active = [r for r in relays if not r.draining]
        draining = [r for r in relays if r.draining]
        count = len(active)
        ratios: dict[str, float] = {}
        recs: dict[str, int] = {}
        unreported: list[str] = []
        for signal, target in self._targets().items():
            result = self._signal_recommendation(now, signal, target, active)
            if result is not None:
                ratios[signal], recs[signal] = result
            else:
                unreported.append(signal)
        storm_floor = self._storm_floor(active)
        if storm_floor is not None:
            recs[storm_floor[0]] = storm_floor[1]
        if not recs:
            recommendation, limiting = count, None
            reason = "no signal data: holding size"
        else:
            limiting = max(recs, key=lambda s: (recs[s], ratios.get(s, 0.0)))
            recommendation = recs[limiting]
            reason = f"{limiting} asks for {recommendation}"
            if limiting in ratios:
                reason += f" (ratio {ratios[limiting]:.2f})"
            if unreported and recommendation < count:
                # as HPA: while any target's signal is missing, never scale down
                recommendation = count
                reason += f"; no data for {', '.join(unreported)}: holding size"
        desired = self._stabilize(now, recommendation, count)
        desired = self._rate_limit(now, desired, count)
        desired = max(self.min_replicas, min(self.max_replicas, desired))
        if desired != recommendation:
            reason += f"; behavior limits it to {desired}"
        if desired != count:
            self._scale_events.append((now, desired - count))
        horizon = max(self.policy.scale_up.period_seconds, self.policy.scale_down.period_seconds)
        while self._scale_events and self._scale_events[0][0] <= now - horizon:
            self._scale_events.popleft()

        drain: list[str] = []
        undrain: list[str] = []
        if desired < count:
            # Fewest allocations first; unknown counts go last (never guess them empty).
            order = sorted(active, key=lambda r: (r.allocations is None,
                                                  r.allocations or 0.0, r.name))
            drain = [r.name for r in order[:count - desired]]
        elif desired > count and draining:
            order = sorted(draining, key=lambda r: -(r.allocations or 0.0))
            undrain = [r.name for r in order[:desired - count]]
        remove = [
            r.name for r in draining if r.name not in undrain and (
                r.allocations == 0
                or (r.drain_started is not None
                    and now - r.drain_started >= self.policy.drain_deadline_seconds))
        ]
        resize = self._resize(relays, set(undrain), set(drain), set(remove))
        return Decision(desired=desired, active=count, ratios=ratios, recommendations=recs,
                        limiting_signal=limiting, drain=drain, undrain=undrain,
                        remove=remove, reason=reason, resize=resize)

    def _resize(self, relays: list[RelaySample], undrain: set[str], drain: set[str],
                remove: set[str]) -> dict[str, float]:
        """New CPU factors (see the module docstring). Missing data changes nothing,
        except that a relay in rotation below 1 comes back to 1 whatever its data, and
        with vertical resizing off every resized relay comes back to 1."""
        vertical = self.policy.vertical
        target = self.policy.targets.get("allocationsPerRelay")
        enabled = vertical.enabled and target is not None and target > 0
        step = vertical.step
        # at least one allocation's or 5 %'s worth of hysteresis, whatever the tolerance
        hysteresis = max(self.policy.tolerance, 0.05, 1 / target if enabled and target else 0)
        out: dict[str, float] = {}
        for relay in relays:
            if not relay.ready or relay.name in remove:
                continue
            current = relay.cpu_factor
            in_rotation = (not relay.draining or relay.name in undrain) and (
                relay.name not in drain)
            allocations = relay.allocations
            if not enabled or allocations is None or not math.isfinite(allocations):
                if current != 1.0 and (not enabled or (in_rotation and current < 1.0)):
                    out[relay.name] = 1.0
                continue
            assert target is not None
            floor = 1.0 if in_rotation else vertical.min_factor

            def size(need: float, floor: float = floor) -> float:
                # a multiple of the step, but down to the floor when the need is under it
                return min(vertical.max_factor,
                           floor if need <= floor else _steps(need, step))

            need = allocations / target
            up = size(need)
            if up > current:
                out[relay.name] = up
                continue
            # Down only once the allocations fit, with the hysteresis, under a lower step.
            down = size(need * (1 + hysteresis))
            if down < current:
                out[relay.name] = down
        return out

    def _storm_floor(self, active: list[RelaySample]) -> tuple[str, int] | None:
        """Hard floors the storm options add: port capacity and UDP drops."""
        if not self.storm.enabled or not active:
            return None
        floor: tuple[str, int] | None = None
        capacities = [r.port_capacity for r in active if r.port_capacity]
        allocations = [r.allocations for r in active if r.allocations is not None]
        if capacities and allocations:
            per_relay = min(capacities) * self.storm.port_headroom
            needed = math.ceil(sum(allocations) / per_relay)
            if needed > len(active):
                floor = ("relay_ports", needed)
        drops = [r.signals.get("udp_rcvbuf_errors") for r in active]
        starting = any(not r.ready for r in active)
        # Relays already starting are the answer to drops seen meanwhile: evaluated every
        # second, the step would otherwise add a relay per second until one is ready.
        if ("udp_rcvbuf_errors" not in self._targets() and not starting
                and any(dropping(d) for d in drops)):
            needed = len(active) + self.storm.udp_drop_step
            if floor is None or needed > floor[1]:
                floor = ("udp_drops", needed)
        return floor

    def _stabilize(self, now: float, recommendation: int, count: int) -> int:
        up = self.policy.scale_up.stabilization_window_seconds
        down = self.policy.scale_down.stabilization_window_seconds
        if self._first is None:
            # First evaluation (e.g. after an operator restart): behave as if the current
            # size had been recommended so far, so nothing shrinks before a full window.
            self._first = (now, count)
        self._recommendations.append((now, recommendation))
        horizon = max(up, down)
        while self._recommendations and self._recommendations[0][0] < now - horizon:
            self._recommendations.popleft()
        up_values = [v for t, v in self._recommendations if t >= now - up]
        down_values = [v for t, v in self._recommendations if t >= now - down]
        if self._first[0] > now - down:
            down_values.append(self._first[1])
        if recommendation > count:
            return max(count, min(up_values))
        if recommendation < count:
            return min(count, max(down_values))
        return count

    def _rate_limit(self, now: float, desired: int, count: int) -> int:
        up = self.policy.scale_up
        down = self.policy.scale_down
        if desired > count:
            changed = sum(d for t, d in self._scale_events if t > now - up.period_seconds and d > 0)
            start = count - changed
            limit = max(math.ceil(start * (1 + up.percent / 100)), start + up.pods)
            return max(count, min(desired, limit))
        if desired < count:
            changed = sum(d for t, d in self._scale_events
                          if t > now - down.period_seconds and d < 0)
            start = count - changed
            limit = math.floor(start * (1 - down.percent / 100))
            if down.pods:
                limit = max(limit, start - down.pods)
            return min(count, max(desired, limit))
        return desired


def _steps(value: float, step: float) -> float:
    """``value`` rounded up to a multiple of ``step`` (a hair of float error forgiven)."""
    return round(math.ceil(value / step - 1e-9) * step, 6)


def dropping(rate: float | None) -> bool:
    """Whether a UDP drop rate (datagrams/s) is one: at least ``UDP_DROP_MIN_RATE``."""
    return rate is not None and rate >= UDP_DROP_MIN_RATE


def saturated(relay: RelaySample, targets: dict[str, float]) -> bool:
    """A relay that should take no more calls now, whatever its allocation count: a
    signal other than allocations at or over its target (``SIGNALS`` names), the kernel
    dropping its datagrams, or its CPU resized above the pool's (vertical resizing: it
    got the extra CPU for calls over the target, and comes back to 100 % only once calls
    end, so ``pack`` must not refill it to the target)."""
    for name, target in targets.items():
        signal = SIGNALS.get(name)
        if signal is None or signal == "allocations":
            continue
        value = relay.signals.get(signal)
        if value is not None and value >= target:
            return True
    return dropping(relay.signals.get("udp_rcvbuf_errors")) or relay.cpu_factor > 1.0


def open_relays(relays: list[RelaySample], fill: float, headroom: float,
                targets: dict[str, float] | None = None) -> list[str]:
    """``pack`` placement through rotation: the relays new allocations may go to.

    ``relays`` come oldest first. The answer is the oldest ready, non-draining relays
    below ``fill`` allocations and not :func:`saturated` (on ``targets``, the policy's),
    taken until their free room (``fill`` minus allocations) adds up to
    ``headroom * fill``. When all of them together have less room than that, or a
    relay's allocations are unknown, every ready non-draining relay is open (never
    guess: a relay kept out on missing data could leave the others overloaded).
    """
    ready = [r for r in relays if r.ready and not r.draining]
    if any(r.allocations is None for r in ready):
        return [r.name for r in ready]
    wanted = headroom * fill
    chosen: list[str] = []
    room = 0.0
    for relay in ready:
        allocations = relay.allocations or 0.0
        if allocations >= fill or saturated(relay, targets or {}):
            continue
        chosen.append(relay.name)
        room += fill - allocations
        if room >= wanted:
            return chosen
    return [r.name for r in ready]

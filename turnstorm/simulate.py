"""A deterministic trace-replay simulator of a relay pool under an autoscaling policy.

Pure: explicit one-second time steps, traces generated from a seed, no I/O. The relays'
capacity comes from a :class:`RelayModel` calibrated on real CPU-capped coturn (see
``bench/autoscale.py``); the policy is the real :class:`~turnstorm.policy.Autoscaler`.

**Trace.** A list of sessions (arrival second, duration, relayed packets/s). Generators:
:func:`reconnect_storm` (a background of calls, then ``share`` of ``subscribers``
re-allocate within ``window`` seconds) and :func:`flash_crowd` (arrivals ramp up to a
plateau, then back down). Call durations are log-normal, capped at ``max_duration``.

**Each second** (in this order):

1. relays whose start-up delay has passed become ready (in rotation);
2. sessions whose duration is over end; sessions on a relay losing more than
   ``restart_loss`` of its packets for ``restart_after`` seconds re-allocate (an ICE
   restart) on the least-loaded relay in rotation, when that relay is less loaded;
3. arriving sessions are placed on the least-loaded ready relay in rotation (rejected
   when there is none), or, for a setup with ``pack_fill`` (``placement: pack``), on the
   oldest relay in rotation with fewer than ``pack_fill`` sessions (least-loaded when all
   are that full);
4. each relay's offered load ``lambda`` (relayed packets/s) gives its utilization
   ``rho = lambda / mu``, loss, p99 RTT and CPU from the queueing model below;
5. the pool's second violates the SLO when its packet-weighted p99 RTT exceeds
   ``slo_rtt_ms`` or its packet-weighted loss exceeds ``slo_loss``;
6. every ``interval`` seconds the policy evaluates the relays' samples and its decision
   is applied: new relays start (ready after ``startup`` seconds); scale-in either drains
   (out of rotation, removed when empty or at the drain deadline, the sessions left then
   are cut) or, like a Deployment/StatefulSet scaled by HPA/KEDA, deletes the newest
   relays at once, cutting their sessions.

**Queueing model** (one relay = one single-server queue, M/M/1/K):

* service rate ``mu`` = the saturation throughput measured on a CPU-capped coturn
  (relayed packets/s when overdriven), buffer ``K = mu * max_delay`` packets where
  ``max_delay`` is the p99 RTT measured when overdriven (the socket buffer full);
* loss = the M/M/1/K blocking probability ``(1 - rho) rho^K / (1 - rho^(K+1))``: about 0
  below saturation, ``1 - 1/rho`` above it (the excess is dropped);
* p99 RTT = ``base + a * rho / (1 - rho)`` (the M/M/1 waiting-time shape), capped at
  ``max_delay``; ``base`` is the p99 measured at light load and ``a`` is fitted so the
  curve passes through the highest measured load that met the SLO (the knee);
* CPU percent of the limit = ``min(100, lambda * cpu_per_packet / cpu_limit)``, the
  per-packet CPU measured at the knee; HPA reads it averaged over ``cpu_window`` seconds,
  as metrics-server does.

**Vertical resizing** (``spec.scaling.vertical``): a relay resized to ``f`` times the
pool's CPU serves ``mu * f`` packets/s for ``f <= 1`` (measured: a smaller CPU cap gives
at least its share of the throughput) and ``mu * (1 + (f - 1) * m)`` above 1, where
``m`` (``RelayModel.burst_marginal``, between 0 and 1) is the throughput each extra unit
of CPU adds, measured by the bench on a relay resized in place: more CPU never makes a
relay slower, and never more than linearly faster.
Resizes apply at the next second. ``replica_seconds`` counts every relay at its CPU
factor (a relay at 150 % counts 1.5, one shrunk to 25 % counts 0.25), so that CPU given
or taken by resizing is paid for; ``pod_seconds`` counts relays whatever their size.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from turnstorm.policy import Autoscaler, Decision, RelaySample

MEDIA_PPS = 50
"""Packets/s each way of one call (20 ms audio frames)."""
SESSION_RELAYED_PPS = 2 * MEDIA_PPS
"""Packets/s one call puts through its relay (both directions)."""


@dataclass(frozen=True)
class RelayModel:
    """One relay's capacity and delay curve (see the module docstring)."""

    capacity_pps: float
    """``mu``: relayed packets/s at saturation."""
    cpu_per_packet: float
    """CPU seconds per relayed packet."""
    cpu_limit: float
    """Cores the relay is capped at."""
    base_p99_ms: float
    queue_ms: float
    """``a`` of the delay curve."""
    max_p99_ms: float
    burst_marginal: float = 1.0
    """Throughput a unit of CPU above the relay's own adds, relative to a unit of its own
    (0-1)."""

    @classmethod
    def fit(cls, *, capacity_pps: float, cpu_per_packet: float, cpu_limit: float,
            base_p99_ms: float, knee_pps: float, knee_p99_ms: float,
            max_p99_ms: float) -> RelayModel:
        """Anchor the curve to calibration points."""
        rho = min(knee_pps / capacity_pps, 0.99)
        queue = max(knee_p99_ms - base_p99_ms, 1.0) * (1 - rho) / rho
        return cls(capacity_pps, cpu_per_packet, cpu_limit, base_p99_ms, queue,
                   max(max_p99_ms, knee_p99_ms))

    @property
    def buffer_packets(self) -> int:
        return max(1, round(self.capacity_pps * self.max_p99_ms / 1000))

    def utilization(self, pps: float) -> float:
        return pps / self.capacity_pps

    def loss(self, pps: float) -> float:
        rho = self.utilization(pps)
        k = self.buffer_packets
        if rho <= 0:
            return 0.0
        if abs(rho - 1) < 1e-12:
            return 1 / (k + 1)
        if rho < 1:
            return (1 - rho) * rho ** k / (1 - rho ** (k + 1))
        return (rho - 1) / rho / (1 - rho ** -(k + 1))

    def p99_ms(self, pps: float) -> float:
        rho = self.utilization(pps)
        if rho >= 1:
            return self.max_p99_ms
        return min(self.max_p99_ms, self.base_p99_ms + self.queue_ms * rho / (1 - rho))

    def cpu_percent(self, pps: float) -> float:
        return min(100.0, 100.0 * pps * self.cpu_per_packet / self.cpu_limit)

    def equivalent_load(self, pps: float, factor: float) -> float:
        """The load a relay at its pool's CPU would see for ``pps`` on a relay resized to
        ``factor`` (loss, RTT and CPU percent of the new limit follow from it)."""
        if factor <= 1:
            return pps / factor
        return pps / (1 + (factor - 1) * min(1.0, max(0.0, self.burst_marginal)))

    def sessions_at(self, rho: float, pps: float = SESSION_RELAYED_PPS) -> float:
        return rho * self.capacity_pps / pps

    def slo_sessions(self, rtt_ms: float = 150.0, loss: float = 0.01,
                     pps: float = SESSION_RELAYED_PPS) -> int:
        """The most calls one relay carries inside the SLO, per the model."""
        n = 0
        while self.p99_ms((n + 1) * pps) <= rtt_ms and self.loss((n + 1) * pps) <= loss:
            n += 1
        return n


# -- traces -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    arrival: int
    duration: int
    pps: float = SESSION_RELAYED_PPS


@dataclass
class Trace:
    name: str
    sessions: list[Session]
    length: int
    storm_start: int
    description: str = ""


def _duration(rng: random.Random, median: float, cap: int) -> int:
    return max(5, min(cap, round(rng.lognormvariate(math.log(median), 0.8))))


def _background(rng: random.Random, calls: int, median: float, cap: int, length: int
                ) -> list[Session]:
    """A steady state of about ``calls`` concurrent calls: Poisson arrivals, some of the
    calls already up at t=0."""
    mean = median * math.exp(0.8 ** 2 / 2)
    rate = calls / mean
    sessions = [Session(0, max(1, round(rng.uniform(0, 1) * _duration(rng, median, cap))))
                for _ in range(calls)]
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= length:
            return sessions
        sessions.append(Session(int(t), _duration(rng, median, cap)))


def reconnect_storm(seed: int, *, subscribers: int = 4000, share: float = 0.25,
                    window: int = 30, start: int = 60, background: int = 300,
                    median: float = 120.0, max_duration: int = 600,
                    length: int = 1200) -> Trace:
    """``share`` of ``subscribers`` re-allocate within ``window`` s from ``start`` (a NAT
    mapping expiry or handover wave), on top of ``background`` concurrent calls."""
    rng = random.Random(seed)
    sessions = _background(rng, background, median, max_duration, length)
    for _ in range(round(subscribers * share)):
        sessions.append(Session(start + int(rng.uniform(0, window)),
                                _duration(rng, median, max_duration)))
    sessions.sort(key=lambda s: s.arrival)
    return Trace("reconnect storm", sessions, length, start,
                 f"{share:.0%} of {subscribers} subscribers re-allocate within {window} s "
                 f"at t={start} s over {background} calls")


def flash_crowd(seed: int, *, peak_rate: float = 8.0, ramp: int = 60, hold: int = 120,
                start: int = 60, background: int = 300, median: float = 120.0,
                max_duration: int = 600, length: int = 1200) -> Trace:
    """New calls ramp linearly up to ``peak_rate``/s over ``ramp`` s, hold, ramp down."""
    rng = random.Random(seed)
    sessions = _background(rng, background, median, max_duration, length)
    end = start + 2 * ramp + hold
    t = float(start)
    while t < end:
        if t < start + ramp:
            rate = peak_rate * (t - start) / ramp
        elif t < start + ramp + hold:
            rate = peak_rate
        else:
            rate = peak_rate * (end - t) / ramp
        # Thinning: candidate arrivals at peak rate, kept with probability rate/peak.
        t += rng.expovariate(peak_rate)
        if t < end and rng.random() * peak_rate < rate:
            sessions.append(Session(int(t), _duration(rng, median, max_duration)))
    sessions.sort(key=lambda s: s.arrival)
    return Trace("flash crowd", sessions, length, start,
                 f"arrivals ramp to {peak_rate:g}/s over {ramp} s, hold {hold} s, at "
                 f"t={start} s over {background} calls")


# -- the pool ---------------------------------------------------------------------------------


@dataclass
class PolicySetup:
    """How a policy is run: the autoscaler, how often, and how it scales in."""

    name: str
    make: Callable[[], Autoscaler]
    interval: int = 15
    """Seconds between evaluations (HPA's sync period is 15 s)."""
    drain: bool = True
    """True: drain then remove; False: delete the newest relays at once (HPA/KEDA)."""
    cpu_window: int = 15
    """CPU is read averaged over this many seconds (metrics-server's resolution)."""
    pack_fill: float | None = None
    """``placement: pack``: sessions fill the oldest relays up to this many each (the
    allocation target); None spreads them (least-loaded, as a Service balances)."""
    description: str = ""


@dataclass
class SimRelay:
    name: str
    index: int
    ready_at: int
    sessions: dict[int, int] = field(default_factory=dict)
    """Session id -> end second."""
    draining: bool = False
    drain_started: float | None = None
    lossy_for: int = 0
    cpu: deque[float] = field(default_factory=lambda: deque(maxlen=60))
    last_load: float = 0.0
    last_loss: float = 0.0
    last_p99: float = 0.0
    cpu_factor: float = 1.0

    def load(self, pps: dict[int, float]) -> float:
        return sum(pps[s] for s in self.sessions)


@dataclass
class Second:
    t: int
    relays: int
    ready: int
    sessions: int
    p99_ms: float
    loss: float
    violating: bool
    cpu: float = 0.0
    """The relays' CPU factors added up (``relays`` without vertical resizing)."""


@dataclass
class SimResult:
    policy: str
    trace: str
    seconds: list[Second]
    replica_seconds: float
    """Relay-seconds, each relay counted at its CPU factor (1 without vertical resizing)."""
    slo_violation_seconds: int
    allocations_cut: int
    rejected: int
    restarts: int
    recover_seconds: int
    """From the storm's start until the SLO holds for good (0: never violated)."""
    peak_relays: int
    pod_seconds: int
    """Relay-seconds whatever each relay's CPU."""
    resizes: int
    events: list[str]
    uncut_replica_seconds: float = 0
    """``replica_seconds`` plus, for every relay deleted with calls on it, the seconds it
    would have had to live for those calls to end: what the same decisions cost without
    cutting a call (equal to ``replica_seconds`` for a policy that never cuts)."""


@dataclass
class SimConfig:
    startup: int = 15
    """Seconds from a relay's creation until it serves (image pull, start, readiness)."""
    min_replicas: int = 1
    max_replicas: int = 20
    initial: int = 2
    slo_rtt_ms: float = 150.0
    slo_loss: float = 0.01
    restart_loss: float = 0.05
    restart_after: int = 3
    restart_share: float = 0.2
    """Share of a lossy relay's sessions that restart per second."""
    port_capacity: int = 1000


def pool_p99(parts: list[tuple[float, float]]) -> float:
    """p99 of a mixture of relays given (packets, p99) each: the smallest p99 such that
    the relays at or below it carry at least 99 % of the packets (an upper bound)."""
    total = sum(w for w, _ in parts)
    if total <= 0:
        return 0.0
    acc = 0.0
    for weight, p99 in sorted(parts, key=lambda x: x[1]):
        acc += weight
        if acc >= 0.99 * total:
            return p99
    return max(p for _, p in parts)


def simulate(trace: Trace, model: RelayModel, setup: PolicySetup,
             config: SimConfig | None = None) -> SimResult:
    cfg = config or SimConfig()
    scaler = setup.make()
    relays: dict[str, SimRelay] = {}
    counter = 0
    events: list[str] = []

    def start(ready_at: int) -> None:
        nonlocal counter
        name = f"relay-{counter}"
        relays[name] = SimRelay(name, counter, ready_at)
        counter += 1

    for _ in range(cfg.initial):
        start(0)
    pps: dict[int, float] = {}
    arrivals: dict[int, list[int]] = {}
    for sid, session in enumerate(trace.sessions):
        arrivals.setdefault(session.arrival, []).append(sid)
        pps[sid] = session.pps
    cut = rejected = restarts = pod_seconds = resizes = 0
    replica_seconds = 0.0
    shadow: list[int] = []
    """Seconds deleted relays would have lived until their last call ended."""
    seconds: list[Second] = []

    def rotation(now: int) -> list[SimRelay]:
        return [r for r in relays.values() if r.ready_at <= now and not r.draining]

    def place(sid: int, end: int, now: int) -> bool:
        candidates = rotation(now)
        if not candidates:
            return False
        fill = setup.pack_fill
        if fill is not None:
            # dict order is start order: the oldest relay with room first.
            for relay in candidates:
                if len(relay.sessions) < fill:
                    relay.sessions[sid] = end
                    return True
        target = min(candidates, key=lambda r: (r.load(pps), r.index))
        target.sessions[sid] = end
        return True

    for now in range(trace.length):
        # 2. departures and ICE restarts
        for relay in relays.values():
            for sid in [s for s, end in relay.sessions.items() if end <= now]:
                del relay.sessions[sid]
        for relay in list(relays.values()):
            if relay.lossy_for < cfg.restart_after or not relay.sessions:
                continue
            ready = [r for r in rotation(now) if r is not relay]
            if not ready:
                continue
            best = min(ready, key=lambda r: (r.load(pps), r.index))
            movers = sorted(relay.sessions)[:math.ceil(len(relay.sessions) * cfg.restart_share)]
            for sid in movers:
                if best.load(pps) + pps[sid] >= relay.load(pps) - pps[sid]:
                    break
                best.sessions[sid] = relay.sessions.pop(sid)
                restarts += 1
        # 3. arrivals
        for sid in arrivals.get(now, []):
            if not place(sid, now + trace.sessions[sid].duration, now):
                rejected += 1
        # 4-5. relay state and the pool's SLO
        parts: list[tuple[float, float]] = []
        lost = packets = 0.0
        for relay in relays.values():
            load = relay.last_load = relay.load(pps)
            equivalent = model.equivalent_load(load, relay.cpu_factor)
            relay.last_loss = model.loss(equivalent)
            relay.last_p99 = model.p99_ms(equivalent) if load > 0 else 0.0
            relay.cpu.append(model.cpu_percent(equivalent) if relay.ready_at <= now else 0.0)
            relay.lossy_for = relay.lossy_for + 1 if relay.last_loss > cfg.restart_loss else 0
            if load > 0:
                parts.append((load, relay.last_p99))
                lost += load * relay.last_loss
                packets += load
        p99 = pool_p99(parts)
        loss = lost / packets if packets else 0.0
        violating = p99 > cfg.slo_rtt_ms or loss > cfg.slo_loss
        cpu = sum(r.cpu_factor for r in relays.values())
        replica_seconds += cpu
        pod_seconds += len(relays)
        seconds.append(Second(now, len(relays), len(rotation(now)),
                              sum(len(r.sessions) for r in relays.values()), p99, loss,
                              violating, cpu))
        # 6. the policy
        if now % setup.interval == 0:
            samples = [_sample(r, now, model, setup, cfg) for r in relays.values()]
            decision = scaler.evaluate(float(now), samples)
            cut += _apply(decision, relays, now, setup, cfg, start, events, shadow)
            for name, factor in decision.resize.items():
                if name in relays:
                    relays[name].cpu_factor = factor
                    resizes += 1

    violating_after = [s.t for s in seconds if s.violating and s.t >= trace.storm_start]
    recover = violating_after[-1] + 1 - trace.storm_start if violating_after else 0
    return SimResult(
        policy=setup.name, trace=trace.name, seconds=seconds,
        replica_seconds=replica_seconds,
        slo_violation_seconds=sum(1 for s in seconds if s.violating),
        allocations_cut=cut, rejected=rejected, restarts=restarts, recover_seconds=recover,
        peak_relays=max(s.relays for s in seconds), events=events,
        uncut_replica_seconds=replica_seconds + sum(shadow), pod_seconds=pod_seconds,
        resizes=resizes)


def _sample(relay: SimRelay, now: int, model: RelayModel, setup: PolicySetup,
            cfg: SimConfig) -> RelaySample:
    ready = relay.ready_at <= now
    if not ready:
        return RelaySample(relay.name, ready=False, port_capacity=cfg.port_capacity)
    window = list(relay.cpu)[-setup.cpu_window:]
    signals: dict[str, float | None] = {
        "allocations": float(len(relay.sessions)),
        "cpu_percent": sum(window) / len(window) if window else 0.0,
        "udp_rcvbuf_errors": relay.last_loss * relay.last_load,
        "probe_rtt_ms": relay.last_p99,
    }
    return RelaySample(relay.name, ready=True, signals=signals, draining=relay.draining,
                       drain_started=relay.drain_started, port_capacity=cfg.port_capacity,
                       cpu_factor=relay.cpu_factor)


def _apply(decision: Decision, relays: dict[str, SimRelay], now: int, setup: PolicySetup,
           cfg: SimConfig, start: Callable[[int], None], events: list[str],
           shadow: list[int]) -> int:
    """Carry out a decision; returns the sessions cut (and appends to ``shadow`` how long
    each relay deleted with calls would have needed to live for them to end)."""
    cut = 0
    if setup.drain:
        for name in decision.undrain:
            relays[name].draining = False
            relays[name].drain_started = None
        for name in decision.drain:
            relays[name].draining = True
            relays[name].drain_started = float(now)
            events.append(f"t={now} drain {name} ({len(relays[name].sessions)} calls)")
        for name in decision.remove:
            relay = relays.pop(name, None)
            if relay is not None:
                cut += len(relay.sessions)
                if relay.sessions:
                    shadow.append(max(relay.sessions.values()) - now)
                events.append(f"t={now} remove {name} ({len(relay.sessions)} cut)")
    elif decision.desired < decision.active:
        # A ReplicaSet/StatefulSet scaled down: the newest pods go, with their sessions.
        active = sorted((r for r in relays.values() if not r.draining),
                        key=lambda r: -r.index)
        for relay in active[:decision.active - decision.desired]:
            del relays[relay.name]
            cut += len(relay.sessions)
            if relay.sessions:
                shadow.append(max(relay.sessions.values()) - now)
            events.append(f"t={now} delete {relay.name} ({len(relay.sessions)} cut)")
    for _ in range(decision.scale_up):
        start(now + cfg.startup)
    if decision.scale_up:
        events.append(f"t={now} start {decision.scale_up} ({decision.reason})")
    return cut

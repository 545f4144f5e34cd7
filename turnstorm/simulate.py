"""A deterministic trace-replay simulator of a relay pool under an autoscaling policy.

Pure: explicit one-second time steps, traces generated from a seed, no I/O. The relays'
capacity comes from a :class:`RelayModel` calibrated on real CPU-capped coturn (see
``bench/autoscale.py``); the policy is the real :class:`~turnstorm.policy.Autoscaler`.

**Trace.** A list of sessions (arrival second, duration, relayed packets/s). Generators:
:func:`reconnect_storm` (a background of calls, then ``share`` of ``subscribers``
re-allocate within ``window`` seconds), :func:`flash_crowd` (arrivals ramp up to a
plateau, then back down), :func:`reconnect_waves` (a CGNAT failover: a wave, then the
retries after their backoff), :func:`regional_failover` (a neighbouring region's calls in
progress move in, then its new calls too, for a while) and :func:`diurnal_ramp` (a
foreseeable busy hour). Call durations are log-normal, capped at ``max_duration``.

**Each second** (in this order):

1. resizes whose grant delay has passed take effect (or are refused, see below); relays
   whose start-up delay has passed are ready;
2. sessions whose duration is over end; relays deleted by a ReplicaSet (``prestop``)
   leave once their ``preStop`` hook sees no call left (it looks every
   ``PRESTOP_POLL_SECONDS``), or at the drain deadline with the calls left cut;
3. sessions on a relay losing more than ``restart_loss`` of its packets for
   ``restart_after`` seconds re-allocate (an ICE restart) on the least-loaded relay
   clients see, when that relay is less loaded;
4. arriving sessions go to the relays clients see (the endpoints as they were
   ``endpoint_delay`` seconds ago: ready, in rotation, not on standby, not deleted):
   the least-loaded (rejected when there is none), or, for the local mode's ``pack``
   (``pack_fill`` without ``standby_headroom``), the oldest below ``pack_fill`` sessions
   and not resized above its CPU;
5. each relay's offered load ``lambda`` (relayed packets/s) gives its utilization
   ``rho = lambda / mu``, loss, p99 RTT and CPU from the queueing model below; drops are
   whole datagrams (the expected fraction carries over to the next second), as kernel
   counters are;
6. the pool's second violates the SLO when its packet-weighted p99 RTT exceeds
   ``slo_rtt_ms`` or its packet-weighted loss exceeds ``slo_loss``;
7. every ``interval`` seconds the policy evaluates the relays' samples, each relay's state
   as it was ``metric_lag`` seconds ago (missing for a relay that did not serve then;
   the UDP drop signal is the counter's rate over the interval), and its decision is
   applied: new relays start (ready after ``startup`` seconds); scale-in ``drain``s (out
   of rotation, removed when empty or at the drain deadline, the sessions left then are
   cut), or, like a Deployment scaled by HPA/KEDA, the ReplicaSet picks the pods
   (:func:`replicaset_victims`) and either deletes them at once, cutting their sessions
   (``delete``), or lets each drain in its ``preStop`` hook (``prestop``, the rendered
   one: out of the Service, it keeps its calls and costs its relay-seconds until they
   end). Relays being deleted are not the policy's any more (HPA ignores them). With
   ``standby_headroom``, ``pack`` is applied as the operator does: the ready relays
   outside :func:`~turnstorm.policy.open_relays` are put on standby.

:func:`oracle` is the hindsight bound: each second the fewest relays that keep every relay
within its knee, calls placed perfectly, no start-up delay.

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
Resizes take ``resize_delay`` seconds; a relay on a node without spare CPU (a
``resize_refusal`` share of them, the same relays for every policy of a seed) keeps the
pool's CPU when asked for more, while the policy, going by the pod spec, sees it granted.
``replica_seconds`` counts every relay at the CPU it has (a relay at 150 % counts 1.5,
one shrunk to 25 % counts 0.25), so that CPU given or taken by resizing is paid for;
``pod_seconds`` counts relays whatever their size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from turnstorm.policy import Autoscaler, Decision, RelaySample, open_relays

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

    @functools.cached_property
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


def reconnect_waves(seed: int, *, subscribers: int = 4000,
                    waves: tuple[tuple[int, float, int], ...] = ((60, 0.15, 20),
                                                                 (150, 0.15, 45)),
                    background: int = 300, median: float = 120.0, max_duration: int = 600,
                    length: int = 1200) -> Trace:
    """A CGNAT failover: the standby box holds none of the NAT bindings, so the calls behind
    it re-allocate at once (the first wave); the clients whose retry lands while the box is
    still converging fail again and come back after their backoff, spread wider (the
    second). Each wave is (start, share of ``subscribers``, window seconds)."""
    rng = random.Random(seed)
    sessions = _background(rng, background, median, max_duration, length)
    for start, share, window in waves:
        for _ in range(round(subscribers * share)):
            sessions.append(Session(start + int(rng.uniform(0, window)),
                                    _duration(rng, median, max_duration)))
    sessions.sort(key=lambda s: s.arrival)
    shape = ", ".join(f"{share:.0%} within {window} s at t={start} s"
                      for start, share, window in waves)
    return Trace("reconnect waves", sessions, length, waves[0][0],
                 f"of {subscribers} subscribers {shape} over {background} calls")


def _arrivals(rng: random.Random, rate: Callable[[float], float], peak: float, start: float,
              end: float) -> list[float]:
    """Poisson arrivals of a time-varying ``rate`` (at most ``peak``) by thinning."""
    out: list[float] = []
    t = start
    while True:
        t += rng.expovariate(peak)
        if t >= end:
            return out
        if rng.random() * peak < rate(t):
            out.append(t)


def regional_failover(seed: int, *, moved: int = 900, window: int = 20, start: int = 60,
                      extra_rate: float = 3.0, hold: int = 420, background: int = 300,
                      median: float = 120.0, max_duration: int = 600, length: int = 1200
                      ) -> Trace:
    """A neighbouring region's relays fail: its ``moved`` calls in progress ICE-restart
    onto this pool within ``window`` s (each for what is left of it), and its new calls
    arrive here too (``extra_rate``/s more) for ``hold`` s, until it fails back."""
    rng = random.Random(seed)
    sessions = _background(rng, background, median, max_duration, length)
    for _ in range(moved):
        left = max(5, round(rng.uniform(0, 1) * _duration(rng, median, max_duration)))
        sessions.append(Session(start + int(rng.uniform(0, window)), left))
    for t in _arrivals(rng, lambda _t: extra_rate, extra_rate, start, start + hold):
        sessions.append(Session(int(t), _duration(rng, median, max_duration)))
    sessions.sort(key=lambda s: s.arrival)
    return Trace("regional failover", sessions, length, start,
                 f"{moved} calls move in within {window} s at t={start} s, then "
                 f"{extra_rate:g} more calls/s for {hold} s, over {background} calls")


def diurnal_ramp(seed: int, *, peak_rate: float = 6.0, ramp: int = 600, start: int = 60,
                 background: int = 300, median: float = 120.0, max_duration: int = 600,
                 length: int = 1200) -> Trace:
    """The busy hour, compressed: new calls ramp linearly up by ``peak_rate``/s over
    ``ramp`` s and stay there (no storm: what the pool costs when load is foreseeable)."""
    rng = random.Random(seed)
    sessions = _background(rng, background, median, max_duration, length)

    def rate(t: float) -> float:
        return peak_rate * min(1.0, (t - start) / ramp)

    for t in _arrivals(rng, rate, peak_rate, start, length):
        sessions.append(Session(int(t), _duration(rng, median, max_duration)))
    sessions.sort(key=lambda s: s.arrival)
    return Trace("diurnal ramp", sessions, length, start,
                 f"arrivals ramp up by {peak_rate:g}/s over {ramp} s from t={start} s over "
                 f"{background} calls")


# -- the pool ---------------------------------------------------------------------------------


ScaleIn = Literal["drain", "delete", "prestop"]

PRESTOP_POLL_SECONDS = 2
"""How often the rendered ``preStop`` hook looks for bound relay ports (its ``sleep``)."""


@dataclass
class PolicySetup:
    """How a policy is run: the autoscaler, how often, and how it scales in."""

    name: str
    make: Callable[[], Autoscaler]
    interval: int = 15
    """Seconds between evaluations (HPA's sync period is 15 s)."""
    scale_in: ScaleIn = "drain"
    """``drain``: the policy drains the relays it picks, then removes them (ours).
    ``delete``: a Deployment scaled down by HPA/KEDA, the ReplicaSet's pick deleted at once
    with its calls. ``prestop``: the same pick, but each deleted relay drains in its
    ``preStop`` hook (the rendered one): out of the Service, it keeps its calls until they
    end or the drain deadline passes, and costs its relay-seconds meanwhile."""
    cpu_window: int = 15
    """CPU is read averaged over this many seconds (metrics-server's resolution)."""
    pack_fill: float | None = None
    """``placement: pack``: sessions fill relays up to this many each (the allocation
    target); None spreads them (least-loaded, as a Service balances)."""
    standby_headroom: float | None = None
    """With ``pack_fill``: pack as the operator does it on a cluster. At each evaluation
    the relays outside :func:`~turnstorm.policy.open_relays` (with this headroom) are put
    on standby, out of the Service; calls spread over the others. None: the local mode's
    balancer, call by call (the oldest relay in rotation below the fill first)."""
    description: str = ""


@dataclass
class SimRelay:
    name: str
    index: int
    ready_at: int
    sessions: dict[int, int] = field(default_factory=dict)
    """Session id -> end second."""
    load: float = 0.0
    """Relayed packets/s of its sessions."""
    draining: bool = False
    drain_started: float | None = None
    deleted_at: int | None = None
    """``prestop``: when the ReplicaSet deleted it (it drains in its preStop hook)."""
    standby: bool = False
    lossy_for: int = 0
    records: deque[tuple[int, bool, float, float, int, float]] = field(
        default_factory=lambda: deque(maxlen=128))
    """Per second: (t, ready, allocations, CPU percent, datagrams dropped, p99 ms)."""
    carry: float = 0.0
    """Expected drops not yet a whole datagram."""
    last_loss: float = 0.0
    cpu_factor: float = 1.0
    """The CPU its pod spec asks for (what the policy sees)."""
    applied_factor: float = 1.0
    """The CPU it has (a resize is granted after a delay, or refused)."""
    grows: bool = True
    """Its node has spare CPU for a resize above the pool's CPU."""

    def add(self, sid: int, end: int, pps: float) -> None:
        self.sessions[sid] = end
        self.load += pps

    def drop(self, sid: int, pps: float) -> int:
        end = self.sessions.pop(sid)
        self.load = max(0.0, self.load - pps) if self.sessions else 0.0
        return end


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
    refused: int = 0
    """Resizes above the pool's CPU that the relay's node could not grant."""


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
    metric_lag: int = 0
    """Seconds between a relay's state and the policy seeing it (every policy alike)."""
    endpoint_delay: int = 0
    """Seconds until clients see a change of the relays taking new calls (a relay ready,
    drained, deleted, put on standby or back): endpoint propagation."""
    resize_delay: int = 1
    """Seconds from a resize decision until the relay has the new CPU."""
    resize_refusal: float = 0.0
    """Share of relays whose node has no spare CPU: a resize above the pool's CPU stays
    pending (the policy goes by the pod spec and sees it granted)."""
    seed: int = 0
    """The ReplicaSet's ties (pod UIDs) and which nodes have spare CPU."""


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


def _log2_rank(seconds: float) -> int:
    """The ReplicaSet's logarithmic rank of a duration (``logarithmicRankDiff``: the
    integer log2 of nanoseconds; -1 when not positive)."""
    return int(math.log2(seconds * 1e9)) if seconds > 0 else -1


def replicaset_victims(relays: list[SimRelay], count: int, now: int, rng: random.Random
                       ) -> list[SimRelay]:
    """The pods a ReplicaSet scaled down by ``count`` deletes (``ActivePodsWithRanks``
    with ``LogarithmicScaleDown``, one pod per node, no deletion cost): not ready before
    ready; the ready ones ready for less time first, the others created more recently
    first, both in log2 buckets; ties in random order (the pods' UIDs)."""
    def rank(relay: SimRelay) -> tuple[bool, int, int, float]:
        ready = relay.ready_at <= now
        since_ready = _log2_rank(now - relay.ready_at) if ready else -1
        created = relay.ready_at if ready else now  # not tracked apart: start-up is fixed
        return (ready, since_ready, _log2_rank(now - created), rng.random())

    return sorted(relays, key=rank)[:max(0, count)]


def oracle(trace: Trace, per_relay: int, min_relays: int = 1) -> SimResult:
    """The hindsight bound: each second the fewest relays that keep every relay within
    ``per_relay`` calls (its knee), with perfect placement (calls move freely) and no
    start-up delay. Nothing is cut and the SLO always holds."""
    change = [0] * (trace.length + 1)
    for session in trace.sessions:
        if session.arrival < trace.length:
            change[session.arrival] += 1
            change[min(trace.length, session.arrival + session.duration)] -= 1
    seconds: list[Second] = []
    calls = 0
    for t in range(trace.length):
        calls += change[t]
        relays = max(min_relays, math.ceil(calls / max(1, per_relay)))
        seconds.append(Second(t, relays, relays, calls, 0.0, 0.0, False, float(relays)))
    total = sum(s.relays for s in seconds)
    return SimResult(policy="oracle", trace=trace.name, seconds=seconds,
                     replica_seconds=float(total), slo_violation_seconds=0,
                     allocations_cut=0, rejected=0, restarts=0, recover_seconds=0,
                     peak_relays=max(s.relays for s in seconds), pod_seconds=total,
                     resizes=0, events=[], uncut_replica_seconds=float(total))


class Pool:
    """One replay's state; :func:`simulate` steps it second by second."""

    def __init__(self, trace: Trace, model: RelayModel, setup: PolicySetup,
                 cfg: SimConfig) -> None:
        self.trace, self.model, self.setup, self.cfg = trace, model, setup, cfg
        self.scaler = setup.make()
        self.rng = random.Random(cfg.seed)
        self.relays: dict[str, SimRelay] = {}
        self.counter = 0
        self.events: list[str] = []
        self.pps = [s.pps for s in trace.sessions]
        self.arrivals: dict[int, list[int]] = {}
        for sid, session in enumerate(trace.sessions):
            self.arrivals.setdefault(session.arrival, []).append(sid)
        self.where: dict[int, SimRelay] = {}
        self.ends: dict[int, list[int]] = {}
        self.endpoints: deque[frozenset[str]] = deque(maxlen=cfg.endpoint_delay + 1)
        self.pending: list[tuple[int, str, float]] = []
        self.cut = self.rejected = self.restarts = self.pod_seconds = 0
        self.resizes = self.refused = 0
        self.replica_seconds = 0.0
        self.shadow: list[int] = []
        """Seconds deleted relays would have lived until their last call ended."""
        self.seconds: list[Second] = []
        for _ in range(cfg.initial):
            self.start(0)

    # -- relays ------------------------------------------------------------------------------

    def start(self, ready_at: int) -> None:
        index = self.counter
        self.counter += 1
        spare = random.Random(self.cfg.seed * 1_000_003 + index).random()
        self.relays[f"relay-{index}"] = SimRelay(f"relay-{index}", index, ready_at,
                                                 grows=spare >= self.cfg.resize_refusal)

    def place(self, relay: SimRelay, sid: int, end: int) -> None:
        relay.add(sid, end, self.pps[sid])
        self.where[sid] = relay
        self.ends.setdefault(end, []).append(sid)

    def unplace(self, sid: int) -> None:
        relay = self.where.pop(sid)
        relay.drop(sid, self.pps[sid])

    def delete(self, relay: SimRelay, now: int, verb: str) -> None:
        """The relay goes now; the calls still on it are cut."""
        del self.relays[relay.name]
        left = list(relay.sessions)
        if left:
            self.shadow.append(max(relay.sessions.values()) - now)
        for sid in left:
            self.unplace(sid)
        self.cut += len(left)
        self.events.append(f"t={now} {verb} {relay.name} ({len(left)} cut)")

    def takes_calls(self, relay: SimRelay, now: int) -> bool:
        return (relay.ready_at <= now and not relay.draining and relay.deleted_at is None
                and not relay.standby)

    def serving(self) -> list[SimRelay]:
        """The relays clients send new calls to: as they were ``endpoint_delay`` ago, of
        those still up (oldest first)."""
        seen = self.endpoints[0]
        return [r for r in self.relays.values() if r.name in seen]

    # -- one second --------------------------------------------------------------------------

    def step(self, now: int) -> None:
        self.apply_resizes(now)
        for sid in self.ends.pop(now, []):
            if sid in self.where:
                self.unplace(sid)
        self.finish_prestop(now)
        self.endpoints.append(frozenset(
            r.name for r in self.relays.values() if self.takes_calls(r, now)))
        serving = self.serving()
        self.ice_restarts(serving)
        for sid in self.arrivals.get(now, []):
            target = self.choose(serving)
            if target is None:
                self.rejected += 1
            else:
                self.place(target, sid, now + self.trace.sessions[sid].duration)
        self.measure(now)
        if now % self.setup.interval == 0:
            self.evaluate(now)

    def apply_resizes(self, now: int) -> None:
        due = [p for p in self.pending if p[0] <= now]
        self.pending = [p for p in self.pending if p[0] > now]
        for _, name, factor in due:
            relay = self.relays.get(name)
            if relay is None:
                continue
            granted = factor if relay.grows else min(factor, max(1.0, relay.applied_factor))
            if granted < factor:
                self.refused += 1
            relay.applied_factor = granted

    def finish_prestop(self, now: int) -> None:
        """Relays draining in their preStop hook: gone at the hook's first look after their
        last call ends; at the deadline the hook returns and the calls left are cut."""
        deadline = self.scaler.policy.drain_deadline_seconds
        for relay in [r for r in self.relays.values() if r.deleted_at is not None]:
            assert relay.deleted_at is not None
            waited = now - relay.deleted_at
            if waited >= deadline:
                self.delete(relay, now, "stop at preStop deadline:")
            elif not relay.sessions and (waited - 1) % PRESTOP_POLL_SECONDS == 0:
                # (the hook looks at the deletion and every poll after; seen a second on)
                self.delete(relay, now, "stop after preStop:")

    def ice_restarts(self, serving: list[SimRelay]) -> None:
        for relay in list(self.relays.values()):
            if relay.lossy_for < self.cfg.restart_after or not relay.sessions:
                continue
            ready = [r for r in serving if r is not relay]
            if not ready:
                continue
            best = min(ready, key=lambda r: (r.load, r.index))
            count = math.ceil(len(relay.sessions) * self.cfg.restart_share)
            for sid in sorted(relay.sessions)[:count]:
                if best.load + self.pps[sid] >= relay.load - self.pps[sid]:
                    break
                end = relay.sessions[sid]
                self.unplace(sid)
                self.place(best, sid, end)
                self.restarts += 1

    def choose(self, serving: list[SimRelay]) -> SimRelay | None:
        if not serving:
            return None
        fill = self.setup.pack_fill
        if fill is not None and self.setup.standby_headroom is None:
            # the local balancer: the oldest relay with room, unless resized above its CPU
            # (it takes no more calls until its allocations bring it back to 100 %)
            for relay in serving:
                if len(relay.sessions) < fill and relay.cpu_factor <= 1.0:
                    return relay
        return min(serving, key=lambda r: (r.load, r.index))

    def measure(self, now: int) -> None:
        """Each relay's loss (whole datagrams), p99 and CPU; the pool's SLO; the cost."""
        parts: list[tuple[float, float]] = []
        lost = packets = 0.0
        for relay in self.relays.values():
            load = relay.load if relay.sessions else 0.0
            equivalent = self.model.equivalent_load(load, relay.applied_factor)
            expected = load * self.model.loss(equivalent) + relay.carry
            dropped = math.floor(expected)
            relay.carry = expected - dropped
            relay.last_loss = dropped / load if load > 0 else 0.0
            p99 = self.model.p99_ms(equivalent) if load > 0 else 0.0
            ready = relay.ready_at <= now
            relay.records.append((now, ready, float(len(relay.sessions)),
                                  self.model.cpu_percent(equivalent) if ready else 0.0,
                                  dropped, p99))
            relay.lossy_for = relay.lossy_for + 1 if relay.last_loss > self.cfg.restart_loss \
                else 0
            if load > 0:
                parts.append((load, p99))
                lost += dropped
                packets += load
        p99 = pool_p99(parts)
        loss = lost / packets if packets else 0.0
        violating = p99 > self.cfg.slo_rtt_ms or loss > self.cfg.slo_loss
        cpu = sum(r.applied_factor for r in self.relays.values())
        self.replica_seconds += cpu
        self.pod_seconds += len(self.relays)
        self.seconds.append(Second(now, len(self.relays),
                                   sum(self.takes_calls(r, now) for r in self.relays.values()),
                                   len(self.where), p99, loss, violating, cpu))

    # -- the policy --------------------------------------------------------------------------

    def sample(self, relay: SimRelay, now: int) -> RelaySample:
        """What the policy knows of the relay: its state ``metric_lag`` seconds ago (missing
        if it did not serve then); readiness, drain and CPU spec as they are now."""
        cfg = self.cfg
        if relay.ready_at > now:
            return RelaySample(relay.name, ready=False, port_capacity=cfg.port_capacity,
                               cpu_factor=relay.cpu_factor)
        seen = now - cfg.metric_lag
        window = max(self.setup.cpu_window, self.setup.interval)
        records: list[tuple[int, bool, float, float, int, float]] = []
        for record in reversed(relay.records):
            if record[0] <= seen:
                records.append(record)
                if len(records) >= window:
                    break
        signals: dict[str, float | None] = {}
        if records and records[0][1]:
            _, _, allocations, _, _, p99 = records[0]
            cpu = [r[3] for r in records[:self.setup.cpu_window]]
            dropped = sum(r[4] for r in records if r[0] > seen - self.setup.interval)
            signals = {"allocations": allocations, "cpu_percent": sum(cpu) / len(cpu),
                       "udp_rcvbuf_errors": dropped / self.setup.interval,
                       "probe_rtt_ms": p99}
        return RelaySample(relay.name, ready=True, signals=signals, draining=relay.draining,
                           drain_started=relay.drain_started, port_capacity=cfg.port_capacity,
                           cpu_factor=relay.cpu_factor)

    def evaluate(self, now: int) -> None:
        # relays being deleted are not the policy's any more (HPA ignores them too)
        samples = [self.sample(r, now) for r in self.relays.values() if r.deleted_at is None]
        decision = self.scaler.evaluate(float(now), samples)
        if self.setup.scale_in == "drain":
            self.drain(decision, now)
        elif decision.desired < decision.active:
            self.scale_down(decision.active - decision.desired, now)
        for _ in range(decision.scale_up):
            self.start(now + self.cfg.startup)
        if decision.scale_up:
            self.events.append(f"t={now} start {decision.scale_up} ({decision.reason})")
        for name, factor in decision.resize.items():
            if name in self.relays:
                self.relays[name].cpu_factor = factor
                self.pending.append((now + self.cfg.resize_delay, name, factor))
                self.resizes += 1
        if self.setup.pack_fill is not None and self.setup.standby_headroom is not None:
            self.label_standby(samples, decision, now)

    def drain(self, decision: Decision, now: int) -> None:
        for name in decision.undrain:
            self.relays[name].draining = False
            self.relays[name].drain_started = None
        for name in decision.drain:
            relay = self.relays[name]
            relay.draining, relay.drain_started = True, float(now)
            self.events.append(f"t={now} drain {name} ({len(relay.sessions)} calls)")
        for name in decision.remove:
            if name in self.relays:
                self.delete(self.relays[name], now, "remove")

    def scale_down(self, count: int, now: int) -> None:
        """A Deployment scaled down: the ReplicaSet picks the pods."""
        up = [r for r in self.relays.values() if r.deleted_at is None]
        for relay in replicaset_victims(up, count, now, self.rng):
            if self.setup.scale_in == "delete":
                self.delete(relay, now, "delete")
            else:
                relay.deleted_at = now
                self.events.append(f"t={now} delete {relay.name} ({len(relay.sessions)} "
                                   "calls drain in its preStop hook)")

    def label_standby(self, samples: list[RelaySample], decision: Decision, now: int) -> None:
        """``pack`` as the operator applies it: the ready relays staying in rotation
        outside the open set are labelled standby (out of the Service)."""
        leaving = set(decision.drain) | set(decision.remove)
        by_name = {s.name: s for s in samples}
        staying = [r for r in self.relays.values()
                   if r.name in by_name and r.name not in leaving and r.deleted_at is None
                   and not r.draining]
        candidates = [dataclasses.replace(by_name[r.name], draining=False)
                      for r in staying if r.ready_at <= now]
        assert self.setup.pack_fill is not None and self.setup.standby_headroom is not None
        opened = set(open_relays(candidates, self.setup.pack_fill,
                                 self.setup.standby_headroom, self.scaler.policy.targets))
        for relay in staying:
            relay.standby = relay.ready_at <= now and relay.name not in opened

    def result(self) -> SimResult:
        storm = self.trace.storm_start
        violating_after = [s.t for s in self.seconds if s.violating and s.t >= storm]
        recover = violating_after[-1] + 1 - storm if violating_after else 0
        return SimResult(
            policy=self.setup.name, trace=self.trace.name, seconds=self.seconds,
            replica_seconds=self.replica_seconds,
            slo_violation_seconds=sum(1 for s in self.seconds if s.violating),
            allocations_cut=self.cut, rejected=self.rejected, restarts=self.restarts,
            recover_seconds=recover, peak_relays=max(s.relays for s in self.seconds),
            events=self.events, uncut_replica_seconds=self.replica_seconds + sum(self.shadow),
            pod_seconds=self.pod_seconds, resizes=self.resizes, refused=self.refused)


def simulate(trace: Trace, model: RelayModel, setup: PolicySetup,
             config: SimConfig | None = None) -> SimResult:
    pool = Pool(trace, model, setup, config or SimConfig())
    for now in range(trace.length):
        pool.step(now)
    return pool.result()

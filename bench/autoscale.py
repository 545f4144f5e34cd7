"""Autoscaling through carrier storms: our policy vs HPA-on-CPU, KEDA-on-allocations, an oracle.

Runs ``python -m bench.autoscale [--quick]`` from the repository root (root needed: the
relays are CPU-capped through cgroups). Three parts, all in one run:

1. **Calibration (measured).** One real coturn relay on 127.0.0.x, capped at ``--cpus``
   cores by a cgroup, carries an increasing number of calls: asyncio TURN clients
   (Allocate + ChannelBind) sending 160-byte ChannelData every 20 ms to an echo peer, so
   each call puts 100 packets/s through the relay. Per step: loss, p99 RTT, the relay's
   CPU. The knee is the most calls meeting the SLO (loss < 1 %, p99 RTT < 150 ms); the
   saturation throughput is the most relayed packets/s seen when overdriven. The steps go
   on (25 % more calls each) until one overdrives the relay (loses > 5 %); a calibration
   that never does fails with a message saying so, since the saturation throughput would
   be a guess. Then the same relay carries more calls than it can at 150 % of its CPU
   while its CPU is resized in place (its cgroup quota, as a pod resized in place) to 150
   % and back, twice, the calls carrying on: the phases at 100 % measure the saturation
   again; what the relayed packets/s at 150 % add to it, per unit of extra CPU, gives the
   model's ``burst_marginal`` (0 to 1), printed as a lower bound when the resized relay
   carried all it was offered.
2. **Trace replay (modeled).** :mod:`turnstorm.simulate` replays five traces (a reconnect
   storm, a flash crowd, a CGNAT failover's two reconnect waves, a regional failover and
   a busy-hour ramp) over several seeds against naive baselines (HPA on CPU 70 %,
   KEDA-style on allocations, pods stopping at once), the same baselines on a Deployment
   whose deleted relays drain in the rendered preStop hook (default and 30 s scale-down
   windows), ours and the hindsight oracle, all on one footing (see
   :mod:`bench._replay`). Per trace: SLO-violation seconds, CPU-weighted and pod
   relay-seconds, allocations cut, peak relays, resizes, ratios to the best draining
   baseline and to the oracle; without ``--quick`` a second table has ours at a 1 s
   interval.
3. **One short trace for real (measured).** A :class:`~turnstorm.actuator.LocalPool` of
   CPU-capped coturn relays, the real Autoscaler (ours) applied through
   ``LocalPool.apply`` every second, and generator calls: a base load, a reconnect storm
   that overloads the single relay, the scale-out, calls leaving, the drain and removal.
   Calls on a relay losing > 5 % of packets for 2 s re-allocate from the rotation (an ICE
   restart), as in the model. Vertical resizing is on, as in the replay. Prints RTT
   p99/loss before and after the scale-out and the allocations cut at scale-in.

The hypervisor's steal time is printed per part. The last line is the verdict:
``autoscale: <figure> (goal <goal>) ok|short``: ours against the best draining baseline on
every trace (medians over the seeds), SLO-violation seconds <= 0.5x at relay-seconds
<= 1.0x, 0 allocations cut (the live part included), relay-seconds <= 1.25x the oracle.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import random
import struct
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from bench._replay import (
    BURST,
    GOAL_ORACLE_RATIO,
    GOAL_REPLICA_RATIO,
    GOAL_VIOLATION_RATIO,
    OUR_TARGET_SHARE,
    SLO_LOSS,
    SLO_RTT_MS,
    VERTICAL,
    Footing,
    Verdict,
    describe,
    replay,
    table,
    verdict,
)
from turnstorm import children
from turnstorm.client import TurnClient
from turnstorm.errors import TurnstormError
from turnstorm.policy import Autoscaler, StormOptions
from turnstorm.proto.credentials import Credentials
from turnstorm.proto.stun import Address
from turnstorm.proto.transaction import TransactionTimeout
from turnstorm.relay.actuator import LocalPool
from turnstorm.relay.procfs import read_cpu_seconds, read_steal_seconds
from turnstorm.simulate import MEDIA_PPS, SESSION_RELAYED_PPS, RelayModel
from turnstorm.spec import ScalingBehavior, ScalingPolicy
from turnstorm.uri import split_host_port

STORM_SECONDS = 5.0
"""The live storm's calls arrive within this many seconds."""
HEADER = struct.Struct("!IIq")
PACKET = 160
PAD = b"\0" * (PACKET - HEADER.size)
INTERVAL = 1 / MEDIA_PPS


# -- generator: calls with paced media through real relays -----------------------------------


@dataclass
class Call:
    cid: int
    client: TurnClient
    channel: int
    relay: str
    """Relay host the call is on."""
    seq: int = 0
    ends_at: float = float("inf")


@dataclass
class Media:
    """Calls sending ChannelData every 20 ms to an echo peer through their relay; every
    packet carries (call, seq, send time) so echoes give RTT and loss per send second."""

    secret: str
    peer: Address
    calls: dict[int, Call] = field(default_factory=dict)
    sent: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    received: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    rtts: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    """Send second -> RTTs (ms) of the packets sent then."""
    origin: float = field(default_factory=time.perf_counter)
    lags: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    """Second -> how late each 20 ms send tick fired (ms): the generator's own delay."""
    failed: int = 0
    echoes: int = 0
    """Echoes received so far (whenever sent)."""
    paused: bool = False
    """No media is sent while set (the calls stay up)."""
    pending: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _next: int = 0

    def _on_data(self, relay: str) -> Callable[[Address, bytes], None]:
        def handler(_peer: Address, data: bytes) -> None:
            _cid, _seq, sent_ns = HEADER.unpack_from(data)
            now = time.perf_counter_ns()
            second = int((sent_ns / 1e9) - self.origin)
            self.received[(relay, second)] += 1
            self.echoes += 1
            self.rtts[second].append((now - sent_ns) / 1e6)
        return handler

    async def open(self, server: Address, duration: float = float("inf")) -> Call | None:
        cid = self._next
        self._next += 1
        creds = Credentials.ephemeral(self.secret, f"bench-{cid}", time.time())
        client = await TurnClient.connect(server, "udp", credentials=creds)
        try:
            await client.allocate()
            channel = await client.channel_bind(self.peer)
        except (TurnstormError, TransactionTimeout, OSError):
            client.close()
            self.failed += 1
            return None
        client.on_data = self._on_data(server[0])
        call = Call(cid, client, channel, server[0], ends_at=time.perf_counter() + duration)
        self.calls[cid] = call
        return call

    async def open_many(self, choose: Callable[[], Address], durations: list[float],
                        concurrency: int = 32) -> None:
        """Open one call per duration, each on the relay ``choose()`` names just before."""
        limit = asyncio.Semaphore(concurrency)

        async def one(duration: float) -> None:
            async with limit:
                server = choose()
                self.pending[server[0]] += 1
                try:
                    await self.open(server, duration)
                finally:
                    self.pending[server[0]] -= 1

        await asyncio.gather(*(one(d) for d in durations))

    def load(self) -> dict[str, int]:
        """Calls per relay host, calls being opened included."""
        counts: dict[str, int] = defaultdict(int, self.pending)
        for call in self.calls.values():
            counts[call.relay] += 1
        return counts

    async def hang_up(self, call: Call) -> None:
        self.calls.pop(call.cid, None)
        with contextlib.suppress(TurnstormError, TransactionTimeout, OSError):
            await asyncio.wait_for(call.client.release(), 2.0)
        call.client.close()

    def tick(self) -> None:
        now_ns = time.perf_counter_ns()
        second = int(now_ns / 1e9 - self.origin)
        for call in self.calls.values():
            with contextlib.suppress(TurnstormError, OSError):
                call.client.send_channel(call.channel,
                                         HEADER.pack(call.cid, call.seq, now_ns) + PAD)
                call.seq += 1
                self.sent[(call.relay, second)] += 1

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not stop.is_set():
            self.lags[self.second()].append(1000 * max(0.0, loop.time() - next_at))
            if not self.paused:
                self.tick()
            ended = [c for c in self.calls.values() if c.ends_at <= time.perf_counter()]
            for call in ended:
                asyncio.ensure_future(self.hang_up(call))  # noqa: RUF006
            next_at += INTERVAL
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    def second(self) -> int:
        return int(time.perf_counter() - self.origin)

    def window(self, first: int, last: int, relay: str | None = None
               ) -> tuple[float, float, int]:
        """(p99 RTT ms, loss, packets sent) over send seconds [first, last)."""
        sent = sum(v for (r, s), v in self.sent.items()
                   if first <= s < last and (relay is None or r == relay))
        got = sum(v for (r, s), v in self.received.items()
                  if first <= s < last and (relay is None or r == relay))
        rtts = sorted(x for s in range(first, last) for x in self.rtts.get(s, []))
        p99 = rtts[min(len(rtts) - 1, int(0.99 * len(rtts)))] if rtts else float("nan")
        return p99, (1 - got / sent) if sent else 0.0, sent

    def lag_p99(self, first: int, last: int) -> float:
        lags = sorted(x for s in range(first, last) for x in self.lags.get(s, []))
        return lags[min(len(lags) - 1, int(0.99 * len(lags)))] if lags else float("nan")

    async def close(self) -> None:
        await asyncio.gather(*(self.hang_up(c) for c in list(self.calls.values())))


def start_echo() -> tuple[subprocess.Popen[str], Address]:
    echo = subprocess.Popen([sys.executable, "-m", "turnstorm.loadgen.echo", "--host",
                             "127.0.0.1", "--port", "0"], stdout=subprocess.PIPE, text=True)
    assert echo.stdout is not None
    line = echo.stdout.readline().split()
    if not line:
        echo.kill()
        raise SystemExit("the echo peer did not start")
    return echo, split_host_port(line[-1])


LEFTOVERS: dict[str, set[str]] = {"pids": set(), "cgroups": set()}
"""Every relay process and cgroup this run created, checked at the end."""


def track(pool: LocalPool) -> None:
    for member in pool:
        if member.pid is not None:
            LEFTOVERS["pids"].add(str(member.pid))
        if member.cgroup is not None and member.cgroup.created:
            LEFTOVERS["cgroups"].add(member.cgroup.path)


def leftovers() -> list[str]:
    """Relay processes or cgroups of this run still present."""
    alive = [f"pid {pid}" for pid in LEFTOVERS["pids"] if os.path.exists(f"/proc/{pid}")]
    return alive + [path for path in LEFTOVERS["cgroups"] if os.path.exists(path)]


def stop_echo(echo: subprocess.Popen[str]) -> None:
    children.stop(echo)


# -- 1. calibration ---------------------------------------------------------------------------


@dataclass
class Step:
    calls: int
    offered_pps: float
    relayed_pps: float
    loss: float
    p99_ms: float
    cpu_cores: float

    @property
    def meets_slo(self) -> bool:
        return self.loss < SLO_LOSS and self.p99_ms < SLO_RTT_MS


OVERDRIVEN_LOSS = 0.05
"""A phase whose relay lost more than this share of what it was offered was overdriven:
what it relayed is its saturation throughput."""


class CalibrationError(SystemExit):
    """The calibration did not measure what the model needs."""


@dataclass
class Burst:
    """The same overdriving load on one relay, its CPU switched in place between the base
    and ``factor`` times it, back to back: (offered, relayed) packets/s in each phase."""

    factor: float
    calls: int
    base_pps: list[tuple[float, float]]
    burst_pps: list[tuple[float, float]]

    @property
    def burst(self) -> float:
        return sum(r for _, r in self.burst_pps) / len(self.burst_pps)

    @property
    def base(self) -> float:
        return sum(r for _, r in self.base_pps) / len(self.base_pps)

    @property
    def base_overdriven(self) -> bool:
        return all(r < (1 - OVERDRIVEN_LOSS) * o for o, r in self.base_pps)

    @property
    def burst_overdriven(self) -> bool:
        """False: the resized relay carried what it was offered, so what the extra CPU
        adds was not measured, only a lower bound of it."""
        return all(r < (1 - OVERDRIVEN_LOSS) * o for o, r in self.burst_pps)

    def marginal(self, capacity_pps: float) -> float:
        """What each unit of CPU above the base added, relative to ``capacity_pps`` per
        unit at the base (the model's saturation throughput, so that the model's resized
        relay serves what the resized relay was measured to)."""
        return (self.burst / capacity_pps - 1) / (self.factor - 1)


def calibration_counts(steps: list[int], max_calls: int) -> Iterator[int]:
    """The listed call counts, then 25 % more each step up to ``max_calls``: the relay
    must be driven past saturation (the caller stops once it is)."""
    yield from steps
    count = steps[-1]
    while count < max_calls:
        count = min(max_calls, round(count * 1.25))
        yield count


def overdriven(steps: list[Step]) -> Step:
    """The first step that overdrove the relay; a clear failure when none did."""
    for s in steps:
        if s.loss > OVERDRIVEN_LOSS:
            return s
    top = max(steps, key=lambda s: s.calls)
    raise CalibrationError(
        f"calibration: the relay was never overdriven: {top.calls} calls, "
        f"{top.relayed_pps:.0f} of {top.offered_pps:.0f} offered pps relayed (loss "
        f"{top.loss:.2%}, overdriven means more than {OVERDRIVEN_LOSS:.0%}); its saturation "
        "throughput is unmeasured, so no model is fitted: lower --cpus or allow more calls")


async def calibrate(cpus: float, steps: list[int], seconds: float, burst: float = 1.0,
                    burst_calls: int = 480, max_calls: int = 960
                    ) -> tuple[list[Step], Burst | None]:
    """Steps at ``cpus``, then (``burst`` > 1) the same relay overdriven (offered 1.15x
    ``burst`` times its saturation, at most ``burst_calls`` calls) while its CPU is resized
    in place to ``burst`` times ``cpus`` and back, twice: relayed packets/s per phase,
    counted by echo arrival (at saturation the relay's output rate is its service rate)."""
    echo, peer = start_echo()
    results: list[Step] = []
    measured: Burst | None = None
    try:
        with LocalPool(cpus=cpus, cgroup_prefix=f"bench-cal-{random.getrandbits(24):06x}"
                       ) as pool:
            relay = pool.start_relay()
            track(pool)
            assert relay.pid is not None
            media = Media(pool.secret, peer)
            server = (relay.host, relay.port)
            stop = asyncio.Event()
            sender = asyncio.create_task(media.run(stop))
            async def step(count: int, into: list[Step]) -> Step:
                missing = count - len(media.calls)
                await media.open_many(lambda: server, [float("inf")] * missing)
                await asyncio.sleep(0.3)
                first = media.second() + 1
                while media.second() < first:
                    await asyncio.sleep(0.02)
                assert relay.pid is not None
                cpu0, t0 = read_cpu_seconds(relay.pid), time.perf_counter()
                await asyncio.sleep(seconds)
                cpu = (read_cpu_seconds(relay.pid) - cpu0) / (time.perf_counter() - t0)
                last = media.second()
                await asyncio.sleep(0.6)  # late echoes
                p99, loss, sent = media.window(first, last)
                span = max(1, last - first)
                into.append(Step(len(media.calls), 2 * sent / span,
                                 2 * sent * (1 - loss) / span, loss, p99, cpu))
                s = into[-1]
                print(f"  {s.calls:>5} calls {s.offered_pps:>8.0f} {s.relayed_pps:>8.0f} "
                      f"{s.loss:>7.2%} {s.p99_ms:>8.1f} {s.cpu_cores:>6.2f}", flush=True)
                return s

            try:
                for count in calibration_counts(steps, max_calls):
                    if (await step(count, results)).loss > OVERDRIVEN_LOSS:
                        break
                overdriven(results)
                if burst > 1:
                    saturation = max(s.relayed_pps for s in results)
                    count = min(burst_calls, round(1.15 * burst * saturation
                                                   / SESSION_RELAYED_PPS))
                    # opened with the media paused: allocations on an overdriven relay
                    # would take seconds each
                    media.paused = True
                    await asyncio.sleep(1.0)  # the relay's queue drains
                    await media.open_many(lambda: server,
                                          [float("inf")] * (count - len(media.calls)))
                    media.paused = False
                    measured = Burst(burst, len(media.calls), [], [])
                    for factor in (burst, 1.0, burst, 1.0):
                        pool.resize(relay.name, factor)
                        await asyncio.sleep(0.5)
                        e0, t0 = media.echoes, time.perf_counter()
                        s0 = sum(media.sent.values())
                        await asyncio.sleep(seconds)
                        elapsed = time.perf_counter() - t0
                        rate = 2 * (media.echoes - e0) / elapsed
                        offered = 2 * (sum(media.sent.values()) - s0) / elapsed
                        (measured.burst_pps if factor > 1 else measured.base_pps).append(
                            (offered, rate))
                        print(f"  {len(media.calls):>5} calls, resized in place to "
                              f"{cpus * factor:g} CPU: offered {offered:>8.0f}, "
                              f"{rate:>8.0f} relayed pps", flush=True)
            finally:
                stop.set()
                await sender
                await media.close()
    finally:
        stop_echo(echo)
    return results, measured


def fit_model(steps: list[Step], cpus: float, burst: Burst | None = None
              ) -> tuple[RelayModel, Step]:
    """The model from what was measured: the saturation throughput is the most the relay
    relayed (the steps, and the phases of the resize at its own CPU when they overdrove
    it too); never a guess (:func:`overdriven` fails when no step saturated it)."""
    overdriven(steps)
    good = [s for s in steps if s.meets_slo]
    knee = max(good, key=lambda s: s.calls) if good else steps[0]
    light = steps[0]
    capacity = max(s.relayed_pps for s in steps)
    if burst is not None and burst.base_overdriven:
        capacity = max(capacity, burst.base)
    max_p99 = max(s.p99_ms for s in steps)
    cpu_per_packet = knee.cpu_cores / knee.relayed_pps
    model = RelayModel.fit(capacity_pps=capacity, cpu_per_packet=cpu_per_packet,
                           cpu_limit=cpus, base_p99_ms=light.p99_ms,
                           knee_pps=knee.relayed_pps, knee_p99_ms=knee.p99_ms,
                           max_p99_ms=max(max_p99, 2 * SLO_RTT_MS))
    if burst is not None:
        # never assumed better than linear
        model = dataclasses.replace(
            model, burst_marginal=min(1.0, max(0.0, burst.marginal(model.capacity_pps))))
    return model, knee


# -- 4. one short trace for real -----------------------------------------------------------------


@dataclass
class LiveResult:
    before: tuple[float, float, int, float]
    after: tuple[float, float, int, float]
    base: tuple[float, float, int, float]
    peak_relays: int
    restarts: int
    cut: int
    events: list[str]
    failed: int


async def live(cpus: float, knee_calls: int, slo_calls: int, quick: bool) -> LiveResult:
    rng = random.Random(7)
    target = max(10, round(OUR_TARGET_SHARE * slo_calls))
    scaler = Autoscaler(
        ScalingPolicy(enabled=True, tolerance=0.1, targets={"allocationsPerRelay": target},
                      scale_up=ScalingBehavior(0, 100, 4, 15),
                      scale_down=ScalingBehavior(4, 100, 0, 15), drain_deadline_seconds=60,
                      vertical=VERTICAL),
        1, 4, StormOptions(lookahead_seconds=5, slope_window_seconds=5))
    base_calls = max(10, round(0.6 * knee_calls))
    storm_calls = max(10, round(1.0 * knee_calls))
    hold = 6.0 if quick else 15.0
    # seconds the policy keeps running after the storm: the calls end, the drains finish
    tail = 12.0 if quick else 16.0
    echo, peer = start_echo()
    try:
        with LocalPool(cpus=cpus, cgroup_prefix=f"bench-live-{rng.getrandbits(24):06x}"
                       ) as pool:
            pool.start_relay()
            track(pool)
            media = Media(pool.secret, peer)
            stop = asyncio.Event()
            sender = asyncio.create_task(media.run(stop))
            restarts = 0
            lossy: dict[str, int] = defaultdict(int)
            t0 = time.perf_counter()
            peak = 1
            marks: dict[str, int] = {}

            def least_loaded() -> Address:
                counts = media.load()
                return min(pool.rotation_addresses(), key=lambda a: counts[a[0]])

            def placed() -> Address:
                # placement pack: the oldest relay in rotation below the target first
                counts = media.load()
                for address in pool.rotation_addresses():
                    if counts[address[0]] < target:
                        return address
                return least_loaded()

            async def control(until: float) -> None:
                nonlocal restarts, peak
                while time.perf_counter() - t0 < until:
                    await asyncio.sleep(1.0)
                    now = time.perf_counter() - t0
                    samples = await asyncio.to_thread(pool.samples, now)
                    decision = scaler.evaluate(now, samples)
                    done = await asyncio.to_thread(pool.apply, decision, now)
                    track(pool)
                    if done["started"] and "scaled" not in marks:
                        marks["scaled"] = media.second()
                    peak = max(peak, len(pool.relays))
                    # ICE restarts off relays losing > 5 % for 2 s.
                    sec = media.second()
                    for member in list(pool.relays.values()):
                        _, loss, sent = media.window(sec - 2, sec - 1, member.host)
                        lossy[member.host] = lossy[member.host] + 1 if (
                            sent and loss > 0.05) else 0
                        if lossy[member.host] >= 2 and len(pool.rotation()) > 1:
                            movers = [c for c in media.calls.values()
                                      if c.relay == member.host]
                            for call in movers[:max(1, len(movers) // 5)]:
                                destination = least_loaded()
                                if destination[0] == member.host:
                                    break
                                await media.hang_up(call)
                                new = await media.open(destination,
                                                       call.ends_at - time.perf_counter())
                                restarts += new is not None

            base_durations = [rng.uniform(hold + STORM_SECONDS + 6, hold + STORM_SECONDS + 9)
                              for _ in range(base_calls)]
            await media.open_many(placed, base_durations)
            controller = asyncio.create_task(control(hold + STORM_SECONDS + tail))
            await asyncio.sleep(3.0)
            marks["storm"] = media.second()
            # The storm: the calls arrive within STORM_SECONDS, each placed as the pool's
            # balancer would (placement pack) at that moment.
            per_tick = max(1, round(storm_calls / (STORM_SECONDS * 10)))
            opened = 0
            storm_started = time.perf_counter()
            while opened < storm_calls:
                elapsed = time.perf_counter() - storm_started
                batch = min(per_tick, storm_calls - opened)
                asyncio.ensure_future(media.open_many(  # noqa: RUF006
                    placed, [rng.uniform(hold + STORM_SECONDS - elapsed + 1,
                                               hold + STORM_SECONDS - elapsed + 3)
                                   for _ in range(batch)]))
                opened += batch
                await asyncio.sleep(0.1)
            await asyncio.sleep(hold)
            marks["end"] = media.second()
            await controller
            marks.setdefault("scaled", marks["end"])
            cut = pool.allocations_cut
            stop.set()
            await sender
            await media.close()
            await asyncio.sleep(0.5)
            events = list(pool.events)
    finally:
        stop_echo(echo)
    storm = marks["storm"]

    def window(first: int, last: int) -> tuple[float, float, int, float]:
        return (*media.window(first, last), media.lag_p99(first, last))

    return LiveResult(
        base=window(1, storm), before=window(storm + 1, max(storm + 2, marks["scaled"] + 1)),
        after=window(marks["end"] - 4, marks["end"]), peak_relays=peak,
        restarts=restarts, cut=cut, events=events, failed=media.failed)


# -- main --------------------------------------------------------------------------------------


def fmt_window(w: tuple[float, float, int, float]) -> str:
    return (f"RTT p99 {w[0]:6.1f} ms, loss {w[1]:6.2%} ({w[2]} packets; generator's own "
            f"send-tick lag p99 {w[3]:.1f} ms)")


def print_calibration(model: RelayModel, knee: Step, burst: Burst | None) -> None:
    slo_calls = model.slo_sessions(SLO_RTT_MS, SLO_LOSS)
    print(f"  knee: {knee.calls} calls = {knee.relayed_pps:.0f} relayed pps (loss "
          f"{knee.loss:.2%}, p99 {knee.p99_ms:.1f} ms); saturation {model.capacity_pps:.0f} "
          f"relayed pps (measured overdriven); CPU {model.cpu_per_packet * 1e6:.1f} "
          f"us/packet; light-load p99 {model.base_p99_ms:.1f} ms")
    if burst is not None:
        measured = burst.marginal(model.capacity_pps)
        how = ("measured: the resized relay was overdriven too" if burst.burst_overdriven
               else "a lower bound only: the resized relay carried all it was offered")
        print(f"  resized to {BURST:.0%}: {burst.burst:.0f} relayed pps (at 100 % under the "
              f"same load {burst.base:.0f}): the extra CPU added x{measured:.2f} of the "
              f"saturation throughput per unit ({how}; the model uses "
              f"{model.burst_marginal:.2f}, clamped to 0..1)")
    print(f"  model: M/M/1/K, K={model.buffer_packets} packets, a={model.queue_ms:.1f} ms, "
          f"max p99 {model.max_p99_ms:.0f} ms -> {slo_calls} calls per relay inside the SLO")


def print_replay(model: RelayModel, footing: Footing, seeds: list[int], second: bool
                 ) -> list[Verdict]:
    """The tables (equal footing; then, with ``second``, ours at 1 s); the verdicts of
    the first."""
    print(f"\n2. trace replay (modeled; seeds {seeds[0]}-{seeds[-1]}; every policy "
          f"evaluated every {footing.interval} s on metrics {footing.lag} s old; endpoints "
          f"propagate in {footing.endpoint_delay} s; start-up {footing.startup} s; resizes "
          f"granted in {footing.resize_delay} s, refused on {footing.resize_refusal:.0%} of "
          f"the nodes; relays 2..{footing.max_relays})")
    print("\n".join(describe(model, footing)))
    print("  per trace: SLO-violation and CPU-weighted relay-seconds min/median/max over the "
          "seeds, the rest medians; x = ratio of medians to the best draining baseline (*); "
          "/or = to the oracle")
    results = replay(model, footing, seeds, 1 if second else None)
    verdicts = []
    for runs, rows in results:
        trace = runs[0]
        print(f"  {trace.name}: {trace.description}; {trace.length} s")
        print("\n".join(table(rows, lambda r: r.policy != "ours-1s")))
        verdicts.append(verdict(trace.name, rows))
    if not second:
        return verdicts
    print("  ours at metrics.intervalSeconds 1 (the rest as above):")
    for runs, rows in results:
        print(f"  {runs[0].name}:")
        print("\n".join(table(rows, lambda r: r.policy in ("ours", "ours-1s"))[1:]))
    return verdicts


def print_live(args: argparse.Namespace, run: Callable[..., object], knee: Step,
               slo_calls: int) -> int:
    """The real trace; returns the allocations it cut."""
    print(f"\n3. one short trace for real: LocalPool at {args.cpus:g} CPU per relay, our "
          "policy every 1 s, scale-down window 4 s")
    result = run(live(args.cpus, knee.calls, slo_calls, args.quick))
    assert isinstance(result, LiveResult)
    print(f"  base load, 1 relay:        {fmt_window(result.base)}")
    print(f"  storm, before scale-out:   {fmt_window(result.before)}")
    print(f"  after scale-out:           {fmt_window(result.after)}")
    print(f"  peak relays {result.peak_relays}, ICE restarts {result.restarts}, failed "
          f"allocations {result.failed}, allocations cut at scale-in: {result.cut}")
    for line in result.events:
        print(f"    {line}")
    return result.cut


def verdict_line(verdicts: list[Verdict], live_cut: int, left: list[str]) -> str:
    worst = {name: max(getattr(v, name) for v in verdicts)
             for name in ("violation", "replica", "pods", "cut", "oracle")}
    ok = all(v.ok for v in verdicts) and live_cut == 0 and not left
    short = [v.trace for v in verdicts if not v.ok]
    return (f"autoscale: SLO-violation x{worst['violation']:.2f}, relay-seconds "
            f"x{worst['replica']:.2f} (pods x{worst['pods']:.2f}), "
            f"{worst['cut'] + live_cut:.0f} cut, x{worst['oracle']:.2f} the oracle"
            + (f" (short on: {', '.join(short)})" if short else "")
            + f" (goal <= x{GOAL_VIOLATION_RATIO:g} SLO-violation at <= "
            f"x{GOAL_REPLICA_RATIO:g} relay-seconds of the best draining baseline, 0 cut, "
            f"<= x{GOAL_ORACLE_RATIO:g} the oracle, every trace, medians over seeds) "
            f"{'ok' if ok else 'short'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.autoscale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter steps (< 60 s in all)")
    parser.add_argument("--cpus", type=float, default=0.25, help="CPU cap per relay, cores")
    parser.add_argument("--seeds", type=int, default=None,
                        help="trace seeds 1..N (default 3 with --quick, else 7)")
    parser.add_argument("--interval", type=int, default=Footing.interval,
                        help="every policy's evaluation interval, s")
    parser.add_argument("--lag", type=int, default=Footing.lag,
                        help="every policy's metric lag, s")
    parser.add_argument("--resize-delay", type=int, default=Footing.resize_delay)
    parser.add_argument("--resize-refusal", type=float, default=Footing.resize_refusal,
                        help="share of nodes without spare CPU for a resize up")
    parser.add_argument("--no-live", action="store_true", help="skip the real trace")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    steal = {"start": read_steal_seconds()}
    try:
        import uvloop
        run: Callable[..., object] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency of the generator
        run = asyncio.run

    step_seconds = 1.0 if args.quick else 3.0
    # quick: no 100-call step (the light-load p99 comes from the first step, the knee and
    # saturation from the upper ones), to stay under a minute when the relay is fast
    calls = (20, 160, 200, 240, 280, 340) if args.quick else (20, 100, 160, 200, 240, 280, 340)
    scale = args.cpus / 0.25
    print(f"1. calibration: one coturn capped at {args.cpus:g} CPU, calls of {MEDIA_PPS} pps "
          f"each way ({SESSION_RELAYED_PPS} relayed pps), {step_seconds:g} s per step")
    print(f"  {'':>11}{'offered':>9}{'relayed':>9}{'loss':>8}{'p99 ms':>9}{'CPU':>7}")
    calibrated = run(calibrate(args.cpus, [round(scale * n) for n in calls], step_seconds,
                               BURST, round(scale * 480), round(scale * 960)))
    assert isinstance(calibrated, tuple)
    steps, burst = calibrated
    model, knee = fit_model(steps, args.cpus, burst)
    print_calibration(model, knee, burst)
    steal["calibration"] = read_steal_seconds()
    print(f"  ({time.perf_counter() - started:.0f} s so far)")

    footing = Footing(interval=args.interval, lag=args.lag, resize_delay=args.resize_delay,
                      resize_refusal=args.resize_refusal)
    seeds = list(range(1, (args.seeds or (3 if args.quick else 7)) + 1))
    # quick: no second table (ours at 1 s costs the most to replay)
    verdicts = print_replay(model, footing, seeds, second=not args.quick)
    steal["replay"] = read_steal_seconds()
    print(f"  ({time.perf_counter() - started:.0f} s so far)")

    live_cut = 0
    if not args.no_live:
        live_cut = print_live(args, run, knee, model.slo_sessions(SLO_RTT_MS, SLO_LOSS))
    steal["live"] = read_steal_seconds()
    left = leftovers()
    print(f"cleanup: {len(LEFTOVERS['pids'])} relay processes and "
          f"{len(LEFTOVERS['cgroups'])} cgroups started, "
          + (f"LEFT OVER: {', '.join(left)}" if left else "none left"))
    elapsed = time.perf_counter() - started
    print(f"\ntotal {elapsed:.0f} s; CPU time stolen by the hypervisor (all CPUs): "
          f"calibration {steal['calibration'] - steal['start']:.1f} s, replay "
          f"{steal['replay'] - steal['calibration']:.1f} s, live "
          f"{steal['live'] - steal['replay']:.1f} s; figure = worst ratio of ours over the "
          "traces (relay-seconds CPU-weighted; pods whatever their CPU beside)")
    print(verdict_line(verdicts, live_cut, left))
    return 0


if __name__ == "__main__":
    sys.exit(main())

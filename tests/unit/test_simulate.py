"""The trace-replay simulator: deterministic, overload hurts, drain cuts nothing."""

from __future__ import annotations

import dataclasses
import pathlib
import random
from dataclasses import asdict

import pytest
import yaml

from turnstorm.operator.render import render_pool
from turnstorm.policy import Autoscaler, StormOptions
from turnstorm.simulate import (
    PRESTOP_POLL_SECONDS,
    SESSION_RELAYED_PPS,
    PolicySetup,
    Pool,
    RelayModel,
    Session,
    SimConfig,
    SimRelay,
    SimResult,
    Trace,
    diurnal_ramp,
    flash_crowd,
    oracle,
    pool_p99,
    reconnect_storm,
    reconnect_waves,
    regional_failover,
    replicaset_victims,
    simulate,
)
from turnstorm.spec import ScalingBehavior, ScalingPolicy, VerticalScaling, turnpool_from_object

MODEL = RelayModel.fit(capacity_pps=25_000, cpu_per_packet=12.5e-6, cpu_limit=0.25,
                       base_p99_ms=8.0, knee_pps=19_000, knee_p99_ms=70.0, max_p99_ms=900.0)


def policy(target: float, down_window: int = 300) -> ScalingPolicy:
    return ScalingPolicy(enabled=True, tolerance=0.1, targets={"allocationsPerRelay": target},
                         scale_up=ScalingBehavior(0, 100, 4, 15),
                         scale_down=ScalingBehavior(down_window, 100, 0, 15),
                         drain_deadline_seconds=900)


def setup(drain: bool, target: float = 180, down_window: int = 300) -> PolicySetup:
    return PolicySetup("p", lambda: Autoscaler(policy(target, down_window), 1, 12,
                                               StormOptions(enabled=drain)),
                       interval=5, scale_in="drain" if drain else "delete")


def test_same_seed_same_result() -> None:
    a = reconnect_storm(3, length=400)
    b = reconnect_storm(3, length=400)
    assert a.sessions == b.sessions
    assert reconnect_storm(4, length=400).sessions != a.sessions
    ra, rb = simulate(a, MODEL, setup(True)), simulate(b, MODEL, setup(True))
    assert asdict(ra) == asdict(rb)
    assert flash_crowd(3, length=400).sessions == flash_crowd(3, length=400).sessions


def test_model_anchored_to_calibration() -> None:
    knee = 19_000
    assert MODEL.p99_ms(knee) == pytest.approx(70.0)
    assert MODEL.p99_ms(100) == pytest.approx(8.0, abs=0.2)
    assert MODEL.loss(knee) < 1e-6
    assert MODEL.loss(2 * MODEL.capacity_pps) == pytest.approx(0.5, abs=1e-3)
    assert MODEL.cpu_percent(knee) == pytest.approx(95.0)
    assert MODEL.cpu_percent(10 * knee) == 100.0
    assert 190 <= MODEL.slo_sessions() <= 240


def test_more_load_than_capacity_loses_packets_and_raises_rtt() -> None:
    loads = [0.2, 0.6, 0.9, 1.0, 1.3, 2.0]
    losses = [MODEL.loss(r * MODEL.capacity_pps) for r in loads]
    rtts = [MODEL.p99_ms(r * MODEL.capacity_pps) for r in loads]
    assert losses == sorted(losses) and rtts == sorted(rtts)
    assert losses[-2] > 0.2 and rtts[-1] > 150

    def run(calls: int) -> tuple[int, float, float]:
        # One relay, the policy pinned to it (min = max = 1).
        trace = Trace("steady", [Session(0, 100) for _ in range(calls)], 60, 0)
        fixed = PolicySetup("fixed", lambda: Autoscaler(policy(1e9), 1, 1,
                                                        StormOptions(enabled=False)))
        result = simulate(trace, MODEL, fixed, SimConfig(initial=1, min_replicas=1,
                                                         max_replicas=1))
        second = result.seconds[10]
        return result.slo_violation_seconds, second.loss, second.p99_ms

    light, heavy = run(100), run(2 * round(MODEL.capacity_pps / SESSION_RELAYED_PPS))
    assert light[0] == 0 and light[1] == 0 and light[2] < 150
    assert heavy[0] == 60 and heavy[1] > 0.4 and heavy[2] > 150


def test_pool_p99_is_packet_weighted() -> None:
    assert pool_p99([(99.0, 10.0), (1.0, 500.0)]) == 10.0
    assert pool_p99([(98.0, 10.0), (2.0, 500.0)]) == 500.0
    assert pool_p99([]) == 0.0


def scale_in_trace() -> Trace:
    """Load for 4 relays, then most calls end while long calls stay on every relay."""
    sessions = [Session(0, 60) for _ in range(600)] + [Session(0, 500) for _ in range(80)]
    return Trace("scale-in", sessions, 600, 0)


def test_deleting_relays_cuts_sessions_and_draining_cuts_none() -> None:
    config = SimConfig(initial=4, startup=15)
    deleted = simulate(scale_in_trace(), MODEL, setup(False, down_window=60), config)
    drained = simulate(scale_in_trace(), MODEL, setup(True, down_window=60), config)
    assert deleted.allocations_cut > 0
    assert drained.allocations_cut == 0
    assert any("drain" in e for e in drained.events)
    # Draining relays keep running until their last call ends: more replica-seconds.
    assert drained.replica_seconds >= deleted.replica_seconds
    assert drained.seconds[-1].relays < 4
    # Without cuts the deleting policy's decisions would have cost more than it paid: each
    # deleted relay had to stay until its 500 s calls ended (started at 0, so the
    # relays deleted at t would have lived 500 - t more seconds).
    assert drained.uncut_replica_seconds == drained.replica_seconds
    deletions = [int(e.split()[0][2:]) for e in deleted.events if " delete " in e]
    assert deletions
    assert deleted.uncut_replica_seconds == deleted.replica_seconds + sum(
        500 - t for t in deletions)


def test_drain_deadline_cuts_what_is_left() -> None:
    short = ScalingPolicy(enabled=True, tolerance=0.1, targets={"allocationsPerRelay": 180},
                          scale_up=ScalingBehavior(0, 100, 4, 15),
                          scale_down=ScalingBehavior(60, 100, 0, 15), drain_deadline_seconds=30)
    hurried = PolicySetup("deadline", lambda: Autoscaler(short, 1, 12, StormOptions()),
                          interval=5, scale_in="drain")
    result = simulate(scale_in_trace(), MODEL, hurried, SimConfig(initial=4))
    assert result.allocations_cut > 0


def test_pack_placement_fills_the_oldest_relays_and_frees_the_others() -> None:
    # 4 relays up, 100 calls of 300 s arriving over the first 50 s, target 180 per relay.
    trace = Trace("slow", [Session(t // 2, 300) for t in range(100)], 400, 0)
    config = SimConfig(initial=4, startup=15)

    def run(pack: float | None) -> tuple[int, list[str]]:
        scaler = PolicySetup("p", lambda: Autoscaler(policy(180, 60), 1, 12, StormOptions()),
                             interval=5, scale_in="drain", pack_fill=pack)
        result = simulate(trace, MODEL, scaler, config)
        assert result.allocations_cut == 0
        return result.replica_seconds, result.events

    packed, packed_events = run(180)
    spread, spread_events = run(None)
    # Packed: every call on relay-0, the three others drained empty and removed at once.
    assert [e.split()[-2] for e in packed_events if " drain " in e] == ["(0", "(0", "(0"]
    assert not [e for e in packed_events if " drain relay-0" in e]
    # Spread: the drained relays carry calls and live until those end (t >= 300).
    assert all(e.split()[-2] != "(0" for e in spread_events if " drain " in e)
    assert packed < spread * 0.5


def test_pack_placement_costs_fewer_replica_seconds_through_a_storm() -> None:
    trace = reconnect_storm(1, subscribers=4000, share=0.25, window=60, background=300)
    config = SimConfig(max_replicas=12)

    def run(pack: float | None) -> int:
        storm = StormOptions(lookahead_seconds=30, slope_window_seconds=10)
        scaler = PolicySetup("p", lambda: Autoscaler(policy(200, 30), 1, 12, storm),
                             interval=1, scale_in="drain", pack_fill=pack)
        result = simulate(trace, MODEL, scaler, config)
        assert result.allocations_cut == 0
        return result.replica_seconds

    assert run(200) < 0.9 * run(None)


def test_a_resized_relay_serves_in_proportion_to_its_cpu() -> None:
    load = 1.2 * MODEL.capacity_pps
    assert MODEL.equivalent_load(load, 1.0) == load
    assert MODEL.equivalent_load(load, 0.5) == 2 * load
    assert MODEL.loss(MODEL.equivalent_load(load, 1.5)) < 1e-6
    # each CPU unit above 1 adds 60 % of a unit's throughput: never slower than at 1
    slower = dataclasses.replace(MODEL, burst_marginal=0.6)
    assert slower.equivalent_load(load, 1.5) == pytest.approx(load / 1.3)
    assert slower.equivalent_load(load, 1.25) == pytest.approx(load / 1.15)
    assert dataclasses.replace(MODEL, burst_marginal=-1).equivalent_load(load, 1.5) == load
    # below 1 it does not apply (a smaller cap keeps its share)
    assert slower.equivalent_load(load, 0.5) == 2 * load


def test_vertical_resizing_keeps_the_first_relays_inside_the_slo_and_is_paid_for() -> None:
    """A storm faster than relays start: without resizing the first relays are overloaded
    and their calls stay there; resized in place they are not. Replica-seconds count each
    relay at its CPU factor."""
    trace = reconnect_storm(1, subscribers=3600, share=0.25, window=60, background=260,
                            length=900)
    vertical = VerticalScaling(enabled=True, max_factor=1.5, min_factor=0.25, step=0.25)

    def run(scaling: VerticalScaling) -> SimResult:
        made = dataclasses.replace(policy(180, down_window=30), vertical=scaling)
        return simulate(trace, MODEL, PolicySetup(
            "p", lambda: Autoscaler(made, 1, 12, StormOptions(lookahead_seconds=30,
                                                              slope_window_seconds=10)),
            interval=1, scale_in="drain", pack_fill=180))

    plain, resized = run(VerticalScaling()), run(vertical)
    assert plain.resizes == 0 and plain.replica_seconds == plain.pod_seconds
    assert resized.resizes > 0 and resized.allocations_cut == 0
    assert plain.slo_violation_seconds >= 10
    assert resized.slo_violation_seconds <= plain.slo_violation_seconds / 4
    # bursts are counted above 1 relay each, shrunk drainers below
    assert any(s.cpu > s.relays for s in resized.seconds)
    assert any(s.cpu < s.relays for s in resized.seconds)
    assert resized.replica_seconds == pytest.approx(sum(s.cpu for s in resized.seconds))


# -- whole datagrams ----------------------------------------------------------------------------

# A relay whose buffer holds fewer packets (4,000): the M/M/1/K loss at 95 % utilisation is
# about 1e-90 of the packets, a fraction of a datagram that no kernel counter ever shows.
SMALL_BUFFER = RelayModel.fit(capacity_pps=20_000, cpu_per_packet=12.5e-6, cpu_limit=0.25,
                              base_p99_ms=8.0, knee_pps=17_000, knee_p99_ms=70.0,
                              max_p99_ms=200.0)


def one_relay_at(calls: int, storm: bool = True, length: int = 120) -> SimResult:
    """One relay carrying ``calls`` for the whole trace, an allocation target it never
    reaches: only the UDP-drop rule can start relays."""
    trace = Trace("steady", [Session(0, length) for _ in range(calls)], length, 0)
    scaler = PolicySetup("p", lambda: Autoscaler(policy(1e6), 1, 4,
                                                 StormOptions(enabled=storm)),
                         interval=1, scale_in="drain")
    return simulate(trace, SMALL_BUFFER, scaler, SimConfig(initial=1))


def test_a_relay_below_saturation_drops_no_whole_datagram_and_starts_no_relay() -> None:
    calls = round(0.95 * SMALL_BUFFER.capacity_pps / SESSION_RELAYED_PPS)
    assert calls * SESSION_RELAYED_PPS * SMALL_BUFFER.loss(calls * SESSION_RELAYED_PPS) > 0
    result = one_relay_at(calls)
    assert all(s.loss == 0.0 for s in result.seconds)
    assert not [e for e in result.events if "udp_drops" in e]
    assert result.peak_relays == 1


def test_an_overloaded_relay_drops_whole_datagrams_and_the_policy_scales_up() -> None:
    calls = round(1.2 * SMALL_BUFFER.capacity_pps / SESSION_RELAYED_PPS)
    load = calls * SESSION_RELAYED_PPS
    fixed = one_relay_at(calls, storm=False)
    for second in fixed.seconds[1:]:
        dropped = second.loss * load
        assert dropped == pytest.approx(round(dropped), abs=1e-6)
        assert round(dropped) == pytest.approx(load * SMALL_BUFFER.loss(load), abs=1)
    assert [e for e in one_relay_at(calls).events if "udp_drops" in e]


# -- vertical resizing with pack ----------------------------------------------------------------


def refill_trace() -> Trace:
    """400 calls at once on two relays (target 180: both go over it and are resized), then
    a steady call a second for 300 s each (about 300 calls: two relays at the target)."""
    burst = [Session(t % 5, 60 + (t * 3) % 600) for t in range(400)]
    steady = [Session(t, 300) for t in range(5, 1500)]
    return Trace("refill", burst + steady, 1500, 0)


def test_pack_lets_a_resized_relay_come_back_to_its_cpu() -> None:
    vertical = VerticalScaling(enabled=True, max_factor=1.5, min_factor=0.25, step=0.25)
    made = dataclasses.replace(policy(180, down_window=30), vertical=vertical)
    setup = PolicySetup("p", lambda: Autoscaler(made, 1, 12, StormOptions()), interval=1,
                        scale_in="drain", pack_fill=180)
    result = simulate(refill_trace(), MODEL, setup, SimConfig(initial=2))
    assert result.resizes > 0 and max(s.cpu - s.relays for s in result.seconds) > 0
    # once the burst's calls are gone, no relay keeps CPU above the pool's
    assert all(s.cpu <= s.relays for s in result.seconds[900:])


# -- Deployment scale-in: the ReplicaSet's pick, the rendered preStop drain ---------------------


def relay(name: str, ready_at: int) -> SimRelay:
    return SimRelay(name, int(name[1:]), ready_at)


def test_replicaset_deletes_unready_then_newest_ready_with_random_ties() -> None:
    pods = [relay("r0", 0), relay("r1", 1), relay("r2", 990), relay("r3", 1200)]
    # r3 still starting; r2 ready 10 s, r0 and r1 about 1000 s (one log2 bucket)
    picks = {tuple(r.name for r in replicaset_victims(pods, 3, 1000, random.Random(seed)))
             for seed in range(20)}
    assert picks == {("r3", "r2", "r0"), ("r3", "r2", "r1")}
    assert replicaset_victims(pods, 0, 1000, random.Random(1)) == []


def test_prestop_model_matches_the_rendered_hook() -> None:
    spec = turnpool_from_object(yaml.safe_load(
        (pathlib.Path(__file__).parents[2] / "examples" / "turnpool.yaml").read_text()))
    deployment = next(o for o in render_pool(spec, replicas=2) if o["kind"] == "Deployment")
    relay_container = deployment["spec"]["template"]["spec"]["containers"][0]
    script = relay_container["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert f"+ {spec.scaling.drain_deadline_seconds} ))" in script
    assert script.endswith(f"sleep {PRESTOP_POLL_SECONDS}; done")


def prestop_pool(deadline: int) -> Pool:
    """Four relays with 100 calls each (ending by t=200), then a call a second: a KEDA
    on allocations scales in to one relay."""
    made = dataclasses.replace(policy(300, down_window=0), drain_deadline_seconds=deadline)
    setup = PolicySetup("keda", lambda: Autoscaler(made, 1, 12, StormOptions(enabled=False)),
                        interval=5, scale_in="prestop")
    sessions = [Session(0, 100 + i % 100) for i in range(400)]
    sessions += [Session(t, 30) for t in range(1, 400)]
    return Pool(Trace("scale-in", sessions, 400, 0), MODEL, setup, SimConfig(initial=4))


def test_a_relay_deleted_by_the_replicaset_keeps_its_calls_and_takes_no_new_ones() -> None:
    pool = prestop_pool(deadline=900)
    deleted: dict[str, int] = {}
    for now in range(400):
        before = {r.name: set(r.sessions) for r in pool.relays.values()}
        pool.step(now)
        for r in pool.relays.values():
            if r.deleted_at is not None and r.deleted_at < now:
                deleted.setdefault(r.name, r.deleted_at)
                assert set(r.sessions) <= before[r.name]  # no new call
    result = pool.result()
    assert len(deleted) == 3 and result.allocations_cut == 0
    # each stays until its last call ends (t = 100..199), then goes
    gone = {e.split()[4]: int(e.split()[0][2:]) for e in result.events if "after preStop" in e}
    assert set(gone) == set(deleted)
    assert all(t >= 100 for t in gone.values())
    # and costs its relay-seconds meanwhile
    assert result.pod_seconds == sum(s.relays for s in result.seconds)
    assert max(s.relays for s in result.seconds[deleted[min(deleted)] + 1:]) == 4


def test_the_prestop_deadline_cuts_what_is_left() -> None:
    pool = prestop_pool(deadline=20)
    for now in range(400):
        pool.step(now)
    result = pool.result()
    assert result.allocations_cut > 0
    assert [e for e in result.events if "at preStop deadline" in e]


# -- the oracle, lag and delays -----------------------------------------------------------------


def test_oracle_is_the_fewest_relays_within_the_knee_each_second() -> None:
    trace = Trace("t", [Session(0, 10), Session(0, 10), Session(5, 10)], 20, 0)
    result = oracle(trace, per_relay=2)
    # 2 calls (1 relay) for 5 s, 3 calls (2) for 5 s, 1 call for 5 s, none (the minimum 1)
    assert [s.relays for s in result.seconds] == [1] * 5 + [2] * 5 + [1] * 10
    assert result.replica_seconds == result.pod_seconds == 25
    assert result.peak_relays == 2 and result.allocations_cut == 0


def first_start(lag: int) -> int:
    trace = Trace("step", [Session(100, 300) for _ in range(600)], 200, 100)
    result = simulate(trace, MODEL, setup(False), SimConfig(metric_lag=lag))
    return min(int(e.split()[0][2:]) for e in result.events if " start " in e)


def test_the_policy_sees_metrics_with_the_configured_lag() -> None:
    assert first_start(0) == 100
    assert first_start(12) == 115  # seen at 112, acted on at the next evaluation


def test_new_relays_take_calls_only_once_their_endpoint_has_propagated() -> None:
    def first_call(delay: int) -> int:
        trace = Trace("step", [Session(t, 300) for t in range(400) for _ in range(2)], 400, 0)
        pool = Pool(trace, MODEL, setup(True, target=100), SimConfig(initial=1,
                                                                      endpoint_delay=delay))
        for now in range(400):
            pool.step(now)
            if "relay-1" in pool.relays and pool.relays["relay-1"].sessions:
                return now - pool.relays["relay-1"].ready_at
        raise AssertionError("relay-1 never took a call")

    assert first_call(0) == 0
    assert first_call(4) == 4


def test_resizes_take_their_grant_delay_and_can_be_refused() -> None:
    trace = reconnect_storm(1, subscribers=3600, share=0.25, window=60, background=260,
                            length=400)
    vertical = VerticalScaling(enabled=True, max_factor=1.5, min_factor=0.25, step=0.25)
    made = dataclasses.replace(policy(180, down_window=30), vertical=vertical)

    def run(**config: float) -> SimResult:
        return simulate(trace, MODEL, PolicySetup(
            "p", lambda: Autoscaler(made, 1, 12, StormOptions(lookahead_seconds=30,
                                                              slope_window_seconds=10)),
            interval=1, scale_in="drain", pack_fill=180),
            SimConfig(**config))  # type: ignore[arg-type]

    granted, refused = run(), run(resize_refusal=1.0)
    assert granted.refused == 0 and refused.refused > 0
    assert max(s.cpu - s.relays for s in granted.seconds) > 0
    assert all(s.cpu <= s.relays for s in refused.seconds)  # asked, never granted
    late = run(resize_delay=5)
    first = min(s.t for s in granted.seconds if s.cpu > s.relays)
    assert min(s.t for s in late.seconds if s.cpu > s.relays) == first + 4


def arrivals_between(trace: Trace, first: int, last: int) -> int:
    return sum(1 for s in trace.sessions if first <= s.arrival < last)


def test_carrier_traces_have_their_shape_and_follow_their_seed() -> None:
    waves = reconnect_waves(2, subscribers=4000, waves=((60, 0.15, 20), (150, 0.15, 45)),
                            background=300)
    assert waves.sessions == reconnect_waves(2, subscribers=4000, background=300,
                                             waves=((60, 0.15, 20),
                                                    (150, 0.15, 45))).sessions
    assert arrivals_between(waves, 60, 80) >= 600 and arrivals_between(waves, 150, 195) >= 600
    assert arrivals_between(waves, 90, 140) < 150  # the background's arrivals alone

    failover = regional_failover(2, moved=900, window=20, start=60, extra_rate=3.0, hold=420,
                                 background=300)
    assert arrivals_between(failover, 60, 80) >= 900
    moved_in = [s for s in failover.sessions if 60 <= s.arrival < 80]
    assert max(s.duration for s in moved_in) <= 600
    during, after = arrivals_between(failover, 200, 480), arrivals_between(failover, 600, 880)
    assert during > after + 2.0 * 280 * 0.8  # 3 calls/s more while it lasts

    ramp = diurnal_ramp(2, peak_rate=6.0, ramp=600, start=60, background=300)
    early, late = arrivals_between(ramp, 60, 160), arrivals_between(ramp, 700, 800)
    assert late > 3 * early
    assert diurnal_ramp(3).sessions != ramp.sessions

"""The trace-replay simulator: deterministic, overload hurts, drain cuts nothing."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict

import pytest

from turnstorm.policy import Autoscaler, StormOptions
from turnstorm.simulate import (
    SESSION_RELAYED_PPS,
    PolicySetup,
    RelayModel,
    Session,
    SimConfig,
    SimResult,
    Trace,
    flash_crowd,
    pool_p99,
    reconnect_storm,
    simulate,
)
from turnstorm.spec import ScalingBehavior, ScalingPolicy, VerticalScaling

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
                       interval=5, drain=drain)


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
                          interval=5, drain=True)
    result = simulate(scale_in_trace(), MODEL, hurried, SimConfig(initial=4))
    assert result.allocations_cut > 0


def test_pack_placement_fills_the_oldest_relays_and_frees_the_others() -> None:
    # 4 relays up, 100 calls of 300 s arriving over the first 50 s, target 180 per relay.
    trace = Trace("slow", [Session(t // 2, 300) for t in range(100)], 400, 0)
    config = SimConfig(initial=4, startup=15)

    def run(pack: float | None) -> tuple[int, list[str]]:
        scaler = PolicySetup("p", lambda: Autoscaler(policy(180, 60), 1, 12, StormOptions()),
                             interval=5, drain=True, pack_fill=pack)
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
                             interval=1, drain=True, pack_fill=pack)
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
            interval=1, drain=True, pack_fill=180))

    plain, resized = run(VerticalScaling()), run(vertical)
    assert plain.resizes == 0 and plain.replica_seconds == plain.pod_seconds
    assert resized.resizes > 0 and resized.allocations_cut == 0
    assert plain.slo_violation_seconds >= 10
    assert resized.slo_violation_seconds <= plain.slo_violation_seconds / 4
    # bursts are counted above 1 relay each, shrunk drainers below
    assert any(s.cpu > s.relays for s in resized.seconds)
    assert any(s.cpu < s.relays for s in resized.seconds)
    assert resized.replica_seconds == pytest.approx(sum(s.cpu for s in resized.seconds))

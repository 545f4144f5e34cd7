"""The scaling policy on a fake clock, as tables of scenarios."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from turnstorm.policy import Autoscaler, Decision, RelaySample, StormOptions
from turnstorm.spec import (
    ScalingBehavior,
    ScalingPolicy,
    SpecError,
    VerticalScaling,
    turnpool_from_object,
)


def policy(targets: dict[str, float] | None = None, *, up_window: int = 0,
           down_window: int = 300, up_percent: int = 100, up_pods: int = 4,
           down_percent: int = 100, period: int = 15, tolerance: float = 0.1,
           drain_deadline: int = 900) -> ScalingPolicy:
    return ScalingPolicy(
        enabled=True, tolerance=tolerance,
        targets=targets if targets is not None else {"allocationsPerRelay": 100},
        scale_up=ScalingBehavior(up_window, up_percent, up_pods, period),
        scale_down=ScalingBehavior(down_window, down_percent, 0, period),
        drain_deadline_seconds=drain_deadline,
    )


def relays(*allocations: float | None, ready: bool = True, **signals: list[float | None]
           ) -> list[RelaySample]:
    out = []
    for i, value in enumerate(allocations):
        sig: dict[str, float | None] = {"allocations": value}
        for name, values in signals.items():
            sig[name] = values[i]
        out.append(RelaySample(f"r{i}", ready=ready, signals=sig))
    return out


HPA = StormOptions(enabled=False)


@dataclass
class Case:
    name: str
    samples: list[RelaySample]
    expect: int
    targets: dict[str, float] = field(default_factory=lambda: {"allocationsPerRelay": 100})
    min_r: int = 1
    max_r: int = 100


HPA_CASES = [
    Case("at target holds", relays(100, 100), 2),
    Case("inside tolerance holds", relays(108, 108), 2),
    Case("just outside tolerance scales up", relays(115, 115), 3),
    Case("double load doubles", relays(200, 200), 4),
    Case("scale-up capped at max(100%, 4 pods) per period", relays(1000, 1000), 6),
    Case("max clamps", relays(300, 300), 5, max_r=5),
    Case("missing relay counts 0 on scale-up", relays(300, None), 3),
    Case("missing relay flips direction: hold", relays(150, None, None), 3),
    Case("missing counts at target on scale-down", relays(10, None), 2),
    Case("all missing holds", relays(None, None, None), 3),
    Case("NaN and inf count as missing", relays(float("nan"), float("inf"), 300), 3),
    Case("max over signals", relays(50, 50, binding_rate=[3000.0, 3000.0]), 6,
         targets={"allocationsPerRelay": 100, "bindingRatePerRelay": 1000}),
    Case("cpu percent signal", relays(0, 0, cpu_percent=[140.0, 140.0]), 4,
         targets={"cpuUtilization": 70}),
]


@pytest.mark.parametrize("case", HPA_CASES, ids=[c.name for c in HPA_CASES])
def test_hpa_equivalence(case: Case) -> None:
    scaler = Autoscaler(policy(case.targets), case.min_r, case.max_r, HPA)
    assert scaler.evaluate(0.0, case.samples).desired == case.expect


def test_not_ready_relays_count_zero_on_scale_up() -> None:
    samples = relays(300, 300) + [RelaySample("new", ready=False, signals={"allocations": None})]
    decision = Autoscaler(policy(), 1, 100, HPA).evaluate(0.0, samples)
    # mean over 3 relays = 200 -> ratio 2 -> 6
    assert decision.desired == 6
    assert decision.limiting_signal == "allocations"
    assert decision.ratios["allocations"] == pytest.approx(2.0)


def test_scale_down_waits_for_the_stabilization_window() -> None:
    scaler = Autoscaler(policy(), 1, 100, HPA)
    assert scaler.evaluate(0.0, relays(100, 100, 100, 100)).desired == 4
    decisions = [scaler.evaluate(t, relays(20, 20, 20, 20)).desired
                 for t in (15.0, 150.0, 299.0)]
    assert decisions == [4, 4, 4]
    late = scaler.evaluate(301.0, relays(20, 20, 20, 20))
    assert late.desired == 1
    assert late.drain == ["r0", "r1", "r2"]


def test_flapping_load_does_not_flap_the_pool() -> None:
    scaler = Autoscaler(policy(), 1, 100, HPA)
    sizes = []
    size = 4
    for step in range(40):
        load = 130 if step % 2 else 60  # per relay
        decision = scaler.evaluate(step * 15.0, relays(*([load] * size)))
        size = decision.desired
        sizes.append(size)
    # Up moves follow load at once; down moves need 300 s of low recommendations,
    # which the alternating load never gives: the pool only grows, then holds.
    assert sizes == sorted(sizes)
    assert max(sizes) == sizes[-1]


def test_scale_up_rate_is_per_period_from_the_periods_start() -> None:
    scaler = Autoscaler(policy(), 1, 100, HPA)
    assert scaler.evaluate(0.0, relays(5000)).desired == 5      # 1 + max(1, 4)
    assert scaler.evaluate(5.0, relays(*[1000] * 5)).desired == 5   # same period
    assert scaler.evaluate(16.0, relays(*[1000] * 5)).desired == 10  # 5 + max(5, 4)


def test_storm_projection_scales_before_the_target_is_crossed() -> None:
    hpa = Autoscaler(policy(), 1, 100, HPA)
    storm = Autoscaler(policy(), 1, 100, StormOptions(lookahead_seconds=30))
    # Allocations rising 2/s per relay: at t=30 they are at 90 % of target.
    for t in (0.0, 10.0, 20.0, 30.0):
        level = 30 + 2 * t
        h = hpa.evaluate(t, relays(level, level))
        s = storm.evaluate(t, relays(level, level))
    assert h.desired == 2
    assert s.desired == 3 and s.limiting_signal == "allocations"


@pytest.mark.parametrize(("window", "desired"), [(30.0, 3), (10.0, 4)])
def test_a_short_slope_window_sees_a_storm_sooner(window: float, desired: int) -> None:
    """Steady 70 per relay, then a storm adds 9/s per relay from t=60; evaluated every
    second. Three seconds in, the 10 s window's slope is the storm's, the 30 s one still
    averages in the quiet time before it."""
    scaler = Autoscaler(policy(), 1, 100,
                        StormOptions(lookahead_seconds=30, slope_window_seconds=window))
    decision = None
    for t in range(0, 64):
        level = 70.0 + max(0, t - 60) * 9
        decision = scaler.evaluate(float(t), relays(level, level))
    # t=63: 194 in all. 10 s window: slope (194-140)/10 = 5.4/s, 194 + 162 = 356 over
    # 2 x 100 -> ratio 1.78 -> 4 relays. 30 s window: slope 54/30 = 1.8/s -> 248 -> 3.
    assert decision is not None and decision.desired == desired


@pytest.mark.parametrize("event", ["missed scrape", "drained then undrained"])
def test_a_relay_reporting_again_is_not_a_storm(event: str) -> None:
    """Three relays steady at 80 (target 100). At t=0 one of them is missing from the
    samples (a missed scrape, or it is draining); from t=1 it reports again with its 80.
    The slope window (10 s) still holds t=0 at t=10: summed over the pool, that reads as
    80 allocations gained in 10 s, projected +240 over the lookahead (ratio 1.6, five
    relays). Relay by relay, nothing grew."""
    scaler = Autoscaler(policy(), 1, 100,
                        StormOptions(lookahead_seconds=30, slope_window_seconds=10))
    for t in range(0, 11):
        samples = relays(80, 80, 80)
        if t == 0:
            if event == "missed scrape":
                samples[2].signals["allocations"] = None
            else:
                samples[2] = RelaySample("r2", ready=True, signals={"allocations": 80},
                                         draining=True)
        decision = scaler.evaluate(float(t), samples)
        # summed over the pool, t=1 read 80 gained in 1 s: a recommendation of 27
        assert decision.recommendations["allocations"] <= 3, (t, decision.reason)
        assert decision.desired <= 3, (t, decision.reason)


def test_a_new_relay_brings_its_growth_into_the_slope() -> None:
    """Calls landing on a relay that joined within the window are growth: the new relay
    first reports 0 and then 60 more, with the two old relays flat at 80."""
    scaler = Autoscaler(policy(), 1, 100,
                        StormOptions(lookahead_seconds=30, slope_window_seconds=10))
    scaler.evaluate(0.0, relays(80, 80))
    scaler.evaluate(5.0, relays(80, 80, 0))
    decision = scaler.evaluate(10.0, relays(80, 80, 60))
    # slope 60/10 = 6/s -> 220 + 180 = 400 over 3 x 100 -> ratio 1.33 -> 4 relays
    assert decision.recommendations["allocations"] == 4, decision.reason
    assert decision.desired == 4, decision.reason


def test_storm_options_come_from_the_turnpool() -> None:
    from turnstorm.spec import turnpool_from_object

    spec = turnpool_from_object({
        "apiVersion": "turnstorm.io/v1alpha1", "kind": "TurnPool",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {"realm": "r.example", "authSecretRef": {"name": "s"},
                 "scaling": {"storm": {"lookaheadSeconds": 20, "slopeWindowSeconds": 10,
                                       "portHeadroomPercent": 80}}}})
    options = StormOptions.from_policy(spec.scaling)
    assert (options.enabled, options.lookahead_seconds, options.slope_window_seconds,
            options.port_headroom) == (True, 20.0, 10.0, 0.8)


def test_relay_port_capacity_is_a_hard_ceiling_per_relay() -> None:
    samples = relays(95, 95)
    for sample in samples:
        sample.port_capacity = 100
    # Allocation target 1000 is far away, but 190 allocations need 190/90 -> 3 relays.
    scaler = Autoscaler(policy({"allocationsPerRelay": 1000}), 1, 10)
    decision = scaler.evaluate(0.0, samples)
    assert decision.desired == 3
    assert decision.limiting_signal == "relay_ports"


def test_udp_drops_scale_up_even_without_a_target() -> None:
    samples = relays(10, 10, udp_rcvbuf_errors=[0.0, 35.0])
    decision = Autoscaler(policy(), 1, 10).evaluate(0.0, samples)
    assert decision.desired == 3 and decision.limiting_signal == "udp_drops"
    assert Autoscaler(policy(), 1, 10, HPA).evaluate(0.0, samples).desired == 2


@pytest.mark.parametrize(("rate", "desired"), [(0.0, 2), (1e-302, 2), (0.9, 2), (1.0, 3)])
def test_udp_drops_under_one_datagram_a_second_are_no_storm(rate: float, desired: int) -> None:
    from turnstorm.policy import saturated

    samples = relays(10, 10, udp_rcvbuf_errors=[0.0, rate])
    assert Autoscaler(policy(), 1, 10).evaluate(0.0, samples).desired == desired
    assert saturated(samples[1], {}) == (desired == 3)


def test_udp_drops_add_one_step_until_the_new_relay_is_ready() -> None:
    """Evaluated every second, drops that last while a relay starts ask for nothing more."""
    scaler = Autoscaler(policy(), 1, 10)
    dropping = relays(10, 10, udp_rcvbuf_errors=[0.0, 35.0])
    assert scaler.evaluate(0.0, dropping).desired == 3
    starting = [*dropping, RelaySample("r2", ready=False)]
    for t in (1.0, 2.0, 3.0):
        assert scaler.evaluate(t, starting).desired == 3
    ready = [*dropping, RelaySample("r2", signals={"allocations": 0.0,
                                                   "udp_rcvbuf_errors": 0.0})]
    assert scaler.evaluate(4.0, ready).desired == 4  # still dropping once it serves


DRAIN_CASES = [
    ("fewest allocations drained first", [50, 3, 20, 7], 2, ["r1", "r3"]),
    ("ties broken by name", [0, 0, 0], 2, ["r0"]),
    ("unknown allocations never drained first", [None, 5, 6], 2, ["r1"]),
]


@pytest.mark.parametrize(("name", "allocs", "keep", "drained"), DRAIN_CASES,
                         ids=[c[0] for c in DRAIN_CASES])
def test_drain_selection(name: str, allocs: list[float | None], keep: int,
                         drained: list[str]) -> None:
    scaler = Autoscaler(policy({"allocationsPerRelay": 100}, down_window=0), keep, 10, HPA)
    decision: Decision = scaler.evaluate(0.0, relays(*allocs))
    assert decision.desired == keep
    assert decision.drain == drained


def test_drained_relays_are_removed_at_zero_or_at_the_deadline() -> None:
    scaler = Autoscaler(policy(down_window=0, drain_deadline=600), 1, 10, HPA)
    samples = relays(40, 40)
    samples += [RelaySample("d0", signals={"allocations": 0}, draining=True, drain_started=0),
                RelaySample("d1", signals={"allocations": 3}, draining=True, drain_started=0),
                RelaySample("d2", signals={"allocations": 3}, draining=True,
                            drain_started=-700)]
    decision = scaler.evaluate(100.0, samples)
    assert sorted(decision.remove) == ["d0", "d2"]
    assert decision.active == 2


def test_scale_up_undrains_before_adding() -> None:
    scaler = Autoscaler(policy(), 1, 10, HPA)
    samples = relays(150, 150) + [
        RelaySample("d0", signals={"allocations": 30}, draining=True, drain_started=0),
    ]
    decision = scaler.evaluate(10.0, samples)
    assert decision.desired == 3
    assert decision.undrain == ["d0"]
    assert decision.scale_up == 0
    assert decision.remove == []


def test_missing_data_never_scales_down_even_after_the_window() -> None:
    scaler = Autoscaler(policy(down_window=0), 1, 10)
    for t in range(0, 900, 15):
        decision = scaler.evaluate(float(t), relays(None, None, None, None))
        assert decision.desired == 4
        assert decision.drain == []
    assert decision.reason == "no signal data: holding size"


def test_a_target_without_data_blocks_scale_down_but_not_scale_up() -> None:
    """Two targets; the exporters are down (no allocations) while the probe answers fast:
    the probe alone must not scale the pool down (HPA skips scale-down when any metric is
    unavailable), but it may still scale up."""
    targets = {"allocationsPerRelay": 400, "probeRttMs": 50}
    scaler = Autoscaler(policy(targets, down_window=0), 1, 10)
    down = scaler.evaluate(0.0, relays(None, None, None, probe_rtt_ms=[2.0, 2.0, 2.0]))
    assert (down.desired, down.drain) == (3, [])
    assert down.reason == ("probe_rtt_ms asks for 1 (ratio 0.04); no data for allocations: "
                           "holding size")
    up = scaler.evaluate(15.0, relays(None, None, None, probe_rtt_ms=[100.0, 100.0, 100.0]))
    assert up.desired == 6


# -- placement pack ---------------------------------------------------------------------------

OPEN_CASES = [
    # (name, allocations oldest first, fill, headroom, expected open relays)
    ("oldest with room first", [40, 0, 0], 100, 0.5, ["r0"]),
    ("a nearly full relay brings in the next", [80, 10, 0], 100, 0.5, ["r0", "r1"]),
    ("full relays are skipped", [100, 120, 30, 0], 100, 0.5, ["r2"]),
    ("not enough room anywhere: all open", [95, 98, 99], 100, 0.5, ["r0", "r1", "r2"]),
    ("unknown allocations: all open", [10, None, 0], 100, 0.5, ["r0", "r1", "r2"]),
    ("a larger headroom opens more", [40, 0, 0], 100, 1.0, ["r0", "r1"]),
]


@pytest.mark.parametrize("case", OPEN_CASES, ids=[c[0] for c in OPEN_CASES])
def test_open_relays(case: tuple[str, list[float | None], float, float, list[str]]) -> None:
    from turnstorm.policy import open_relays

    _, allocations, fill, headroom, expected = case
    assert open_relays(relays(*allocations), fill, headroom) == expected


def test_open_relays_skip_draining_unready_and_saturated_relays() -> None:
    from turnstorm.policy import open_relays, saturated

    samples = relays(10, 10, 10, 10, cpu_percent=[20.0, 95.0, 20.0, 20.0],
                     udp_rcvbuf_errors=[0.0, 0.0, 3.0, 0.0])
    targets = {"allocationsPerRelay": 100.0, "cpuUtilization": 70.0}
    assert not saturated(samples[0], targets)
    assert saturated(samples[1], targets)  # CPU over its target
    assert saturated(samples[2], targets)  # the kernel drops its datagrams
    samples.insert(0, RelaySample("starting", ready=False, signals={"allocations": 0.0}))
    samples.insert(0, RelaySample("leaving", draining=True, signals={"allocations": 1.0}))
    assert open_relays(samples, 100.0, 0.5, targets) == ["r0"]
    # Without the CPU target only the drops make a relay saturated.
    assert open_relays(samples, 100.0, 2.5, {"allocationsPerRelay": 100.0}) == [
        "r0", "r1", "r3"]


def test_a_relay_resized_above_its_cpu_is_full_for_pack_until_it_comes_back() -> None:
    """Refilled to the target, a relay at 125 % would never fall under target / 1.1 and
    come back to 100 %: pack skips it until its calls have brought it back."""
    from turnstorm.policy import open_relays, saturated

    samples = relays(170, 20, 20)
    samples[0].cpu_factor = 1.25
    assert saturated(samples[0], {"allocationsPerRelay": 180.0})
    assert open_relays(samples, 180.0, 0.5) == ["r1"]
    samples[0].cpu_factor = 1.0
    assert open_relays(samples, 180.0, 0.5) == ["r0", "r1"]
    # below 100 % (a draining relay shrunk, then put back) it takes calls
    samples[0].cpu_factor = 0.5
    assert not saturated(samples[0], {})


def test_placement_comes_from_the_turnpool() -> None:
    from turnstorm.spec import turnpool_from_object

    def scaling(extra: dict[str, object]) -> ScalingPolicy:
        return turnpool_from_object({
            "apiVersion": "turnstorm.io/v1alpha1", "kind": "TurnPool",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"realm": "r.example", "authSecretRef": {"name": "s"},
                     "scaling": extra}}).scaling

    default = scaling({})
    assert default.placement == "spread" and default.pack_fill is None
    packed = scaling({"placement": {"mode": "pack", "headroomPercent": 30},
                      "targets": {"allocationsPerRelay": 200}})
    assert (packed.pack_fill, packed.pack_headroom) == (200.0, 0.3)


# -- vertical resizing ---------------------------------------------------------------------

VERTICAL = VerticalScaling(enabled=True, max_factor=1.5, min_factor=0.25, step=0.25)


def sample(name: str, allocations: float | None, *, factor: float = 1.0,
           draining: bool = False, ready: bool = True) -> RelaySample:
    return RelaySample(name, ready=ready, signals={"allocations": allocations},
                       draining=draining, drain_started=0.0 if draining else None,
                       cpu_factor=factor)


# (name, relay, expected new factor or None for no change); target 100, tolerance 0.1
RESIZE_CASES: list[tuple[str, RelaySample, float | None]] = [
    ("at target: no change", sample("a", 100), None),
    ("just over: one step up", sample("a", 101), 1.25),
    ("over by 40 %: two steps", sample("a", 140), 1.5),
    ("far over: capped at max", sample("a", 400), 1.5),
    ("already at max: no change", sample("a", 400, factor=1.5), None),
    ("inside the hysteresis: stays up", sample("a", 95, factor=1.25), None),
    ("fits a step lower with the tolerance: down", sample("a", 90, factor=1.25), 1.0),
    ("a relay in rotation never goes under 1", sample("a", 3, factor=1.0), None),
    ("a shrunk relay back in rotation comes back to 1", sample("a", 10, factor=0.25), 1.0),
    ("draining: shrinks with its calls", sample("a", 40, draining=True), 0.5),
    ("draining: never under the minimum", sample("a", 2, draining=True), 0.25),
    ("draining, one call left: to the minimum", sample("a", 1, draining=True, factor=0.5),
     0.25),
    ("draining: an over-full relay still gets more", sample("a", 130, draining=True), 1.5),
    ("missing data: no change", sample("a", None, factor=1.25), None),
    ("not ready: no change", sample("a", 300, ready=False), None),
    ("above a lowered maximum: down to it", sample("a", 400, factor=2.0), 1.5),
]


@pytest.mark.parametrize("case", RESIZE_CASES, ids=[c[0] for c in RESIZE_CASES])
def test_vertical_resize(case: tuple[str, RelaySample, float | None]) -> None:
    _, relay, expect = case
    scaling = dataclasses.replace(policy(), vertical=VERTICAL)
    # a second relay with room keeps the pool from scaling (this is about resizing)
    decision = Autoscaler(scaling, 1, 10, HPA).evaluate(0.0, [relay, sample("b", 0)])
    assert decision.resize.get(relay.name) == expect
    assert "b" not in decision.resize


def test_vertical_off_or_without_an_allocation_target_never_resizes() -> None:
    hot = [sample("a", 400), sample("b", 2, draining=True)]
    assert Autoscaler(policy(), 1, 10, HPA).evaluate(0.0, hot).resize == {}
    no_target = dataclasses.replace(policy({"cpuUtilization": 70}), vertical=VERTICAL)
    assert Autoscaler(no_target, 1, 10, HPA).evaluate(0.0, hot).resize == {}


def test_a_relay_drained_or_removed_by_the_same_decision() -> None:
    scaling = dataclasses.replace(policy(down_window=0), vertical=VERTICAL)
    scaler = Autoscaler(scaling, 1, 10, HPA)
    # 3 relays with 40 calls in all: two go; the emptier one drains and shrinks at once
    decision = scaler.evaluate(0.0, [sample("a", 30), sample("b", 10), sample("c", 0)])
    assert sorted(decision.drain) == ["b", "c"]
    assert decision.resize == {"b": 0.25, "c": 0.25}
    # an empty draining relay is removed, not resized
    decision = scaler.evaluate(1.0, [sample("a", 30), sample("b", 0, draining=True)])
    assert decision.remove == ["b"] and decision.resize == {}


def test_resized_relays_come_back_to_1_when_vertical_is_off_or_data_is_missing() -> None:
    # vertical turned off: every resized relay back to 1, whatever its data
    scaler = Autoscaler(policy(), 1, 10, HPA)
    decision = scaler.evaluate(0.0, [sample("a", 400, factor=1.5), sample("b", None, factor=0.5),
                                     sample("c", 50)])
    assert decision.resize == {"a": 1.0, "b": 1.0}
    # undrained while its allocations are unknown: back in rotation at 1, not at 25 %
    scaling = dataclasses.replace(policy(), vertical=VERTICAL)
    scaler = Autoscaler(scaling, 1, 10, HPA)
    shrunk = [sample("a", 100), sample("b", None, factor=0.25, draining=True)]
    relay_b = shrunk[1]
    assert scaler.evaluate(0.0, shrunk).resize == {}  # draining, no data: left alone
    relay_b.draining = False
    assert scaler.evaluate(1.0, shrunk).resize == {"b": 1.0}


@pytest.mark.parametrize(("allocations", "expect"), [(101, 1.25), (100, None), (99, None),
                                                      (95, 1.0)])
def test_resizing_keeps_a_hysteresis_with_a_zero_tolerance(allocations: float,
                                                           expect: float | None) -> None:
    scaling = dataclasses.replace(policy(tolerance=0.0), vertical=VERTICAL)
    decision = Autoscaler(scaling, 1, 10, HPA).evaluate(
        0.0, [sample("a", allocations, factor=1.25 if allocations < 101 else 1.0),
              sample("b", 0)])
    assert decision.resize.get("a") == expect


def test_a_minimum_under_the_step_is_reached() -> None:
    fine = VerticalScaling(enabled=True, max_factor=1.5, min_factor=0.05, step=0.25)
    scaling = dataclasses.replace(policy(), vertical=fine)
    decision = Autoscaler(scaling, 1, 10, HPA).evaluate(
        0.0, [sample("a", 4, draining=True), sample("b", 20, draining=True), sample("c", 0)])
    assert decision.resize == {"a": 0.05, "b": 0.25}


def test_vertical_options_come_from_the_turnpool() -> None:
    doc = {"apiVersion": "turnstorm.io/v1alpha1", "kind": "TurnPool",
           "metadata": {"name": "p"},
           "spec": {"realm": "r", "authSecretRef": {"name": "s"},
                    "scaling": {"targets": {"allocationsPerRelay": 100},
                                "vertical": {"enabled": True, "maxPercent": 200,
                                             "minPercent": 10, "stepPercent": 50}}}}
    assert turnpool_from_object(doc).scaling.vertical == VerticalScaling(True, 2.0, 0.1, 0.5)
    del doc["spec"]["scaling"]["vertical"]
    assert turnpool_from_object(doc).scaling.vertical == VerticalScaling()
    assert not VerticalScaling().enabled
    doc["spec"]["scaling"]["vertical"] = {"maxPercent": 90}
    with pytest.raises(SpecError, match="maxPercent: should be greater than or equal to 100"):
        turnpool_from_object(doc)

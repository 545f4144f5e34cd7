"""bench.autoscale's calibration fit and verdict: only what was measured, goals as stated."""

from __future__ import annotations

import pytest

from bench._replay import Footing, Row, Verdict, best_draining, replay, verdict
from bench.autoscale import (
    Burst,
    CalibrationError,
    Step,
    calibration_counts,
    fit_model,
    overdriven,
)
from turnstorm.simulate import RelayModel

# What a relay at 0.25 CPU gave: SLO met up to 200 calls, overdriven at 280.
STEPS = [Step(20, 2000, 2000, 0.0, 2.0, 0.03), Step(160, 16000, 16000, 0.0, 9.0, 0.2),
         Step(200, 20000, 19900, 0.005, 60.0, 0.24),
         Step(240, 24000, 21600, 0.1, 400.0, 0.25), Step(280, 28000, 21000, 0.25, 700.0, 0.25)]


def test_a_calibration_that_never_overdrives_the_relay_fails_and_says_why() -> None:
    never = STEPS[:3]
    with pytest.raises(CalibrationError) as error:
        fit_model(never, 0.25)
    assert str(error.value) == (
        "calibration: the relay was never overdriven: 200 calls, 19900 of 20000 offered pps "
        "relayed (loss 0.50%, overdriven means more than 5%); its saturation throughput is "
        "unmeasured, so no model is fitted: lower --cpus or allow more calls")
    assert overdriven(STEPS) is STEPS[3]


def test_the_calibration_adds_calls_until_its_limit() -> None:
    assert list(calibration_counts([20, 160, 340], 600)) == [20, 160, 340, 425, 531, 600]
    assert list(calibration_counts([20, 340], 340)) == [20, 340]


def test_saturation_is_the_most_measured_never_a_guess_from_the_knee() -> None:
    model, knee = fit_model(STEPS, 0.25)
    assert knee.calls == 200
    assert model.capacity_pps == 21600  # measured, not knee / 0.9 (22111)


def burst(base: list[tuple[float, float]], resized: list[tuple[float, float]]) -> Burst:
    return Burst(1.5, 480, base, resized)


def test_the_resize_phases_at_the_relays_own_cpu_measure_its_saturation_too() -> None:
    # under the overdriving load the relay at 100 % relayed 22,400 pps: more than any step
    measured = burst([(48000, 22400), (48000, 22400)], [(48000, 31360), (48000, 31360)])
    assert measured.base_overdriven and measured.burst_overdriven
    model, _ = fit_model(STEPS, 0.25, measured)
    assert model.capacity_pps == 22400
    assert model.burst_marginal == pytest.approx((31360 / 22400 - 1) / 0.5)


def test_a_resized_relay_that_carried_all_it_was_offered_gives_a_lower_bound() -> None:
    # 150 % of the CPU relayed all of the 30,000 pps offered: its marginal is at least this
    unsaturated = burst([(30000, 21000)], [(30000, 29800)])
    assert unsaturated.base_overdriven and not unsaturated.burst_overdriven
    model, _ = fit_model(STEPS, 0.25, unsaturated)
    assert model.capacity_pps == 21600
    assert model.burst_marginal == pytest.approx((29800 / 21600 - 1) / 0.5)


MODEL = RelayModel.fit(capacity_pps=25_000, cpu_per_packet=12.5e-6, cpu_limit=0.25,
                       base_p99_ms=8.0, knee_pps=19_000, knee_p99_ms=70.0, max_p99_ms=900.0)


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    (_, storm), *_ = replay(MODEL, Footing(), [1], second_interval=None, workers=1)
    return storm


def test_the_draining_baselines_keep_every_call_the_naive_ones_cut(rows: list[Row]) -> None:
    by_name = {r.policy: r for r in rows}
    assert set(by_name) == {"hpa-cpu70", "keda-alloc", "hpa-cpu70-drain", "keda-alloc-drain",
                            "hpa-cpu70-drain-30s", "keda-alloc-drain-30s", "ours", "oracle"}
    for name in ("hpa-cpu70", "keda-alloc"):
        drained = by_name[f"{name}-drain"].results[0]
        naive = by_name[name].results[0]
        assert naive.allocations_cut > 0 and drained.allocations_cut == 0
        assert drained.replica_seconds > naive.replica_seconds
    assert best_draining(rows).draining
    oracle = by_name["oracle"].results[0]
    assert all(r.results[0].replica_seconds >= oracle.replica_seconds for r in rows)


def test_the_verdict_holds_ours_to_every_goal(rows: list[Row]) -> None:
    found = verdict("storm", rows)
    assert found.cut == 0 and found.oracle >= 1.0
    assert Verdict("t", 0.5, 1.0, 1.3, 0, 1.25).ok
    assert not Verdict("t", 0.51, 1.0, 1.0, 0, 1.0).ok
    assert not Verdict("t", 0.0, 1.01, 1.0, 0, 1.0).ok
    assert not Verdict("t", 0.0, 1.0, 1.0, 1, 1.0).ok
    assert not Verdict("t", 0.0, 1.0, 1.0, 0, 1.26).ok

"""The operator reads a relay's CPU factor back from its pod as it wrote it."""

from __future__ import annotations

import pytest

from turnstorm.operator.pods import PodView, cpu_factor, millicores
from turnstorm.spec import TurnPoolSpec, turnpool_from_object


def spec(cpu: str, minimum: int = 25, step: int = 25) -> TurnPoolSpec:
    return turnpool_from_object({
        "apiVersion": "turnstorm.io/v1alpha1", "kind": "TurnPool", "metadata": {"name": "p"},
        "spec": {"realm": "r", "authSecretRef": {"name": "s"}, "resources": {"cpu": cpu},
                 "scaling": {"vertical": {"enabled": True, "minPercent": minimum,
                                          "stepPercent": step}}}})


@pytest.mark.parametrize("cpu", ["250m", "750m", "1", "333m", "2.5"])
@pytest.mark.parametrize("factor", [0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
def test_a_written_factor_reads_back_the_same(cpu: str, factor: float) -> None:
    pool = spec(cpu)
    written = millicores(pool.cpu_cores * factor)
    view = PodView("r", None, True, False, None, False, cpu=int(written[:-1]) / 1000)
    assert cpu_factor(pool, view) == factor


def test_a_minimum_off_the_step_and_unknown_values() -> None:
    pool = spec("250m", minimum=5)
    view = PodView("r", None, True, False, None, False,
                   cpu=int(millicores(0.25 * 0.05)[:-1]) / 1000)
    assert cpu_factor(pool, view) == 0.05
    assert cpu_factor(pool, PodView("r", None, True, False, None, False)) == 1.0
    odd = PodView("r", None, True, False, None, False, cpu=0.4)  # set by hand: as it is
    assert cpu_factor(pool, odd) == pytest.approx(1.6)

"""Local distributed mode: a Locust master in this process, 2 worker processes, real coturn."""

from __future__ import annotations

import os

os.environ.setdefault("LOCUST_SKIP_MONKEY_PATCH", "1")

import json
from pathlib import Path
from typing import Any

import pytest

from turnstorm.loadgen.config import LoadgenConfig, SessionLength
from turnstorm.loadgen.metrics import MediaStats
from turnstorm.loadgen.runner import run_locust, transactions
from turnstorm.loadgen.users import COUNTERS, LoadgenState, StunBindingUser, TurnSessionUser
from turnstorm.relay.process import LocalRelay
from turnstorm.uri import parse_uri

pytestmark = pytest.mark.integration


def test_master_and_two_workers_merge_exactly(relay: LocalRelay, tmp_path: Path) -> None:
    from turnstorm.loadgen.echo import spawn_echo

    greenlet, peer, counter = spawn_echo()
    config = LoadgenConfig(targets=[parse_uri(f"turn:{relay.host}:{relay.port}")],
                           secret=relay.secret, peer=peer,
                           session_length=SessionLength.parse("1.5"), call_gap=0.2,
                           max_pps=2000, echo_grace=0.3)
    try:
        result = run_locust(config, [TurnSessionUser, StunBindingUser], users=4,
                            spawn_rate=20, duration=4.0, workers=2,
                            worker_dump_dir=str(tmp_path))
    finally:
        greenlet.kill()
    state = result.state
    dumps = [json.loads((tmp_path / f"worker-{i}.json").read_text()) for i in range(2)]
    # what the master merged from the reports == one process merging both workers' samples
    single = LoadgenState(config)
    for dump in dumps:
        single.merge_report(dump)
    assert set(state.media) == set(single.media) == {str(config.targets[0])}
    for key, merged in state.media.items():
        # Counts and histograms merge exactly. The delay mean and m2 and the weighted
        # jitter sum are floats summed in another grouping (the master folds each report
        # in as it comes), and float addition is not associative: equal to the last bits.
        mine, theirs = merged.to_dict(), single.media[key].to_dict()
        delay, other = mine.pop("delay"), theirs.pop("delay")
        jitter = mine.pop("jitter_weighted_s")
        assert jitter == pytest.approx(theirs.pop("jitter_weighted_s"), rel=1e-12)
        assert mine == theirs
        assert delay["count"] == other["count"]
        assert delay["mean"] == pytest.approx(other["mean"], rel=1e-12)
        assert delay["m2"] == pytest.approx(other["m2"], rel=1e-12)
        assert merged.rtt == single.media[key].rtt
        assert merged.rtt.summary_ms() == single.media[key].rtt.summary_ms()
    assert state.counters == single.counters
    assert state.send_lag == single.send_lag
    # both workers did work; the run is consistent end to end
    for dump in dumps:
        worker_media: dict[str, Any] = dump["media"]
        assert MediaStats.from_dict(next(iter(worker_media.values()))).binding_rtt.count > 0
    media = state.media[str(config.targets[0])]
    counters = state.counters
    stats = transactions(result.environment)
    assert set(COUNTERS) <= set(counters)
    assert counters["allocations_ok"] >= 2 and counters["allocations_failed"] == 0
    assert counters["released"] == counters["allocations_ok"]
    assert stats["TURN Allocate"]["count"] == counters["allocations_ok"]
    assert all(row["failures"] == 0 for row in stats.values()), stats
    assert media.sent == media.received == counter.echoed > 100
    assert media.streams == counters["allocations_ok"]
    # Binding RTTs: the flood users' samples plus one per call, as counted by Locust
    assert media.binding_rtt.count == stats["STUN Binding"]["count"]
    assert result.elapsed < 15


def test_emulated_cgnat_is_split_over_the_workers(relay: LocalRelay, tmp_path: Path) -> None:
    """Each worker emulates its own gateways: two gateways of 2 ports over 2 workers with
    3 subscribers each exhaust ports and remap expired mappings in both workers."""
    from turnstorm.loadgen.cgnat import Population
    from turnstorm.loadgen.echo import spawn_echo

    greenlet, peer, _ = spawn_echo()
    config = LoadgenConfig(targets=[parse_uri(f"turn:{relay.host}:{relay.port}")],
                           secret=relay.secret, peer=peer,
                           session_length=SessionLength.parse("0.5"), call_gap=0.3,
                           max_pps=2000, echo_grace=0.2)
    population = Population.build(2, 2, 0.1, hold=2.0, base_address="127.100.0.1")
    try:
        result = run_locust(config, [TurnSessionUser], users=6, spawn_rate=50,
                            duration=4.5, workers=2, cgnat=population,
                            worker_dump_dir=str(tmp_path))
    finally:
        greenlet.kill()
    counters = result.state.counters
    dumps = [json.loads((tmp_path / f"worker-{i}.json").read_text()) for i in range(2)]
    for dump in dumps:
        assert dump["counters"]["cgnat_exhausted"] > 0
        assert dump["counters"]["allocations_ok"] >= 2
    assert counters["cgnat_exhausted"] == sum(d["counters"]["cgnat_exhausted"] for d in dumps)
    assert counters["allocations_failed"] == counters["cgnat_exhausted"]
    assert counters["cgnat_remaps"] > 0
    assert counters["released"] == counters["allocations_ok"]
    assert population.stats.remaps == 0  # the master's copy stays unused


def test_cgnat_needs_a_gateway_per_worker(relay: LocalRelay) -> None:
    from turnstorm.loadgen.cgnat import Population
    from turnstorm.loadgen.config import ConfigError

    config = LoadgenConfig(targets=[parse_uri(f"turn:{relay.host}:{relay.port}")])
    with pytest.raises(ConfigError, match="--workers 3 needs at least 3 gateways"):
        run_locust(config, [StunBindingUser], duration=1.0, workers=3,
                   cgnat=Population.build(2, 8))

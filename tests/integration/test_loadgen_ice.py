"""IceSessionUser: real aioice agents reach a consented pair through a coturn relay."""

from __future__ import annotations

import os

os.environ.setdefault("LOCUST_SKIP_MONKEY_PATCH", "1")

import pytest

from turnstorm.loadgen.config import LoadgenConfig
from turnstorm.loadgen.iceuser import IceSessionUser
from turnstorm.loadgen.runner import run_locust, transactions
from turnstorm.relay.process import LocalRelay
from turnstorm.uri import parse_uri

pytestmark = pytest.mark.integration


class ShortIceUser(IceSessionUser):
    hold = 2.5  # 1 s consent interval: about two checks per session


def test_ice_user_connects_through_a_relayed_candidate(relay: LocalRelay) -> None:
    config = LoadgenConfig(targets=[parse_uri(f"turn:{relay.host}:{relay.port}")],
                           secret=relay.secret, call_gap=0.2)
    result = run_locust(config, [ShortIceUser], users=2, spawn_rate=10, duration=4.0)
    stats = transactions(result.environment)
    errors = [str(e.error) for e in result.environment.stats.errors.values()]
    counters = result.state.counters
    assert counters["ice_failed"] == 0, errors
    assert counters["ice_connected"] >= 2
    assert stats["ICE Connect"] == {"count": counters["ice_connected"], "failures": 0}
    assert stats["ICE Gather"]["count"] >= 2
    consent = result.environment.stats.entries[("Consent", "ICE")]
    assert consent.num_requests == counters["ice_connected"]
    assert consent.total_content_length >= counters["ice_connected"]  # >= 1 check each

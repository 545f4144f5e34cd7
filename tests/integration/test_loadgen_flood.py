"""The batched Binding flood and the idle-subscriber crowd against a real coturn."""

from __future__ import annotations

import os

os.environ.setdefault("LOCUST_SKIP_MONKEY_PATCH", "1")

import pytest

from turnstorm.loadgen.config import LoadgenConfig
from turnstorm.loadgen.keepalive import IdleSubscribersUser
from turnstorm.loadgen.runner import run_locust, transactions
from turnstorm.loadgen.users import StunBindingUser
from turnstorm.localrelay import LocalRelay
from turnstorm.uri import parse_uri

pytestmark = pytest.mark.integration


def config(relay: LocalRelay, **overrides: object) -> LoadgenConfig:
    return LoadgenConfig(targets=[parse_uri(f"turn:{relay.host}:{relay.port}")],
                         **overrides)  # type: ignore[arg-type]


def test_flood_is_bounded_and_every_transaction_is_counted(relay: LocalRelay) -> None:
    result = run_locust(config(relay, flood_window=64, max_pps=4000), [StunBindingUser],
                        users=2, spawn_rate=10, duration=2.5)
    row = transactions(result.environment)["STUN Binding"]
    assert row["failures"] == 0
    # --max-pps bounds the flood (plus the limiter's 50 ms burst and one window per user)
    assert 4000 < row["count"] <= 4000 * result.elapsed + 200 + 2 * 64
    media = next(iter(result.state.media.values()))
    assert media.binding_rtt.count == row["count"]
    entry = result.environment.stats.get("Binding", "STUN")
    assert sum(entry.response_times.values()) == row["count"]
    assert 0 < media.binding_rtt.percentile_ms(50) < 50


def test_idle_subscribers_keep_alive(relay: LocalRelay) -> None:
    result = run_locust(config(relay, crowd_size=300, binding_interval=0.5),
                        [IdleSubscribersUser], users=2, spawn_rate=10, duration=2.5)
    row = transactions(result.environment)["STUN Keepalive"]
    assert row["failures"] == 0
    # 600 subscribers, one keepalive each per 0.5 s, for about 2 s
    assert 600 * 3 <= row["count"] <= 600 * 6
    media = next(iter(result.state.media.values()))
    assert media.binding_rtt.count == row["count"]

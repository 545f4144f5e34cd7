"""The batched Binding flood and the idle-subscriber crowd against a real coturn."""

from __future__ import annotations

import os

os.environ.setdefault("LOCUST_SKIP_MONKEY_PATCH", "1")

import pytest

from turnstorm.loadgen.config import LoadgenConfig
from turnstorm.loadgen.keepalive import IdleSubscribersUser
from turnstorm.loadgen.runner import run_locust, transactions
from turnstorm.loadgen.users import StunBindingUser
from turnstorm.relay.process import LocalRelay
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


def _raw_allowed() -> None:
    from tests.conftest import require
    from turnstorm.loadgen.keepalive import raw_unavailable

    why = raw_unavailable(("127.0.0.1", 3478))
    require(why is None, f"the raw keepalive transport {why}")


def test_idle_subscribers_on_the_raw_transport(relay: LocalRelay) -> None:
    _raw_allowed()
    result = run_locust(config(relay, crowd_size=300, binding_interval=0.5,
                               crowd_transport="raw"),
                        [IdleSubscribersUser], users=2, spawn_rate=10, duration=2.5)
    row = transactions(result.environment)["STUN Keepalive"]
    assert row["failures"] == 0
    assert 600 * 3 <= row["count"] <= 600 * 6


def test_raw_crowd_is_not_capped_by_the_open_file_limit(relay: LocalRelay) -> None:
    """More subscribers than open files: ``auto`` takes the raw transport, every one is
    answered at its own gateway port, and the ICMP drop table lives only with the crowd."""
    import resource
    import subprocess

    import gevent

    from turnstorm.loadgen.keepalive import KeepaliveCrowd

    _raw_allowed()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = soft + 2000
    crowd = KeepaliveCrowd((relay.host, relay.port), count, 3.0)
    table = f"turnstorm_crowd_{os.getpid()}"
    try:
        assert crowd.transport == "raw"
        assert crowd.notes == []
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                                check=True).stdout
        assert table in tables
        crowd.run(duration=3.3)
        deadline = gevent.get_hub().loop.now() + 3
        while crowd.outstanding() and gevent.get_hub().loop.now() < deadline:
            gevent.sleep(0.1)
        stats = crowd.stats
        assert stats.errors == 0 and stats.unanswered == 0
        assert crowd.outstanding() == 0
        assert stats.answered == stats.sent >= count  # everyone, once a round at least
    finally:
        crowd.close()
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                            check=True).stdout
    assert table not in tables


def test_raw_crowds_claim_distinct_gateways(relay: LocalRelay) -> None:
    """Two crowds (as in two Locust workers) never share a gateway address, so neither
    counts the other's responses."""
    from turnstorm.loadgen.keepalive import KeepaliveCrowd

    _raw_allowed()
    first = KeepaliveCrowd((relay.host, relay.port), 10, 1.0, transport="raw")
    try:
        second = KeepaliveCrowd((relay.host, relay.port), 10, 1.0, transport="raw")
        try:
            assert set(first.gateways).isdisjoint(second.gateways)
            first.run(duration=1.2)
            second.run(duration=1.2)
            for crowd in (first, second):
                assert crowd.stats.errors == 0 and crowd.stats.answered >= 10
        finally:
            second.close()
        third = KeepaliveCrowd((relay.host, relay.port), 10, 1.0, transport="raw")
        third.close()
        assert third.gateways == second.gateways  # a closed crowd's claim is released
    finally:
        first.close()

"""The Locust users headless for a few seconds against a real coturn on loopback."""

from __future__ import annotations

import os

# Keep gevent's monkey-patching out of this pytest process (other tests here use asyncio):
# the users only use explicit gevent APIs, so they behave the same unpatched. The
# subprocess tests of `turnstorm storm` cover the patched process.
os.environ.setdefault("LOCUST_SKIP_MONKEY_PATCH", "1")

import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest

from tests.conftest import require
from turnstorm.errors import AllocationQuotaReached
from turnstorm.loadgen.cgnat import Population
from turnstorm.loadgen.config import LoadgenConfig, SessionLength
from turnstorm.loadgen.echo import EchoCounter, spawn_echo
from turnstorm.loadgen.media import PUMP_ENV, MediaPump, NativeMediaPump, native_available
from turnstorm.loadgen.runner import run_locust, transactions
from turnstorm.loadgen.users import StunBindingUser, TurnSessionUser
from turnstorm.loadgen.wire import UdpClient
from turnstorm.proto.credentials import Credentials
from turnstorm.proto.stun import Address
from turnstorm.relay.process import LocalRelay
from turnstorm.uri import parse_uri

pytestmark = pytest.mark.integration
USERS = 3
QUOTA = 2 * USERS
"""coturn keeps a released allocation about 1 s (measured with 4.6.1): room for one
lingering allocation per user next to its live one."""


@pytest.fixture
def echo() -> Iterator[tuple[Address, EchoCounter]]:
    greenlet, address, counter = spawn_echo()
    yield address, counter
    greenlet.kill()


def config(relay: LocalRelay, peer: Address | None, **overrides: Any) -> LoadgenConfig:
    settings: dict[str, Any] = {
        "targets": [parse_uri(f"turn:{relay.host}:{relay.port}")], "secret": relay.secret,
        "peer": peer, "session_length": SessionLength.parse("1.2"), "call_gap": 0.1,
        "max_pps": 3000, "summary_interval": 0.5, "echo_grace": 0.3,
    }
    settings.update(overrides)
    return LoadgenConfig(**settings)


def assert_relay_empty(relay: LocalRelay) -> None:
    """With total_quota = QUOTA, QUOTA new allocations succeed only once the relay holds
    none of the run's (allow coturn's ~1 s linger of released ones)."""
    clients: list[UdpClient] = []
    deadline = time.monotonic() + 3.0
    try:
        while len(clients) < QUOTA:
            creds = Credentials.ephemeral(relay.secret, f"after{len(clients)}", time.time())
            client = UdpClient((relay.host, relay.port), credentials=creds)
            try:
                client.allocate()
            except AllocationQuotaReached:
                client.close()
                assert time.monotonic() < deadline, f"only {len(clients)} allocations fit"
                gevent.sleep(0.1)
                continue
            clients.append(client)
    finally:
        for client in clients:
            client.release_and_close()


@pytest.mark.parametrize("pump", ["native", "python"])
def test_turn_session_user_calls_relay_media_and_release(
    relays: Any, echo: tuple[Address, EchoCounter], pump: str,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # the media of the calls runs on the native engine (the default where it is built)
    # or on the pure-Python pump: the same figures either way
    if pump == "native":
        require(native_available(), "turnstorm._mediapump is not built")
    else:
        monkeypatch.setenv(PUMP_ENV, "python")
    # a relay of its own per pump (the other run's released allocations linger ~1 s)
    relay = relays(total_quota=QUOTA, realm=f"{pump}.turnstorm.local")
    peer, counter = echo
    result = run_locust(config(relay, peer, allocation_refresh=0.5), [TurnSessionUser],
                        users=USERS, spawn_rate=50, duration=3.5)
    expected = NativeMediaPump if pump == "native" else MediaPump
    assert type(result.state.pump) is expected
    stats = transactions(result.environment)
    counters = result.state.counters
    media = result.state.media[f"turn:{relay.host}:{relay.port}?transport=udp"]
    errors = [str(e.error) for e in result.environment.stats.errors.values()]
    assert all(row["failures"] == 0 for row in stats.values()), (stats, errors)
    assert counters["allocations_failed"] == 0
    assert counters["allocations_ok"] >= USERS * 2  # at least two calls per user
    assert counters["released"] == counters["allocations_ok"]
    assert stats["TURN Allocate"]["count"] == counters["allocations_ok"]
    assert stats["TURN Refresh"]["count"] >= USERS
    assert stats["MEDIA echo"]["count"] >= USERS * 4
    # ~50 packets/s per user for most of the run, every one relayed both ways
    assert media.sent > USERS * 50 * 2
    assert media.received == media.sent == counter.echoed
    assert media.lost == 0
    assert media.streams == counters["allocations_ok"]
    assert 0 < media.rtt.percentile_ms(50) < 50
    # one direct Binding at call set-up, then one per second of talk
    assert media.binding_rtt.count >= counters["calls"]
    assert media.binding_rtt.count == stats["STUN Binding"]["count"]
    # Both RTTs are stamped at kernel arrival (tests/unit/test_wire_timestamps.py); the
    # few Bindings of short calls are mostly sent while the relay is busy setting calls
    # up, so only a loopback-sized bound is asserted here.
    overhead = media.relay_overhead_ms
    assert overhead is not None and abs(overhead) < 5, (media.rtt.summary_ms(),
                                                         media.binding_rtt.summary_ms())
    assert_relay_empty(relay)


def test_stun_binding_user_floods_within_the_rate_bound(relays: Any) -> None:
    relay = relays(total_quota=QUOTA)
    result = run_locust(config(relay, None, max_pps=500), [StunBindingUser], users=4,
                        spawn_rate=100, duration=2.0)
    row = transactions(result.environment)["STUN Binding"]
    assert row["failures"] == 0
    # bounded by --max-pps: 500/s plus the 50 ms burst allowance
    assert 300 < row["count"] <= 500 * result.elapsed + 25
    media = next(iter(result.state.media.values()))
    assert media.binding_rtt.count == row["count"]


def test_cgnat_exhaustion_fails_allocations_and_expiry_remaps(
    relays: Any, echo: tuple[Address, EchoCounter]
) -> None:
    relay = relays(total_quota=QUOTA)
    peer, _ = echo
    # One gateway with 2 ports for 3 subscribers: one of them is always short of a port.
    # A 0.1 s mapping timeout expires idle mappings between calls (call gap 0.3 s); the
    # 2 s port hold-down outlasts coturn's ~1 s linger of a released allocation.
    population = Population.build(1, 2, 0.1, hold=2.0, base_address="127.100.0.1")
    result = run_locust(config(relay, peer, call_gap=0.3, session_length=SessionLength.parse(
        "0.5")), [TurnSessionUser], users=3, spawn_rate=50, duration=4.5, cgnat=population)
    counters = result.state.counters
    stats = transactions(result.environment)
    assert counters["cgnat_exhausted"] > 0
    assert stats["CGNAT Mapping"]["failures"] == counters["cgnat_exhausted"]
    errors = {str(e.error) for e in result.environment.stats.errors.values()}
    assert counters["allocations_failed"] == counters["cgnat_exhausted"], errors
    assert counters["allocations_ok"] >= 2
    assert counters["cgnat_remaps"] > 0
    assert population.stats.remaps > 0
    assert stats["TURN Allocate"]["failures"] == 0
    assert counters["released"] == counters["allocations_ok"]
    assert_relay_empty(relay)

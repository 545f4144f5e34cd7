"""Integration fixtures: real coturn relays on loopback, one per config per module."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from turnstorm.relay.process import LocalRelay, loopback_relay_config

RelayFactory = Callable[..., LocalRelay]


@pytest.fixture(scope="module")
def relays(turnserver_bin: str) -> Iterator[RelayFactory]:
    """``relays(**overrides)``: a running relay for that config, started once per module.

    Tests sharing a relay keep out of each other's way by using their own usernames
    (quotas count per username) and their own sockets (allocations are per 5-tuple).
    """
    running: dict[str, LocalRelay] = {}

    def get(**overrides: Any) -> LocalRelay:
        key = repr(sorted(overrides.items()))
        if key not in running:
            relay = LocalRelay(loopback_relay_config(**overrides), secrets.token_urlsafe(24))
            relay.start()
            running[key] = relay
        return running[key]

    try:
        yield get
    finally:
        for relay in running.values():
            relay.stop()

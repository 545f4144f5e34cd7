"""Which relays the raw keepalive transport refuses, and the crowd's argument checks."""

from __future__ import annotations

import os

os.environ.setdefault("LOCUST_SKIP_MONKEY_PATCH", "1")

import pytest

from turnstorm.loadgen.config import ConfigError, LoadgenConfig
from turnstorm.loadgen.keepalive import KeepaliveCrowd, raw_unavailable
from turnstorm.uri import parse_uri


@pytest.mark.parametrize("host", ["10.0.0.1", "192.0.2.7", "::1", "relay.example"])
def test_raw_transport_refuses_relays_off_ipv4_loopback(host: str) -> None:
    why = raw_unavailable((host, 3478))
    assert why is not None and ("loopback" in why or "IPv4 address" in why)


def test_raw_transport_refuses_a_remote_relay_before_opening_anything() -> None:
    with pytest.raises(OSError, match="IPv4 loopback relay"):
        KeepaliveCrowd(("192.0.2.7", 3478), 10, 1.0, transport="raw")


def test_unknown_transport_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown keepalive transport 'tcp'"):
        KeepaliveCrowd(("127.0.0.1", 3478), 10, 1.0, transport="tcp")
    with pytest.raises(ConfigError, match="--crowd-transport must be auto, sockets or raw"):
        LoadgenConfig(targets=[parse_uri("turn:127.0.0.1:3478")], crowd_transport="tcp")

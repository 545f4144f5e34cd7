"""The media pump reads its flows' sockets itself, against a real coturn on loopback."""

from __future__ import annotations

import os

os.environ.setdefault("LOCUST_SKIP_MONKEY_PATCH", "1")  # see test_loadgen_users.py

import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import gevent
import pytest

from turnstorm.loadgen.echo import EchoCounter, spawn_echo
from turnstorm.loadgen.media import MEDIA_HEADER, MediaPump
from turnstorm.loadgen.metrics import Histogram, StreamStats
from turnstorm.loadgen.wire import UdpClient
from turnstorm.proto.credentials import Credentials
from turnstorm.proto.stun import Address

pytestmark = pytest.mark.integration
CALLS = 3


@pytest.fixture
def echo() -> Iterator[tuple[Address, EchoCounter]]:
    greenlet, address, counter = spawn_echo()
    yield address, counter
    greenlet.kill()


@pytest.mark.parametrize("direct", [False, True], ids=["client-dispatch", "on-echo"])
def test_pump_reads_echoes_and_control_responses_then_hands_reading_back(
    relays: Any, echo: tuple[Address, EchoCounter], direct: bool
) -> None:
    # direct: echoed frames go straight to the stream (on_echo); else through the
    # client's on_channel_data. Control responses always go through the client.
    relay = relays()
    peer, counter = echo
    state = SimpleNamespace(send_lag=Histogram(), limiter=None)
    pump = MediaPump(state)
    calls: list[tuple[UdpClient, int, StreamStats]] = []
    try:
        for number in range(CALLS):
            creds = Credentials.ephemeral(relay.secret, f"pump{number}", time.time())
            client = UdpClient((relay.host, relay.port), credentials=creds)
            client.allocate()
            client.create_permission(peer)
            channel, _ = client.channel_bind(peer)
            stream = StreamStats()

            def received(channel: int, payload: bytes, at: float,
                         stream: StreamStats = stream) -> None:
                seq, sent = MEDIA_HEADER.unpack_from(payload)
                stream.on_echo(seq, sent, at, len(payload))

            client.on_channel_data = received
            calls.append((client, channel, stream))
        flows = [pump.add(client.sock, channel, 0.02, 160, receiver=client,
                          on_echo=stream.on_echo if direct else None)
                 for client, channel, stream in calls]
        # while the flows last, the hub's read watchers are off: the pump reads
        assert not any(client._watcher.active for client, _, _ in calls)
        gevent.sleep(0.5)
        # a control transaction in the middle of the call: its response comes through
        # the pump's read of the same socket
        for client, _, _ in calls:
            granted, rtt = client.refresh(600)
            assert granted > 0 and 0 < rtt < 1
        gevent.sleep(0.5)
        for flow in flows:
            pump.remove(flow)
        gevent.sleep(0.3)  # the last echoes come back (read by the hub again)
        assert all(client._watcher.active for client, _, _ in calls)
        for flow, (client, _, stream) in zip(flows, calls, strict=True):
            assert flow.sent >= 40  # ~50 frames/s for about a second
            assert stream.sequence.received == flow.sent, (flow.sent, stream.sequence)
            assert stream.sequence.lost == 0 and stream.sequence.duplicates == 0
            assert 0 < stream.rtt.percentile_ms(50) < 50
            # reading is the hub's again: a plain transaction completes
            _, rtt = client.binding()
            assert 0 < rtt < 1
        assert counter.echoed == sum(flow.sent for flow in flows)
        assert not pump._readers and not pump._owners
    finally:
        for client, _, _ in calls:
            client.release_and_close(timeout=2)

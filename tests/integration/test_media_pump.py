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
from turnstorm.loadgen.media import MediaPump
from turnstorm.loadgen.metrics import Histogram, StreamStats
from turnstorm.loadgen.wire import MEDIA_HEADER, UdpClient
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
    # direct: echoed frames go straight to the stream (the client's on_echo); else
    # through its on_channel_data. Control responses go to their transactions.
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

            if direct:
                client.on_echo = stream.on_echo
            else:
                client.on_channel_data = received
            calls.append((client, channel, stream))
        flows = [pump.add(client.sock, channel, 0.02, 160, receiver=client)
                 for client, channel, _ in calls]
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


def test_a_flow_added_while_the_pump_sleeps_wakes_it() -> None:
    """One flow: after its frame the pump sleeps ~20 ms until the next. A flow added
    meanwhile, due in a few ms, must not wait for that wake-up."""
    import socket

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    senders = []
    for _ in range(2):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(sink.getsockname())
        senders.append(sock)
    state = SimpleNamespace(send_lag=Histogram(), limiter=None)
    pump = MediaPump(state)
    try:
        first = pump.add(senders[0], 0x4000, 0.02, 160)
        gevent.sleep(0.006)  # its first frame is out; the pump waits for the next
        assert first.sent >= 1
        state.send_lag = Histogram()
        second = pump.add(senders[1], 0x4001, 0.02, 160)
        due = second.next_due
        assert due - time.perf_counter() < 0.008
        gevent.sleep(max(0.0, due - time.perf_counter()) + 0.004)
        assert second.sent == 1, "the second flow waited for the first flow's next frame"
        assert state.send_lag.percentile_ms(100) < 8
        for flow in (first, second):
            pump.remove(flow)
    finally:
        for sock in senders:
            sock.close()
        sink.close()


def test_a_flow_is_never_scheduled_behind_the_running_pump() -> None:
    """The running pump sends up to LEAD ahead, so its next slot can be ahead of the
    clock's: a flow added then goes into a slot the pump will still send."""
    import socket

    from turnstorm.loadgen.wire import clock

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pump = MediaPump(SimpleNamespace(send_lag=Histogram(), limiter=None))
    pump._greenlet = gevent.spawn(gevent.sleep, 1)  # as if running: add starts no other
    try:
        for added in range(20):
            pump._current = int(clock() / pump.tick) + 3
            flow = pump.add(sock, 0x4000, 0.02, 160)
            assert round(flow.next_due / pump.tick) >= pump._current, added
    finally:
        pump._greenlet.kill()
        sock.close()


def test_flows_added_while_the_pump_sleeps_start_on_time() -> None:
    """Flows join at random moments while the pump waits between sparse slots: each
    sends from its first slot on, none is left behind a slot the pump has passed."""
    import random
    import socket

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    state = SimpleNamespace(send_lag=Histogram(), limiter=None)
    pump = MediaPump(state)
    rng = random.Random(7)
    senders: list[socket.socket] = []
    flows = []
    try:
        for _ in range(24):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect(sink.getsockname())
            senders.append(sock)
            flows.append((pump.add(sock, 0x4000, 0.02, 160), time.perf_counter()))
            gevent.sleep(rng.uniform(0.001, 0.015))
        gevent.sleep(0.3)
        ended = time.perf_counter()
        for flow, added in flows:
            pump.remove(flow)
            # ~50 frames/s from its first slot (at most a few ms after it was added)
            assert flow.sent >= int((ended - added) / 0.02) - 1, (flow.sent, ended - added)
        # no first frame waited for a later wake-up of the pump (up to 20 ms late)
        assert state.send_lag.percentile_ms(99) < 10, state.send_lag.summary_ms()
    finally:
        for sock in senders:
            sock.close()
        sink.close()

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

from tests.conftest import require
from tests.integration.helpers import unless_stolen
from turnstorm.loadgen.echo import EchoCounter, spawn_echo
from turnstorm.loadgen.media import MediaPump, NativeMediaPump, _native
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


def make_pump(kind: str, state: Any) -> MediaPump | NativeMediaPump:
    if kind == "python":
        return MediaPump(state)
    if _native is None:
        require(False, "turnstorm._mediapump is not built (`pip install -e .` builds it "
                       "where gcc and the Python headers are)")
    return NativeMediaPump(state)


@pytest.mark.parametrize("kind", ["python", "native"])
@pytest.mark.parametrize("direct", [False, True], ids=["client-dispatch", "on-echo"])
def test_pump_reads_echoes_and_control_responses_then_hands_reading_back(
    relays: Any, echo: tuple[Address, EchoCounter], direct: bool, kind: str
) -> None:
    # direct: echoed frames go straight to the stream (the client's on_echo; the native
    # engine measures them itself); else through its on_channel_data (the native engine
    # hands them to the client). Control responses go to their transactions.
    relay = relays()
    peer, counter = echo
    state = SimpleNamespace(send_lag=Histogram(), limiter=None)
    pump = make_pump(kind, state)
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
        flows = [pump.add(client.sock, channel, 0.02, 160, receiver=client,
                          stream=stream if direct else None)
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
        if isinstance(pump, MediaPump):
            assert not pump._readers and not pump._owners
        else:
            assert pump.flows == 0 and pump.sent == sum(flow.sent for flow in flows)
            assert state.send_lag.count == pump.sent
            pump.close()
    finally:
        for client, _, _ in calls:
            client.release_and_close(timeout=2)


def test_a_flow_added_while_the_pump_sleeps_wakes_it() -> None:
    """One flow: after its frame the pump sleeps ~20 ms until the next. A flow added
    meanwhile, due in a few ms, must not wait for that wake-up."""
    unless_stolen(_a_flow_added_while_the_pump_sleeps_wakes_it)


def _a_flow_added_while_the_pump_sleeps_wakes_it() -> None:
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
    unless_stolen(_flows_added_while_the_pump_sleeps_start_on_time)


def _flows_added_while_the_pump_sleeps_start_on_time() -> None:
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


# -- the native engine on its own ---------------------------------------------------------


@pytest.fixture
def native_state() -> Iterator[SimpleNamespace]:
    require(_native is not None, "turnstorm._mediapump is not built")
    yield SimpleNamespace(send_lag=Histogram(), limiter=None)


def _sink() -> Any:
    import socket

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    sink.setblocking(False)
    return sink


def _drain(sink: Any) -> list[bytes]:
    frames = []
    while True:
        try:
            frames.append(sink.recv(70000))
        except BlockingIOError:
            return frames


def test_native_frames_on_the_wire_paced_and_stopped(native_state: SimpleNamespace) -> None:
    """Frames are ChannelData with the media header (seq from 0, the sender's clock), 50
    per second per flow; once remove returns, the socket is not written again."""
    import socket
    import struct

    sink = _sink()
    senders = []
    pump = NativeMediaPump(native_state)
    try:
        flows = []
        for number in range(4):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect(sink.getsockname())
            senders.append(sock)
            flows.append(pump.add(sock, 0x4000 + number, 0.02, 200))
        started = time.perf_counter()
        gevent.sleep(1.0)
        for flow in flows[:2]:
            pump.remove(flow)
        stopped = time.perf_counter()
        gevent.sleep(0.3)
        for flow in flows[2:]:
            pump.remove(flow)
        gevent.sleep(0.05)
        frames = _drain(sink)
        seqs: dict[int, list[int]] = {}
        for frame in frames:
            channel, length, seq, sent = struct.unpack_from("!HHId", frame)
            assert len(frame) == 4 + 200 and length == 200
            assert frame[16:] == bytes(188)
            assert started - 0.01 < sent < time.perf_counter()
            seqs.setdefault(channel, []).append(seq)
        for number, flow in enumerate(flows):
            got = seqs[0x4000 + number]
            assert got == list(range(len(got))), "frames in order, numbered from 0"
            assert len(got) == flow.sent
        for number in (0, 1):  # removed after ~1 s: ~50 frames, none after removal
            assert 45 <= len(seqs[0x4000 + number]) <= 53, len(seqs[0x4000 + number])
        for number in (2, 3):  # ran ~0.3 s more
            assert len(seqs[0x4000 + number]) >= len(seqs[0x4000]) + 10
        assert stopped - started < 1.2
        assert native_state.send_lag.count == sum(flow.sent for flow in flows)
    finally:
        pump.close()
        for sock in senders:
            sock.close()
        sink.close()


def test_native_engine_shares_the_rate_bound(native_state: SimpleNamespace) -> None:
    """--max-pps is one budget: frames of the engine's thread and packets the Python side
    reserves together stay within rate x time + burst."""
    import socket

    from turnstorm.loadgen.users import RateLimiter

    rate = 300.0
    limiter = RateLimiter(rate)
    assert limiter.bucket is not None
    native_state.limiter = limiter
    sink = _sink()
    senders = []
    pump = NativeMediaPump(native_state)
    python_packets = [0]

    def python_side() -> None:
        while True:
            limiter.acquire(5)
            python_packets[0] += 5

    try:
        started = time.perf_counter()
        other = gevent.spawn(python_side)
        flows = []
        for number in range(10):  # 500 frames/s wanted
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect(sink.getsockname())
            senders.append(sock)
            flows.append(pump.add(sock, 0x4000 + number, 0.02, 160))
        gevent.sleep(2.0)
        other.kill()
        for flow in flows:
            pump.remove(flow)
        elapsed = time.perf_counter() - started
        frames = len(_drain(sink))
        budget = rate * (elapsed + limiter.burst) + 10
        assert frames + python_packets[0] <= budget, (frames, python_packets[0], budget)
        # the thread charges frame by frame, the Python side 5 at a time: no fair
        # share, but neither is starved
        assert frames >= 100 and python_packets[0] >= 40, ("both sides got a share",
                                                          frames, python_packets[0])
        assert frames == sum(flow.sent for flow in flows)
        assert limiter.waited > 0
    finally:
        pump.close()
        for sock in senders:
            sock.close()
        sink.close()


def test_native_engine_reports_an_unreachable_relay(native_state: SimpleNamespace) -> None:
    """ICMP port unreachable on a flow's socket (nothing listens at the relay's address)
    reaches the flow's client as a failed receive, as the hub's reader reports it."""
    import socket

    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    address = closed.getsockname()
    closed.close()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(address)
    errors: list[OSError] = []
    receiver = SimpleNamespace(
        detach_reader=lambda: None, attach_reader=lambda: None,
        dispatch=lambda data, at: pytest.fail(f"unexpected datagram {data!r}"),
        unreachable=errors.append)
    pump = NativeMediaPump(native_state)
    try:
        flow = pump.add(sock, 0x4000, 0.02, 160, receiver=receiver, stream=StreamStats())
        gevent.sleep(0.3)
        pump.remove(flow)
        assert errors, "no unreachable report"
        assert all(isinstance(e, ConnectionRefusedError) for e in errors), errors
    finally:
        pump.close()
        sock.close()

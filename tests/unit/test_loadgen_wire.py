"""The gevent UDP client against a scripted in-process server on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket

from turnstorm.errors import AllocationMismatch, StaleNonce, Unauthorized
from turnstorm.loadgen.echo import spawn_echo
from turnstorm.loadgen.wire import UdpClient
from turnstorm.proto import stun
from turnstorm.proto.credentials import Credentials
from turnstorm.proto.stun import Class, Message
from turnstorm.proto.transaction import RetransmitPolicy, TransactionTimeout

Reply = Callable[[Message], "Message | None"]
CREDS = Credentials("alice", "secret")
REALM = "example.org"


class ScriptedServer:
    """Answers each request with the next scripted reply (None: drop the request)."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.requests: list[Message] = []
        self.sock: Any = gsocket.socket(gsocket.AF_INET, gsocket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.greenlet = gevent.spawn(self._serve)

    def _serve(self) -> None:
        while True:
            data, addr = self.sock.recvfrom(65535)
            if stun.is_channel_data(data):
                self.sock.sendto(data, addr)  # echo ChannelData back
                continue
            request = stun.parse(data)
            self.requests.append(request)
            reply = self.replies.pop(0)(request) if self.replies else None
            if reply is not None:
                self.sock.sendto(reply.encode(), addr)

    def close(self) -> None:
        self.greenlet.kill()
        self.sock.close()


def error(code: int, nonce: bytes = b"n1") -> Reply:
    def reply(request: Message) -> Message:
        return Message(request.method, Class.ERROR, request.transaction_id, {
            "ERROR-CODE": (code, "nope"), "REALM": REALM, "NONCE": nonce})
    return reply


def success(**attributes: Any) -> Reply:
    def reply(request: Message) -> Message:
        return Message(request.method, Class.RESPONSE, request.transaction_id,
                       {k.replace("_", "-"): v for k, v in attributes.items()})
    return reply


def drop(request: Message) -> None:
    return None


@pytest.fixture
def server_factory() -> Iterator[Callable[[list[Reply]], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def make(replies: list[Reply]) -> ScriptedServer:
        servers.append(ScriptedServer(replies))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


FAST = RetransmitPolicy(rto=0.02, rc=3, rm=2)
ALLOCATED = success(XOR_RELAYED_ADDRESS=("127.0.0.1", 20001),
                    XOR_MAPPED_ADDRESS=("127.0.0.1", 40000), LIFETIME=600)


def test_binding_retransmits_after_a_drop(server_factory: Any) -> None:
    server = server_factory([drop, success(XOR_MAPPED_ADDRESS=("127.0.0.1", 5555))])
    with UdpClient(server.address, policy=FAST) as client:
        mapped, rtt = client.binding()
    assert mapped == ("127.0.0.1", 5555)
    assert 0 < rtt < 0.02  # measured from the retransmission, not the first send
    assert client.retransmits == 1
    assert len(server.requests) == 2
    assert server.requests[0].transaction_id == server.requests[1].transaction_id


def test_binding_times_out_per_policy(server_factory: Any) -> None:
    server = server_factory([])
    with UdpClient(server.address, policy=FAST) as client, \
            pytest.raises(TransactionTimeout) as info:
        client.binding()
    # sends at 0, 0.02, 0.06 s; gives up rm * rto = 0.04 s later (real clock: a bit late)
    assert str(info.value).startswith("STUN Binding transaction timed out after 3 attempts in 0.1")
    assert len(server.requests) == 3


def test_allocate_401_then_438_then_success(server_factory: Any) -> None:
    server = server_factory([error(401, b"n1"), error(438, b"n2"), ALLOCATED])
    with UdpClient(server.address, credentials=CREDS, policy=FAST) as client:
        allocation, _ = client.allocate()
    assert allocation.relayed == ("127.0.0.1", 20001)
    first, second, third = server.requests
    assert "USERNAME" not in first.attributes
    assert second.attributes["NONCE"] == b"n1"
    assert third.attributes["NONCE"] == b"n2"
    assert third.attributes["USERNAME"] == "alice"
    third.check_integrity(CREDS.key(REALM))


def test_second_401_is_unauthorized(server_factory: Any) -> None:
    server = server_factory([error(401), error(401)])
    with UdpClient(server.address, credentials=CREDS, policy=FAST) as client, \
            pytest.raises(Unauthorized) as info:
        client.allocate()
    assert str(info.value) == ("Allocate failed: 401 nope (wrong username, password or "
                               "shared secret)")


def test_second_438_is_stale_nonce(server_factory: Any) -> None:
    server = server_factory([error(401), error(438, b"n2"), error(438, b"n3")])
    with UdpClient(server.address, credentials=CREDS, policy=FAST) as client, \
            pytest.raises(StaleNonce):
        client.allocate()


def test_refresh_mismatch_and_channel_data_dispatch(server_factory: Any) -> None:
    server = server_factory([error(401), ALLOCATED, success(), success(),
                             error(437)])
    received: list[tuple[int, bytes]] = []
    with UdpClient(server.address, credentials=CREDS, policy=FAST) as client:
        client.allocate()
        client.create_permission(("127.0.0.1", 9))
        channel, _ = client.channel_bind(("127.0.0.1", 9))
        client.on_channel_data = lambda ch, payload, at: received.append((ch, payload))
        client.send_channel(channel, b"hello")
        with pytest.raises(AllocationMismatch):
            client.refresh()
        gevent.sleep(0.01)
    assert channel == 0x4000
    assert received == [(0x4000, b"hello")]
    assert server.requests[3].attributes["CHANNEL-NUMBER"] == 0x4000


def test_echoed_media_frames_go_to_on_echo_whole_frames_only(server_factory: Any) -> None:
    """With ``on_echo`` set, an echoed media frame is unpacked and handed over; ChannelData
    too short to hold a media header is dropped; responses still reach their requests."""
    from turnstorm.loadgen.wire import MEDIA_HEADER

    server = server_factory([error(401), ALLOCATED, success(), success(),
                             success(LIFETIME=600)])
    echoes: list[tuple[int, float, int]] = []
    with UdpClient(server.address, credentials=CREDS, policy=FAST) as client:
        client.allocate()
        client.create_permission(("127.0.0.1", 9))
        channel, _ = client.channel_bind(("127.0.0.1", 9))
        client.on_channel_data = lambda ch, payload, at: pytest.fail("on_echo takes over")
        client.on_echo = lambda seq, sent, at, size: echoes.append((seq, sent, size))
        client.send_channel(channel, MEDIA_HEADER.pack(7, 1.5) + bytes(148))
        client.send_channel(channel, b"short")
        client.send_channel(channel, MEDIA_HEADER.pack(8, 2.5))
        granted, _ = client.refresh()
        gevent.sleep(0.01)
    assert echoes == [(7, 1.5, 160), (8, 2.5, 12)]
    assert granted == 600


def test_echo_peer_echoes() -> None:
    greenlet, address, counter = spawn_echo()
    try:
        sock = gsocket.socket(gsocket.AF_INET, gsocket.SOCK_DGRAM)
        sock.settimeout(1)
        for i in range(3):
            sock.sendto(bytes([i]) * 10, address)
            assert sock.recvfrom(100)[0] == bytes([i]) * 10
        sock.close()
        assert counter.echoed == 3
    finally:
        greenlet.kill()

"""The sans-I/O TURN session against a scripted in-memory server, on a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from turnstorm.errors import AllocationMismatch, StaleNonce, TurnstormError, Unauthorized
from turnstorm.proto import stun
from turnstorm.proto.credentials import Credentials
from turnstorm.proto.session import (
    METHOD_NAMES,
    Indication,
    PeerData,
    Request,
    TurnSession,
    Unparsable,
)
from turnstorm.proto.stun import Address, Class, Message, Method
from turnstorm.proto.transaction import RetransmitPolicy, TransactionTimeout

CREDS = Credentials("alice", "secret")
REALM = "example.org"
RELAYED = ("192.0.2.1", 50000)
MAPPED = ("198.51.100.7", 40000)
PEER = ("203.0.113.9", 7000)


class ScriptedServer:
    """A TURN server in memory: long-term auth with nonces it can expire, one allocation,
    permissions and channels; peers' data comes back as Data indications or ChannelData."""

    def __init__(self) -> None:
        self.nonce = b"n1"
        self.requests: list[Message] = []
        self.drop = 0
        """Requests to drop (as if lost) before answering again."""
        self.lifetime = 0
        self.permissions: set[str] = set()
        self.channels: dict[int, Address] = {}
        self.sent_to_peers: list[tuple[Address, bytes]] = []

    def handle(self, data: bytes) -> list[bytes]:
        if stun.is_channel_data(data):
            channel, payload = stun.parse_channel_data(data)
            self.sent_to_peers.append((self.channels[channel], payload))
            return []
        message = stun.parse(data)
        if message.message_class == Class.INDICATION:
            self.sent_to_peers.append((message.attributes["XOR-PEER-ADDRESS"],
                                       message.attributes["DATA"]))
            return []
        self.requests.append(message)
        if self.drop:
            self.drop -= 1
            return []
        return [self.answer(message).encode(self.key(message), fingerprint=True)]

    def key(self, message: Message) -> bytes | None:
        return CREDS.key(REALM) if "USERNAME" in message.attributes else None

    def error(self, message: Message, code: int, reason: str) -> Message:
        return Message(message.method, Class.ERROR, message.transaction_id, {
            "ERROR-CODE": (code, reason), "REALM": REALM, "NONCE": self.nonce})

    def answer(self, message: Message) -> Message:
        if message.method == Method.BINDING:
            return Message(Method.BINDING, Class.RESPONSE, message.transaction_id,
                           {"XOR-MAPPED-ADDRESS": MAPPED, "SOFTWARE": "scripted"})
        if "USERNAME" not in message.attributes:
            return self.error(message, 401, "Unauthorized")
        message.check_integrity(CREDS.key(REALM))
        if message.attributes["NONCE"] != self.nonce:
            return self.error(message, 438, "Stale Nonce")
        ok = Message(message.method, Class.RESPONSE, message.transaction_id)
        if message.method == Method.ALLOCATE:
            if self.lifetime:
                return self.error(message, 437, "Allocation Mismatch")
            self.lifetime = 600
            ok.attributes.update({"XOR-RELAYED-ADDRESS": RELAYED, "XOR-MAPPED-ADDRESS": MAPPED,
                                  "LIFETIME": 600})
        elif not self.lifetime:
            return self.error(message, 437, "Allocation Mismatch")
        elif message.method == Method.REFRESH:
            self.lifetime = min(message.attributes.get("LIFETIME", 600), 900)
            ok.attributes["LIFETIME"] = self.lifetime
        elif message.method == Method.CREATE_PERMISSION:
            self.permissions.add(message.attributes["XOR-PEER-ADDRESS"][0])
        elif message.method == Method.CHANNEL_BIND:
            peer = message.attributes["XOR-PEER-ADDRESS"]
            self.channels[message.attributes["CHANNEL-NUMBER"]] = peer
            self.permissions.add(peer[0])
        return ok

    def from_peer(self, peer: Address, data: bytes) -> bytes:
        """What the relay sends the client when ``peer`` sends it ``data``."""
        for channel, bound in self.channels.items():
            if bound == peer:
                return stun.encode_channel_data(channel, data)
        return Message(Method.DATA, Class.INDICATION,
                       attributes={"XOR-PEER-ADDRESS": peer, "DATA": data}).encode()


class Link:
    """Moves datagrams between a session and the server, on a fake clock."""

    def __init__(self, session: TurnSession, server: ScriptedServer, delay: float = 0.01
                 ) -> None:
        self.session = session
        self.server = server
        self.delay = delay
        self.now = 0.0
        self.events: list[Any] = []

    def pump(self) -> None:
        """Deliver everything in flight, each way after ``delay``, until both are quiet."""
        while datagrams := self.session.send(self.now):
            self.now += self.delay
            replies = [reply for data in datagrams for reply in self.server.handle(data)]
            self.now += self.delay
            for reply in replies:
                self.deliver(reply)

    def deliver(self, data: bytes) -> None:
        event = self.session.receive(data, self.now)
        if event is not None:
            self.events.append(event)

    def run(self, request: Request) -> Request:
        """Pump and fire timers until ``request`` completes."""
        self.pump()
        while not request.done:
            deadline = self.session.deadline
            assert deadline is not None
            self.now = max(self.now, deadline)
            self.session.timer(self.now)
            self.pump()
        return request


@pytest.fixture
def server() -> ScriptedServer:
    return ScriptedServer()


@pytest.fixture
def link(server: ScriptedServer) -> Link:
    return Link(TurnSession(CREDS, policy=RetransmitPolicy(rto=0.5, rc=3, rm=4)), server)


def allocated(link: Link) -> Link:
    link.run(link.session.allocate()).result()
    return link


def test_one_method_names_table() -> None:
    from turnstorm import client
    from turnstorm.loadgen import wire

    assert METHOD_NAMES[Method.CHANNEL_BIND] == "ChannelBind"
    assert not hasattr(client, "METHOD_NAMES") and not hasattr(wire, "METHOD_NAMES")


def test_allocate_learns_realm_and_nonce_from_the_401(link: Link, server: ScriptedServer
                                                      ) -> None:
    request = link.run(link.session.allocate(lifetime=300))
    first, second = server.requests
    assert "USERNAME" not in first.attributes and first.attributes["LIFETIME"] == 300
    assert second.attributes["USERNAME"] == "alice"
    assert second.attributes["REALM"] == REALM and second.attributes["NONCE"] == b"n1"
    assert second.attributes["LIFETIME"] == 300
    assert second.transaction_id != first.transaction_id
    assert request.result().message_class == Class.RESPONSE
    assert link.session.allocation is not None
    assert (link.session.allocation.relayed, link.session.allocation.mapped) == (RELAYED, MAPPED)
    assert request.lifetime == 600
    assert request.rtt == pytest.approx(0.02)  # of the final transaction alone
    assert link.now == pytest.approx(0.04)


def test_a_stale_nonce_is_renewed_once(link: Link, server: ScriptedServer) -> None:
    allocated(link)
    server.nonce = b"n2"
    responses: list[Message] = []
    link.session.on_response = responses.append
    link.run(link.session.create_permission(PEER)).result()
    assert [r.attributes.get("ERROR-CODE", (None,))[0] for r in responses] == [438, None]
    assert server.requests[-1].attributes["NONCE"] == b"n2"
    assert link.session.auth.nonce == b"n2"
    assert server.permissions == {PEER[0]}


def test_a_second_438_is_stale_nonce(link: Link, server: ScriptedServer) -> None:
    allocated(link)
    original = server.answer

    def always_stale(message: Message) -> Message:
        server.nonce += b"!"
        return original(message)

    server.answer = always_stale  # type: ignore[method-assign]
    request = link.run(link.session.create_permission(PEER))
    with pytest.raises(StaleNonce) as caught:
        request.result()
    assert str(caught.value) == ("CreatePermission failed: 438 Stale Nonce (the nonce "
                                 "expired and the retry with a fresh one failed too)")


def test_a_second_401_is_unauthorized(server: ScriptedServer) -> None:
    link = Link(TurnSession(Credentials("alice", "wrong")), server)
    server.answer = lambda m: server.error(m, 401, "Unauthorized")  # type: ignore[method-assign]
    request = link.run(link.session.allocate())
    with pytest.raises(Unauthorized) as caught:
        request.result()
    assert str(caught.value) == ("Allocate failed: 401 Unauthorized (wrong username, "
                                 "password or shared secret)")
    assert len(server.requests) == 2


def test_without_credentials_a_401_is_an_error(server: ScriptedServer) -> None:
    link = Link(TurnSession(None), server)
    with pytest.raises(TurnstormError) as caught:
        link.run(link.session.allocate()).result()
    assert str(caught.value) == "the server requires credentials and none were given"


def test_refresh_grants_and_release_forgets(link: Link, server: ScriptedServer) -> None:
    allocated(link)
    refreshed = link.run(link.session.refresh(3600))
    assert refreshed.lifetime == 900
    assert link.session.allocation is not None and link.session.allocation.lifetime == 900
    released = link.run(link.session.refresh(0))
    assert released.lifetime == 0 and link.session.allocation is None
    with pytest.raises(AllocationMismatch) as caught:
        link.run(link.session.refresh(600)).result()
    assert str(caught.value) == ("Refresh failed: 437 Allocation Mismatch (no allocation for "
                                 "this 5-tuple, or one already exists)")


def test_send_and_data_indications(link: Link, server: ScriptedServer) -> None:
    allocated(link)
    link.run(link.session.create_permission(PEER)).result()
    datagram = link.session.data_to(PEER, b"hello")
    assert stun.parse(datagram).method == Method.SEND
    server.handle(datagram)
    assert server.sent_to_peers == [(PEER, b"hello")]
    link.deliver(server.from_peer(PEER, b"back"))
    assert link.events == [PeerData(PEER, b"back", None)]


def test_channel_bind_then_channel_data_both_ways(link: Link, server: ScriptedServer) -> None:
    allocated(link)
    bind = link.run(link.session.channel_bind(PEER))
    assert bind.channel == stun.CHANNEL_MIN
    assert link.session.channels == {stun.CHANNEL_MIN: PEER}
    again = link.run(link.session.channel_bind(PEER))  # a refresh keeps the number
    assert again.channel == stun.CHANNEL_MIN
    assert server.requests[-1].attributes["CHANNEL-NUMBER"] == stun.CHANNEL_MIN
    datagram = link.session.data_to(PEER, b"media")
    assert datagram == stun.encode_channel_data(stun.CHANNEL_MIN, b"media")
    server.handle(datagram)
    link.deliver(server.from_peer(PEER, b"echo"))
    link.deliver(stun.encode_channel_data(stun.CHANNEL_MIN + 1, b"unbound"))
    assert link.events == [PeerData(PEER, b"echo", stun.CHANNEL_MIN)]
    assert server.sent_to_peers == [(PEER, b"media")]


def test_channel_data_is_padded_on_a_stream() -> None:
    session = TurnSession(CREDS, reliable=True)
    assert session.channel_data(0x4000, b"abcde") == b"\x40\x00\x00\x05abcde\x00\x00\x00"


def test_other_indications_and_garbage_are_events(link: Link) -> None:
    keepalive = Message(Method.BINDING, Class.INDICATION)
    link.deliver(keepalive.encode())
    link.deliver(b"\x00\x01\x00")
    indication, garbage = link.events
    assert isinstance(indication, Indication)
    assert indication.message.method == Method.BINDING
    assert isinstance(garbage, Unparsable)


def test_a_lost_request_is_retransmitted_on_schedule(link: Link, server: ScriptedServer
                                                      ) -> None:
    server.drop = 2
    request = link.session.binding()
    link.pump()
    assert link.session.deadline == pytest.approx(0.5)
    assert link.session.timer(0.49) == 0
    assert link.session.timer(0.5) == 1
    link.now = 0.5
    link.pump()
    assert link.session.deadline == pytest.approx(1.5)
    link.now = 1.5
    assert link.session.timer(1.5) == 1
    link.pump()
    assert request.result().method == Method.BINDING
    assert request.mapped == MAPPED and link.session.software == "scripted"
    assert request.rtt == pytest.approx(0.02)  # from the last send
    assert link.session.retransmits == 2
    assert len({r.transaction_id for r in server.requests}) == 1
    assert link.session.deadline is None


def test_a_request_times_out_with_its_method_name(link: Link, server: ScriptedServer) -> None:
    server.drop = 99
    request = link.run(link.session.binding())
    # Sends at 0, 0.5 and 1.5 s; gives up rm * rto = 2 s after the last.
    assert link.now == pytest.approx(3.5)
    with pytest.raises(TransactionTimeout) as caught:
        request.result()
    assert str(caught.value) == "STUN Binding transaction timed out after 3 attempts in 3.5 s"
    assert len(server.requests) == 3


def test_a_stream_sends_once_and_waits_ti(server: ScriptedServer) -> None:
    link = Link(TurnSession(CREDS, reliable=True, policy=RetransmitPolicy(ti=2.0)), server)
    server.drop = 99
    request = link.run(link.session.binding())
    assert link.now == pytest.approx(2.0)
    assert isinstance(request.error, TransactionTimeout)
    assert str(request.error) == "STUN Binding transaction timed out after 1 attempt in 2 s"
    assert len(server.requests) == 1


def test_a_missing_allocate_attribute_is_an_error(link: Link, server: ScriptedServer) -> None:
    original = server.answer

    def without_lifetime(message: Message) -> Message:
        answer = original(message)
        answer.attributes.pop("LIFETIME", None)
        return answer

    server.answer = without_lifetime  # type: ignore[method-assign]
    with pytest.raises(TurnstormError) as caught:
        link.run(link.session.allocate()).result()
    assert str(caught.value) == "Allocate response has no LIFETIME"
    assert link.session.allocation is None


def test_fail_all_and_abandon(link: Link) -> None:
    done: list[Request] = []
    first = link.session.binding()
    first.on_done = done.append
    second = link.session.binding()
    link.session.abandon(second)
    assert len(link.session.send(0.0)) == 1
    link.session.fail_all(ConnectionError("gone"))
    assert done == [first] and isinstance(first.error, ConnectionError)
    assert not second.done and link.session.deadline is None

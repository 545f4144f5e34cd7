"""StunClient / TurnClient against a real coturn on loopback, over UDP and TCP."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest

from tests.integration.conftest import RelayFactory
from tests.integration.helpers import (
    TRANSPORTS,
    collect_data,
    credentials,
    error_codes,
    payload,
    record_responses,
    turn_client,
    unique_user,
    wait_until,
)
from turnstorm.aioecho import EchoProtocol, start_echo_peer
from turnstorm.client import ConnectError, StunClient, TurnClient
from turnstorm.errors import (
    AllocationMismatch,
    AllocationQuotaReached,
    BadRequest,
    Unauthorized,
)
from turnstorm.proto import stun
from turnstorm.proto.stun import Address, Class, Method
from turnstorm.proto.transaction import RetransmitPolicy, TransactionTimeout
from turnstorm.relay.process import LocalRelay

pytestmark = pytest.mark.integration

by_transport = pytest.mark.parametrize("transport", TRANSPORTS)

# Sizes 1..1200 bytes; most are not multiples of 4, so over TCP both directions need
# ChannelData padding.
SIZES = (1, 2, 3, 4, 5, 7, 64, 333, 1000, 1197, 1199, 1200)

MISMATCH = "(no allocation for this 5-tuple, or one already exists)"


@pytest.fixture
def relay(relays: RelayFactory) -> LocalRelay:
    return relays()


@pytest.fixture
async def echo() -> AsyncIterator[tuple[EchoProtocol, Address]]:
    transport, protocol, address = await start_echo_peer("127.0.0.1")
    try:
        yield protocol, address
    finally:
        transport.close()


def spy_frames(client: TurnClient) -> list[bytes]:
    """Every frame the client receives, as framed on the wire."""
    frames: list[bytes] = []
    receive = client._frame_received

    def spy(data: bytes) -> None:
        frames.append(bytes(data))
        receive(data)

    client._frame_received = spy  # type: ignore[method-assign]
    return frames


async def round_trip_each(client: TurnClient, send: Callable[[bytes], None],
                          peer: Address) -> None:
    """Send each size in turn and check the echo comes back byte for byte from ``peer``."""
    received = collect_data(client)
    for size in SIZES:
        send(payload(size))
        assert await asyncio.wait_for(received.get(), 2.0) == (peer, payload(size))
    burst = [payload(size) + bytes([n]) for n, size in enumerate(SIZES)]
    for data in burst:
        send(data)
    echoed = [await asyncio.wait_for(received.get(), 2.0) for _ in burst]
    assert sorted(echoed) == sorted((peer, data) for data in burst)
    await asyncio.sleep(0.05)
    assert received.empty()
    assert client.received_errors == []


# -- Binding and Allocate --------------------------------------------------------------------


@by_transport
async def test_binding_returns_own_local_address(relay: LocalRelay, transport: str) -> None:
    async with await StunClient.connect((relay.host, relay.port), transport) as client:
        mapped, rtt = await client.binding()
        assert mapped == client.local_address
        assert 0 < rtt < 1.0
        assert client.software == "Coturn-4.6.1 'Gorst'"


@by_transport
async def test_allocate_authenticates_and_relays_in_port_range(
    relay: LocalRelay, transport: str
) -> None:
    async with turn_client(relay, transport) as client:
        responses = record_responses(client)
        allocation = await client.allocate()
        assert error_codes(responses) == [401, None]
        assert responses[0].attributes["REALM"] == "turnstorm.local"
        assert client.auth.nonce == responses[0].attributes["NONCE"]
        host, port = allocation.relayed
        assert host == "127.0.0.1"
        assert relay.config.min_port <= port <= relay.config.max_port
        assert allocation.mapped == client.local_address
        assert allocation.lifetime == 600


@by_transport
async def test_allocate_twice_on_one_5_tuple_is_a_mismatch(
    relay: LocalRelay, transport: str
) -> None:
    async with turn_client(relay, transport) as client:
        await client.allocate()
        with pytest.raises(AllocationMismatch) as caught:
            await client.allocate()
    assert str(caught.value) == (
        f"Allocate failed: 437 Mismatched allocation: wrong transaction ID {MISMATCH}"
    )


@by_transport
async def test_wrong_secret_is_unauthorized(relay: LocalRelay, transport: str) -> None:
    creds = credentials(relay, secret="not-the-relay-secret")
    async with turn_client(relay, transport, creds) as client:
        with pytest.raises(Unauthorized) as caught:
            await client.allocate()
    assert str(caught.value) == (
        "Allocate failed: 401 Unauthorized (wrong username, password or shared secret)"
    )
    assert caught.value.code == 401


# -- relayed data ----------------------------------------------------------------------------


@by_transport
async def test_send_and_data_indications_round_trip(
    relay: LocalRelay, transport: str, echo: tuple[EchoProtocol, Address]
) -> None:
    protocol, peer = echo
    async with turn_client(relay, transport) as client:
        frames = spy_frames(client)
        await client.allocate()
        await client.create_permission(peer)
        await round_trip_each(client, lambda data: client.send_indication(peer, data), peer)
    data_frames = [f for f in frames if not stun.is_channel_data(f)
                   and stun.parse(f).message_class == Class.INDICATION]
    assert len(data_frames) == 2 * len(SIZES)
    assert all(stun.parse(f).method == Method.DATA for f in data_frames)
    assert not any(stun.is_channel_data(f) for f in frames)
    assert protocol.echoed == 2 * len(SIZES)


@by_transport
async def test_channel_data_round_trip(
    relay: LocalRelay, transport: str, echo: tuple[EchoProtocol, Address]
) -> None:
    protocol, peer = echo
    async with turn_client(relay, transport) as client:
        frames = spy_frames(client)
        await client.allocate()
        channel = await client.channel_bind(peer)
        assert channel == stun.CHANNEL_MIN
        await round_trip_each(client, lambda data: client.send_channel(channel, data), peer)
    channel_frames = [f for f in frames if stun.is_channel_data(f)]
    assert len(channel_frames) == 2 * len(SIZES)
    for frame in channel_frames:
        number, data = stun.parse_channel_data(frame)
        assert number == channel
        # Over TCP the relay pads ChannelData to 4 bytes (RFC 8656 section 12.5); coturn
        # leaves whatever was in its buffer in the padding, so only the length counts.
        padding = -len(data) % 4 if transport == "tcp" else 0
        assert len(frame) == 4 + len(data) + padding
    assert protocol.echoed == 2 * len(SIZES)


# -- Refresh and release ---------------------------------------------------------------------


@by_transport
async def test_refresh_returns_granted_lifetime_clamped_to_max(
    relays: RelayFactory, transport: str
) -> None:
    relay = relays(max_allocate_lifetime=900)
    async with turn_client(relay, transport) as client:
        assert (await client.allocate()).lifetime == 600
        assert await client.refresh(3600) == 900
        assert client.allocation is not None and client.allocation.lifetime == 900
        assert await client.refresh(700) == 700
        # coturn raises lifetimes below its 600 s minimum to the minimum.
        assert await client.refresh(100) == 600
    async with turn_client(relay, transport) as client:
        assert (await client.allocate(lifetime=86400)).lifetime == 900


async def test_release_frees_the_allocation_udp(relay: LocalRelay) -> None:
    async with turn_client(relay, "udp") as client:
        first = await client.allocate()
        await client.release()
        assert client.allocation is None

        # coturn 4.6.1 answers a LIFETIME 0 Refresh at once but deletes the allocation
        # on a 1 s timer. CreatePermission (unlike Refresh) does not extend it, so poll
        # with it until the server no longer knows the allocation.
        async def gone() -> bool:
            try:
                await client.create_permission(("127.0.0.1", 9))
            except BadRequest as exc:
                # coturn 4.6.1 says 400, not RFC 8656's 437, for CreatePermission
                # without an allocation; the 5-tuple's session restarted with a new
                # nonce (438) first, which the client retried transparently.
                assert str(exc) == ("CreatePermission failed: 400 Bad Request "
                                    "(the server could not parse the request)")
                return True
            return False

        nonce = client.auth.nonce
        assert await wait_until(gone, 3.0) < 2.5
        assert client.auth.nonce != nonce
        with pytest.raises(AllocationMismatch) as caught:
            await client.refresh(600)
        assert str(caught.value) == f"Refresh failed: 437 Invalid allocation {MISMATCH}"

        again = await client.allocate()
        assert again.mapped == first.mapped == client.local_address
        await client.create_permission(("127.0.0.1", 9))


async def test_release_frees_the_allocation_tcp(relay: LocalRelay) -> None:
    # Over TCP coturn deletes the allocation with its session: ~1 s after the release it
    # closes the connection, so a new allocation needs a new connection.
    async with turn_client(relay, "tcp") as client:
        await client.allocate()
        await client.release()

        async def gone() -> bool:
            try:
                await client.create_permission(("127.0.0.1", 9))
            except ConnectError as exc:
                assert str(exc) == "connection to the server was closed"
                assert client._pending == {}  # a failed send leaves no orphaned future
                return True
            return False

        assert await wait_until(gone, 3.0) < 2.5
    async with turn_client(relay, "tcp") as client:
        await client.allocate()


# -- nonces and quotas ------------------------------------------------------------------------


@by_transport
async def test_stale_nonce_is_renewed_transparently(
    relays: RelayFactory, transport: str
) -> None:
    relay = relays(stale_nonce=1)
    async with turn_client(relay, transport) as client:
        await client.allocate()
        first_nonce = client.auth.nonce
        responses = record_responses(client)

        async def renewed() -> bool:
            await client.create_permission(("127.0.0.1", 9))
            return client.auth.nonce != first_nonce

        # coturn ticks its clock once a second and wants it past expiry: at most ~3 s.
        await wait_until(renewed, 4.0, interval=0.25)
        assert error_codes(responses)[-2:] == [438, None]
        assert responses[-2].attributes["NONCE"] == client.auth.nonce
        assert await client.refresh(600) == 600


@by_transport
async def test_user_quota_refuses_the_third_allocation(
    relays: RelayFactory, transport: str
) -> None:
    relay = relays(user_quota=2)
    user = unique_user()
    async with (turn_client(relay, transport, credentials(relay, user)) as first,
                turn_client(relay, transport, credentials(relay, user)) as second,
                turn_client(relay, transport, credentials(relay, user)) as third):
        await first.allocate()
        await second.allocate()
        with pytest.raises(AllocationQuotaReached) as caught:
            await third.allocate()
        assert first.local_address != second.local_address != third.local_address
        # Another username is not affected.
        async with turn_client(relay, transport) as other:
            await other.allocate()
    assert str(caught.value) == (
        "Allocate failed: 486 Allocation Quota Reached "
        "(the relay's per-user or total allocation quota is exhausted)"
    )


# -- retransmission --------------------------------------------------------------------------


async def test_udp_request_is_retransmitted_then_times_out() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mute:
        mute.bind(("127.0.0.1", 0))
        mute.setblocking(False)
        policy = RetransmitPolicy(rto=0.05, rc=3, rm=2)
        client = await StunClient.connect(mute.getsockname(), "udp", policy=policy)
        start = time.monotonic()
        try:
            with pytest.raises(TransactionTimeout) as caught:
                await client.binding()
        finally:
            client.close()
        elapsed = time.monotonic() - start
        copies = []
        while True:
            try:
                copies.append(mute.recv(2048))
            except BlockingIOError:
                break
    # Sends at 0, 0.05 and 0.15 s; gives up 2 RTO after the last: 0.25 s.
    assert len(copies) == 3
    assert len(set(copies)) == 1
    request = stun.parse(copies[0])
    assert (request.method, request.message_class) == (Method.BINDING, Class.REQUEST)
    assert caught.value.attempts == 3
    assert 0.25 <= caught.value.elapsed <= elapsed < 1.0
    assert re.fullmatch(r"STUN Binding transaction timed out after 3 attempts in 0\.2[5-9]\d* s",
                        str(caught.value))


async def test_tcp_request_is_sent_once_then_times_out_after_ti() -> None:
    received = bytearray()

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(2048):
            received.extend(data)
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    address = server.sockets[0].getsockname()[:2]
    policy = RetransmitPolicy(rto=0.05, rc=3, rm=2, ti=0.3)
    try:
        async with await StunClient.connect(address, "tcp", policy=policy) as client:
            with pytest.raises(TransactionTimeout) as caught:
                await client.binding()
    finally:
        server.close()
        await server.wait_closed()
    assert caught.value.attempts == 1
    assert 0.3 <= caught.value.elapsed < 1.0
    assert stun.stream_frame_length(bytes(received)) == len(received)
    assert stun.parse(bytes(received)).method == Method.BINDING

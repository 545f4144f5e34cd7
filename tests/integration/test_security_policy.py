"""The rendered coturn config enforces the peer policy on the wire, and keeps the secret out."""

from __future__ import annotations

import asyncio
import os
import secrets
import stat
from collections.abc import AsyncIterator

import pytest

from tests.integration.conftest import RelayFactory
from tests.integration.helpers import FORBIDDEN, collect_data, turn_client
from turnstorm.aioecho import EchoProtocol, start_echo_peer
from turnstorm.client import TurnClient
from turnstorm.coturnconf import RelayConfig, render
from turnstorm.errors import Forbidden
from turnstorm.proto.stun import Address
from turnstorm.relay.process import LocalRelay, loopback_relay_config

pytestmark = pytest.mark.integration

# Loopback outside the one allowed address, RFC 1918, cloud metadata (link-local), CGNAT.
DENIED_PEERS = ("127.0.0.2", "10.0.0.1", "169.254.169.254", "192.168.1.1", "100.64.0.1")


@pytest.fixture
def relay(relays: RelayFactory) -> LocalRelay:
    """The default policy, opened for exactly one loopback address (the echo peer's)."""
    return relays(allowed_peers=["127.0.0.1/32"])


@pytest.fixture
async def echo() -> AsyncIterator[tuple[EchoProtocol, Address]]:
    transport, protocol, address = await start_echo_peer("127.0.0.1")
    try:
        yield protocol, address
    finally:
        transport.close()


async def refused(client: TurnClient, peer: Address) -> list[str]:
    """The messages of both peer-installing requests, each of which must be a 403."""
    messages = []
    with pytest.raises(Forbidden) as caught:
        await client.create_permission(peer)
    messages.append(str(caught.value))
    with pytest.raises(Forbidden) as caught:
        await client.channel_bind(peer)
    messages.append(str(caught.value))
    return messages


@pytest.mark.parametrize("host", DENIED_PEERS)
async def test_denied_peer_gets_403(relay: LocalRelay, host: str) -> None:
    async with turn_client(relay, "udp") as client:
        await client.allocate()
        assert await refused(client, (host, 9)) == [
            FORBIDDEN.format(method="CreatePermission"), FORBIDDEN.format(method="ChannelBind"),
        ]
        assert client.channels == {}


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_nothing_is_relayed_to_a_denied_peer(
    relay: LocalRelay, transport: str, echo: tuple[EchoProtocol, Address]
) -> None:
    allowed_protocol, allowed = echo
    denied_transport, denied_protocol, denied = await start_echo_peer("127.0.0.2")
    try:
        async with turn_client(relay, transport) as client:
            received = collect_data(client)
            await client.allocate()
            await refused(client, denied)
            await client.create_permission(allowed)
            for n in range(3):
                client.send_indication(denied, b"to the denied peer %d" % n)
            # The relay handles one client's packets in order: once the allowed peer's
            # echo is back, the denied sends were processed (and dropped).
            client.send_indication(allowed, b"to the allowed peer")
            assert await asyncio.wait_for(received.get(), 2.0) == (
                allowed, b"to the allowed peer"
            )
            await asyncio.sleep(0.1)
            assert received.empty()
    finally:
        denied_transport.close()
    assert denied_protocol.echoed == 0
    assert allowed_protocol.echoed == 1


async def test_allowed_loopback_peer_works(
    relay: LocalRelay, echo: tuple[EchoProtocol, Address]
) -> None:
    _, peer = echo
    async with turn_client(relay, "udp") as client:
        received = collect_data(client)
        await client.allocate()
        await client.create_permission(peer)
        channel = await client.channel_bind(peer)
        client.send_indication(peer, b"indication")
        assert await asyncio.wait_for(received.get(), 2.0) == (peer, b"indication")
        client.send_channel(channel, b"channel")
        assert await asyncio.wait_for(received.get(), 2.0) == (peer, b"channel")


async def test_no_allowed_peers_refuses_even_loopback(
    relays: RelayFactory, echo: tuple[EchoProtocol, Address]
) -> None:
    protocol, peer = echo
    relay = relays(allowed_peers=[])
    async with turn_client(relay, "udp") as client:
        await client.allocate()
        assert await refused(client, peer) == [
            FORBIDDEN.format(method="CreatePermission"), FORBIDDEN.format(method="ChannelBind"),
        ]
        client.send_indication(peer, b"must not arrive")
        await asyncio.sleep(0.1)
    assert protocol.echoed == 0


# -- the rendered text ------------------------------------------------------------------------

CONFIGS = {
    "defaults": RelayConfig(realm="example.org"),
    "loopback": loopback_relay_config(port=3478, allowed_peers=["127.0.0.1/32"]),
    "no-peers": loopback_relay_config(port=3478, allowed_peers=[]),
    "cli": RelayConfig(realm="example.org", cli_port=5766, cli_password="cli-pass",
                       user_quota=3, total_quota=30),
}
REQUIRED_LINES = ("use-auth-secret", "no-multicast-peers")
REQUIRED_SETTINGS = ("user-quota", "total-quota")


@pytest.mark.parametrize("name", CONFIGS)
def test_rendered_config_is_secure_and_secret_free(name: str) -> None:
    config = CONFIGS[name]
    secret = secrets.token_urlsafe(24)
    without = render(config)
    with_secret = render(config, secret=secret)
    assert secret not in without
    assert "static-auth-secret" not in without
    assert with_secret.splitlines().count(f"static-auth-secret={secret}") == 1
    assert with_secret.count(secret) == 1
    for text in (without, with_secret):
        lines = text.splitlines()
        for line in REQUIRED_LINES:
            assert line in lines
        settings = dict(line.split("=", 1) for line in lines if "=" in line)
        assert int(settings["user-quota"]) == config.user_quota > 0
        assert int(settings["total-quota"]) == config.total_quota > 0


def test_denied_ranges_in_the_loopback_config() -> None:
    lines = render(CONFIGS["loopback"]).splitlines()
    for denied in ("127.0.0.0-127.255.255.255", "10.0.0.0-10.255.255.255",
                   "169.254.0.0-169.254.255.255", "192.168.0.0-192.168.255.255",
                   "100.64.0.0-100.127.255.255"):
        assert f"denied-peer-ip={denied}" in lines
    assert "allowed-peer-ip=127.0.0.1" in lines
    assert "allow-loopback-peers" in lines
    assert "allow-loopback-peers" not in render(CONFIGS["no-peers"]).splitlines()


def test_running_relay_keeps_its_secret_in_a_private_file(relay: LocalRelay) -> None:
    path = os.path.join(relay.workdir, "turnserver.conf")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path, encoding="utf8") as handle:
        assert f"static-auth-secret={relay.secret}\n" in handle.read()

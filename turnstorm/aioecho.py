"""A UDP echo peer: the far end that relayed media and probes bounce off."""

from __future__ import annotations

import asyncio
from typing import Any

from turnstorm.proto.stun import Address


class EchoProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.echoed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] # uvloop's UDP transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)
        self.echoed += 1


async def start_echo_peer(host: str = "127.0.0.1", port: int = 0) -> tuple[
    asyncio.DatagramTransport, EchoProtocol, Address
]:
    """Start an echo peer; returns its transport, protocol and bound address."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        EchoProtocol, local_addr=(host, port)
    )
    sockname = transport.get_extra_info("sockname")
    return transport, protocol, (sockname[0], sockname[1])

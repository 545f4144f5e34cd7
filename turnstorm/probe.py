"""``turnstorm probe``: one black-box measurement of a STUN/TURN server.

Direct Binding RTT, Allocate latency (the whole 401 -> nonce -> authenticated dance),
echo RTT through a channel on the relay, and the relay overhead (relayed minus direct).
The allocation is always released.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from dataclasses import asdict, dataclass

from turnstorm.aioecho import start_echo_peer
from turnstorm.client import StunClient, TurnClient
from turnstorm.errors import TurnstormError
from turnstorm.proto.credentials import Credentials
from turnstorm.proto.stun import Address
from turnstorm.proto.transaction import RetransmitPolicy, TransactionTimeout
from turnstorm.uri import ServerUri


@dataclass
class ProbeResult:
    uri: str
    software: str | None
    binding_rtt_ms: float
    allocate_ms: float
    relay_rtt_ms: float
    relay_overhead_ms: float
    relayed_address: str
    mapped_address: str
    peer: str
    samples: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _fmt(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_secret(path: str) -> str:
    """Read a shared secret file (one line; surrounding whitespace ignored)."""
    try:
        with open(path, encoding="utf8") as handle:
            secret = handle.read().strip()
    except OSError as exc:
        raise TurnstormError(f"cannot read secret file {path}: {exc.strerror}") from None
    if not secret:
        raise TurnstormError(f"secret file {path} is empty")
    return secret


async def _echo_rtt(client: TurnClient, peer: Address, channel: int, timeout: float) -> float:
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[bytes] = loop.create_future()
    token = os.urandom(8)

    def on_data(source: Address, data: bytes) -> None:
        if data == token and not waiter.done():
            waiter.set_result(data)

    client.on_data = on_data
    start = time.perf_counter()
    client.send_channel(channel, token)
    try:
        await asyncio.wait_for(waiter, timeout)
    except TimeoutError:
        raise TurnstormError(
            f"no echo from peer {_fmt(peer)} through the relay within {timeout:g} s "
            "(is the peer running and allowed by the relay?)"
        ) from None
    return time.perf_counter() - start


async def probe(
    uri: ServerUri,
    credentials: Credentials,
    *,
    peer: Address | None = None,
    samples: int = 5,
    timeout: float = 5.0,
) -> ProbeResult:
    """Measure ``uri``; raises :class:`TurnstormError` subclasses with one-line messages."""
    if samples < 1:
        raise TurnstormError("--samples must be at least 1")
    # Fit the whole retransmission schedule into the timeout.
    policy = RetransmitPolicy(rto=min(0.5, timeout / 8), rc=4, rm=4, ti=timeout)
    echo = None
    if peer is None:
        echo, _, peer = await start_echo_peer("::1" if ":" in uri.host else "127.0.0.1")
    try:
        binding = await StunClient.connect(uri.address, uri.transport, policy=policy,
                                           timeout=timeout)
        try:
            rtts = [(await binding.binding())[1] for _ in range(samples)]
            software = binding.software
        finally:
            binding.close()
        client = await TurnClient.connect(uri.address, uri.transport, credentials=credentials,
                                          policy=policy, timeout=timeout)
        try:
            start = time.perf_counter()
            allocation = await client.allocate()
            allocate_s = time.perf_counter() - start
            channel = await client.channel_bind(peer)
            relay = [await _echo_rtt(client, peer, channel, timeout) for _ in range(samples)]
            await client.release()
        finally:
            with contextlib.suppress(TurnstormError, TransactionTimeout):
                await client.aclose()
    finally:
        if echo is not None:
            echo.close()
    binding_ms = statistics.median(rtts) * 1000
    relay_ms = statistics.median(relay) * 1000
    return ProbeResult(
        uri=str(uri),
        software=software,
        binding_rtt_ms=round(binding_ms, 3),
        allocate_ms=round(allocate_s * 1000, 3),
        relay_rtt_ms=round(relay_ms, 3),
        relay_overhead_ms=round(relay_ms - binding_ms, 3),
        relayed_address=_fmt(allocation.relayed),
        mapped_address=_fmt(allocation.mapped),
        peer=_fmt(peer),
        samples=samples,
    )

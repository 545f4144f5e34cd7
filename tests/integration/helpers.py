"""Helpers shared by the integration tests (no fixtures: see conftest.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from turnstorm.client import TurnClient
from turnstorm.proto.credentials import Credentials
from turnstorm.proto.stun import Address, Message
from turnstorm.relay.process import LocalRelay
from turnstorm.relay.procfs import read_steal_seconds

TRANSPORTS = ("udp", "tcp")

FORBIDDEN = ("{method} failed: 403 Forbidden IP "
             "(the relay's security policy refused it, e.g. a denied peer address)")


def unique_user(prefix: str = "it") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def credentials(relay: LocalRelay, user: str | None = None,
                secret: str | None = None) -> Credentials:
    """TURN REST credentials for ``relay`` (its own secret unless ``secret`` is given)."""
    return Credentials.ephemeral(secret or relay.secret, user or unique_user(), time.time())


@asynccontextmanager
async def turn_client(relay: LocalRelay, transport: str,
                      creds: Credentials | None = None) -> AsyncIterator[TurnClient]:
    client = await TurnClient.connect((relay.host, relay.port), transport,
                                      credentials=creds or credentials(relay))
    try:
        yield client
    finally:
        await client.aclose()


def record_responses(client: TurnClient) -> list[Message]:
    """Every response the client's transactions get, in order (401s and 438s included)."""
    responses: list[Message] = []
    client.session.on_response = responses.append
    return responses


def error_codes(responses: list[Message]) -> list[int | None]:
    return [r.attributes["ERROR-CODE"][0] if "ERROR-CODE" in r.attributes else None
            for r in responses]


def collect_data(client: TurnClient) -> asyncio.Queue[tuple[Address, bytes]]:
    """Route the client's peer data (Data indications and ChannelData) into a queue."""
    queue: asyncio.Queue[tuple[Address, bytes]] = asyncio.Queue()
    client.on_data = lambda peer, data: queue.put_nowait((peer, data))
    return queue


def payload(size: int) -> bytes:
    """Deterministic bytes, different for every size."""
    return bytes((size * 7 + i) % 251 for i in range(size))


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float,
                     interval: float = 0.1) -> float:
    """Await ``check()`` every ``interval`` until it is true; return the seconds it took."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout:g} s")
        await asyncio.sleep(interval)
    return time.monotonic() - start


def unless_stolen(check: Callable[[], None], attempts: int = 3) -> None:
    """Run a timing check again when it failed while the hypervisor stole CPU time from
    this (virtual) machine: a stall of a few milliseconds then is the host's, not the
    code's. A failure with no time stolen, or on the last attempt, fails the test."""
    for attempt in range(1, attempts + 1):
        before = read_steal_seconds()
        try:
            check()
            return
        except AssertionError:
            stolen = read_steal_seconds() - before
            if stolen <= 0 or attempt == attempts:
                raise
            print(f"timing check failed while {stolen * 1e3:.0f} ms were stolen by the "
                  f"hypervisor: attempt {attempt + 1} of {attempts}")

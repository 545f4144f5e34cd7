"""Drain-aware scale-in on real coturn under live paced media: 0 allocations cut.

Two CPU-capped relays carry calls (ChannelData to an echo peer every 20 ms). The real
policy engine asks for one relay; the pool drains the one with fewer allocations. Then:
new calls, placed from the rotation, land only on the other relay (and a direct Allocate
on the drained one gets 300 Try Alternate); the calls on the drained relay keep relaying
with zero loss until they hang up normally; the relay is removed only once its
allocations reach 0.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from dataclasses import dataclass, field

import pytest

from tests.conftest import require
from tests.integration.helpers import unique_user
from turnstorm.aioecho import start_echo_peer
from turnstorm.client import TurnClient
from turnstorm.errors import StunErrorResponse
from turnstorm.policy import Autoscaler, StormOptions
from turnstorm.proto.credentials import Credentials
from turnstorm.proto.stun import Address
from turnstorm.relay.actuator import LocalPool
from turnstorm.relay.cgroup import CgroupError, detect
from turnstorm.spec import ScalingBehavior, ScalingPolicy

pytestmark = pytest.mark.integration

PACING = 0.02


@dataclass
class Call:
    """One media session through a relay: numbered packets out, echoes back."""

    client: TurnClient
    relay: Address
    sent: int = 0
    received: set[int] = field(default_factory=set)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False
    task: asyncio.Task[None] | None = None

    @property
    def lost(self) -> int:
        return self.sent - len(self.received)


async def place_call(relay: Address, secret: str, peer: Address) -> Call:
    creds = Credentials.ephemeral(secret, unique_user("call"), time.time())
    client = await TurnClient.connect(relay, "udp", credentials=creds)
    await client.allocate()
    channel = await client.channel_bind(peer)
    call = Call(client, relay)
    client.on_data = lambda _peer, data: call.received.add(struct.unpack("!I", data[:4])[0])

    async def media() -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not call.stop.is_set():
            client.send_channel(channel, struct.pack("!I", call.sent) + b"\0" * 156)
            call.sent += 1
            next_at += PACING
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        await asyncio.sleep(0.3)  # let the last echoes come back
        await client.release()  # hang up normally
        call.ended = True
        client.close()

    call.task = asyncio.create_task(media())
    return call


async def hang_up(calls: list[Call]) -> None:
    for call in calls:
        call.stop.set()
    await asyncio.gather(*(c.task for c in calls if c.task is not None))


def policy() -> ScalingPolicy:
    return ScalingPolicy(
        enabled=True, tolerance=0.1, targets={"allocationsPerRelay": 50.0},
        scale_up=ScalingBehavior(0, 100, 4, 15), scale_down=ScalingBehavior(0, 100, 1, 15),
        drain_deadline_seconds=600)


async def test_scale_in_under_live_calls_cuts_nothing(turnserver_bin: str) -> None:
    try:
        root = detect().root
    except CgroupError as exc:
        require(False, str(exc))
    require(os.access(root, os.W_OK), f"no write access to {root} (root needed)")
    echo_transport, _, peer = await start_echo_peer()
    calls: list[Call] = []
    try:
        with LocalPool(cpus=0.5) as pool:
            a, b = pool.start_relay(), pool.start_relay()
            calls_a = [await place_call((a.host, a.port), pool.secret, peer) for _ in range(4)]
            calls_b = [await place_call((b.host, b.port), pool.secret, peer) for _ in range(3)]
            calls += calls_a + calls_b
            await asyncio.sleep(1.0)

            scaler = Autoscaler(policy(), min_replicas=1, max_replicas=4,
                                storm=StormOptions(enabled=False))
            t0 = time.monotonic()
            samples = await asyncio.to_thread(pool.samples, 0.0)
            decision = scaler.evaluate(0.0, samples)
            assert (decision.desired, decision.drain) == (1, [b.name]), decision.reason
            await asyncio.to_thread(pool.apply, decision, 0.0)
            assert pool.rotation() == [a.uri]

            # New calls come from the rotation: all on relay a.
            rotation = pool.rotation_addresses()
            newcomers = [await place_call(rotation[i % len(rotation)], pool.secret, peer)
                         for i in range(3)]
            calls += newcomers
            assert all(c.client.allocation is not None
                       and c.client.allocation.relayed[0] == a.host for c in newcomers)
            # A client that still knows the drained relay is sent elsewhere.
            stray = await TurnClient.connect(
                (b.host, b.port), "udp",
                credentials=Credentials.ephemeral(pool.secret, unique_user("stray"),
                                                  time.time()))
            with pytest.raises(StunErrorResponse) as redirected:
                await stray.allocate()
            stray.close()
            assert redirected.value.code == 300
            assert await asyncio.to_thread(pool.allocations, b.name) == 3

            # The drained relay's calls go on, then hang up; meanwhile the policy keeps
            # evaluating and must not remove the relay before its allocations reach 0.
            hangup = asyncio.create_task(_hang_up_later(calls_b, 1.5))
            removed_at: float | None = None
            allocations_at_removal: int | None = None
            while removed_at is None:
                now = time.monotonic() - t0
                samples = await asyncio.to_thread(pool.samples, now)
                decision = scaler.evaluate(now, samples)
                if b.name in decision.remove:
                    allocations_at_removal = await asyncio.to_thread(pool.allocations, b.name)
                    await asyncio.to_thread(pool.apply, decision, now)
                    removed_at = now
                else:
                    assert decision.drain == [] and decision.scale_up == 0
                    assert now < 10, "drained relay never reached 0 allocations"
                    await asyncio.sleep(0.3)
            await hangup
            assert removed_at >= 1.5
            assert allocations_at_removal == 0
            assert pool.allocations_cut == 0
            assert list(pool.relays) == [a.name]

            for call in calls_b:
                assert call.ended, "a call on the drained relay did not end normally"
                assert call.sent >= 100 and call.lost == 0, (call.sent, call.lost)
            await hang_up(calls_a + newcomers)
            for call in calls_a + newcomers:
                assert call.ended and call.lost == 0, (call.sent, call.lost)
            print(f"drained {b.name}: {sum(c.sent for c in calls_b)} packets on "
                  f"{len(calls_b)} calls, 0 lost; removed {removed_at:.1f} s after the "
                  f"drain with 0 allocations; events: {pool.events}")
    finally:
        for call in calls:
            call.stop.set()
            if call.task is not None and not call.task.done():
                call.task.cancel()
            call.client.close()
        echo_transport.close()


async def _hang_up_later(calls: list[Call], delay: float) -> None:
    await asyncio.sleep(delay)
    await hang_up(calls)

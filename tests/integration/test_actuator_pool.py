"""LocalPool lifecycle on real coturn: start, cap, drain, remove, close; nothing left over."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from tests.conftest import require
from tests.integration.helpers import unique_user
from turnstorm.client import TurnClient
from turnstorm.errors import StunErrorResponse
from turnstorm.policy import Decision
from turnstorm.proto.credentials import Credentials
from turnstorm.relay.actuator import LocalPool, PoolError
from turnstorm.relay.cgroup import CgroupError, detect
from turnstorm.relay.procfs import find_process

pytestmark = pytest.mark.integration


def turnserver_pids() -> set[int]:
    return set(find_process("turnserver"))


def listening(host: str, port: int) -> bool:
    """Whether something holds UDP ``host:port`` (from /proc/net/udp)."""
    a, b, c, d = (int(x) for x in host.split("."))
    local = f"{d:02X}{c:02X}{b:02X}{a:02X}:{port:04X}"
    with open("/proc/net/udp", encoding="ascii") as handle:
        return any(line.split()[1] == local for line in handle.read().splitlines()[1:])


@pytest.fixture
def cgroups_root(turnserver_bin: str) -> str:
    try:
        root = detect().root
    except CgroupError as exc:
        require(False, str(exc))
    require(os.access(root, os.W_OK), f"no write access to {root} (root needed)")
    return root


def test_pool_lifecycle_leaves_nothing_behind(cgroups_root: str) -> None:
    with LocalPool(cpus=0.5) as pool:
        a = pool.start_relay()
        b = pool.start_relay()
        assert a.host != b.host and {a.host, b.host} <= {f"127.0.0.{x}" for x in range(2, 255)}
        assert a.port == b.port  # one address per relay, the same port
        assert b.pid is not None and b.pid in turnserver_pids()
        assert pool.rotation() == [a.uri, b.uri]
        for member in (a, b):
            assert member.cgroup is not None and member.pid in member.cgroup.pids()
            quota = os.path.join(member.cgroup.path, "cpu.cfs_quota_us")
            if os.path.exists(quota):
                with open(quota, encoding="ascii") as handle:
                    assert int(handle.read()) == 50_000  # 0.5 of a 100 ms period
        assert pool.allocations(a.name) == 0
        pool.drain(b.name, now=10.0)
        assert pool.rotation() == [a.uri]
        assert b.alternate == a.address
        samples = {s.name: s for s in pool.samples(now=11.0)}
        assert samples[b.name].draining and samples[b.name].drain_started == 10.0
        assert samples[a.name].allocations == 0.0 and samples[a.name].ready
        assert samples[a.name].port_capacity == pool.max_port - pool.min_port + 1
        pool.undrain(b.name)
        assert pool.rotation() == [a.uri, b.uri] and b.alternate is None
        assert pool.remove(b.name) == 0
        assert not listening(b.host, b.port)
        assert b.pid not in turnserver_pids()
        with pytest.raises(PoolError, match="no relay named"):
            pool.remove(b.name)
        paths = [a.cgroup.path] if a.cgroup else []
        pids = {a.pid}
    assert not pids & turnserver_pids()
    assert not listening(a.host, a.port)
    assert not any(os.path.exists(p) for p in paths)
    assert pool.allocations_cut == 0 and pool.relays == {}


def test_pool_cleans_up_on_exception(cgroups_root: str) -> None:
    with pytest.raises(RuntimeError, match="boom"), LocalPool(cpus=0.25) as pool:
        member = pool.start_relay()
        path = member.cgroup.path if member.cgroup else ""
        pid = member.pid
        raise RuntimeError("boom")
    assert pid not in turnserver_pids()
    assert path and not os.path.exists(path)


def test_apply_decision_scales_up_and_removes(cgroups_root: str) -> None:
    def decision(**kw: object) -> Decision:
        base: dict[str, object] = dict(desired=1, active=1, ratios={}, recommendations={},
                                       limiting_signal=None, drain=[], undrain=[], remove=[],
                                       reason="test")
        base.update(kw)
        return Decision(**base)  # type: ignore[arg-type]

    with LocalPool(cpus=0.5) as pool:
        done = pool.apply(decision(desired=2, active=0))
        assert len(done["started"]) == 2 and len(pool.relays) == 2
        first, second = done["started"]
        done = pool.apply(decision(desired=1, active=2, drain=[second]), now=5.0)
        assert done["drained"] == [second] and pool.relays[second].draining
        done = pool.apply(decision(desired=1, active=1, remove=[second]))
        assert done["removed"] == [second] and list(pool.relays) == [first]
        assert pool.allocations_cut == 0


async def test_drained_relay_redirects_new_allocations(cgroups_root: str) -> None:
    with LocalPool(cpus=0.5) as pool:
        a, b = pool.start_relay(), pool.start_relay()
        creds = Credentials.ephemeral(pool.secret, unique_user("pool"), time.time())
        client = await TurnClient.connect((b.host, b.port), "udp", credentials=creds)
        try:
            await client.allocate()
            assert await asyncio.to_thread(pool.allocations, b.name) == 1
            await asyncio.to_thread(pool.drain, b.name)
            newcomer = await TurnClient.connect((b.host, b.port), "udp", credentials=creds)
            with pytest.raises(StunErrorResponse) as refused:
                await newcomer.allocate()
            newcomer.close()
            assert refused.value.code == 300
            # The existing allocation keeps working and can be released normally.
            assert await client.refresh(600) == 600
            await client.release()
            assert await asyncio.to_thread(pool.allocations, b.name) in (0, 1)
        finally:
            await client.aclose()
        deadline = time.monotonic() + 5
        while await asyncio.to_thread(pool.allocations, b.name) != 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert await asyncio.to_thread(pool.remove, b.name) == 0
        assert pool.rotation() == [a.uri]


def cpu_cap(path: str) -> float:
    """The group's CPU cap in cores, from cgroup v1 or v2 files."""
    v2 = os.path.join(path, "cpu.max")
    if os.path.exists(v2):
        with open(v2, encoding="ascii") as handle:
            quota, period = handle.read().split()
    else:
        with open(os.path.join(path, "cpu.cfs_quota_us"), encoding="ascii") as handle:
            quota = handle.read().strip()
        with open(os.path.join(path, "cpu.cfs_period_us"), encoding="ascii") as handle:
            period = handle.read().strip()
    return int(quota) / int(period)


async def test_a_relay_is_resized_in_place_under_a_live_allocation(cgroups_root: str) -> None:
    with LocalPool(cpus=0.25) as pool:
        relay = pool.start_relay()
        assert relay.cgroup is not None and relay.pid is not None
        pid = relay.pid
        assert cpu_cap(relay.cgroup.path) == pytest.approx(0.25)
        creds = Credentials.ephemeral(pool.secret, unique_user("resize"), time.time())
        client = await TurnClient.connect((relay.host, relay.port), "udp", credentials=creds)
        try:
            await client.allocate()
            def decision(resize: dict[str, float]) -> Decision:
                return Decision(desired=1, active=1, ratios={}, recommendations={},
                                limiting_signal=None, drain=[], undrain=[], remove=[],
                                reason="test", resize=resize)

            done = await asyncio.to_thread(pool.apply, decision({relay.name: 1.5}))
            assert done["resized"] == [relay.name] and done["started"] == []
            assert cpu_cap(relay.cgroup.path) == pytest.approx(0.375)
            assert relay.pid == pid and pid in relay.cgroup.pids()  # the same process
            samples = await asyncio.to_thread(pool.samples, 1.0)
            assert samples[0].cpu_factor == 1.5 and samples[0].allocations == 1.0
            assert await client.refresh(600) == 600  # the allocation carried on
            await asyncio.to_thread(pool.resize, relay.name, 0.25)
            assert cpu_cap(relay.cgroup.path) == pytest.approx(0.0625)
            assert await client.refresh(600) == 600
            with pytest.raises(PoolError, match="must be positive"):
                pool.resize(relay.name, 0.0)
            assert any(f"resized {relay.name} from 150% to 25%" in e for e in pool.events)
        finally:
            await client.aclose()
    with LocalPool(cpus=None) as uncapped:
        member = uncapped.start_relay()
        with pytest.raises(PoolError, match="needs a CPU-capped pool"):
            uncapped.resize(member.name, 1.5)


async def test_controller_finishes_a_drain_once_its_calls_end(cgroups_root: str) -> None:
    from turnstorm.loadgen.rotation import Rotation
    from turnstorm.localmode.control import Controller
    from turnstorm.policy import Autoscaler, StormOptions
    from turnstorm.spec import ScalingBehavior, ScalingPolicy

    policy = ScalingPolicy(enabled=True, tolerance=0.1, targets={"allocationsPerRelay": 10},
                           scale_up=ScalingBehavior(0, 100, 4, 15),
                           scale_down=ScalingBehavior(0, 100, 0, 15),
                           drain_deadline_seconds=900)
    with LocalPool(cpus=0.5) as pool:
        a, b = pool.start_relay(), pool.start_relay()
        creds = Credentials.ephemeral(pool.secret, unique_user("finish"), time.time())
        client = await TurnClient.connect((b.host, b.port), "udp", credentials=creds)
        controller = Controller(pool, Autoscaler(policy, 1, 2, StormOptions(enabled=False)),
                                Rotation(), interval=0.2, time_scale=1.0, apply=True)
        try:
            await client.allocate()
            pool.drain(b.name, now=time.monotonic())
            controller.start()
            # a call is still up on the draining relay: its drain cannot finish
            assert not await asyncio.to_thread(controller.finish_drains, 1.0)
            assert pool.relays[b.name].draining
            await client.release()
            # the call has ended: the loop removes the relay
            assert await asyncio.to_thread(controller.finish_drains, 5.0)
        finally:
            controller.stop()
            await client.aclose()
        assert controller.error is None
        assert list(pool.relays) == [a.name] and controller.removed_relays == 1
        assert pool.allocations_cut == 0


def test_controller_publishes_pack_placement_and_saturated_relays(
        cgroups_root: str, tmp_path: object) -> None:
    from pathlib import Path

    from turnstorm.loadgen.rotation import Rotation
    from turnstorm.localmode.control import Controller
    from turnstorm.policy import Autoscaler, StormOptions
    from turnstorm.spec import ScalingBehavior, ScalingPolicy

    path = str(Path(str(tmp_path)) / "rotation.json")

    def controller(pool: LocalPool, targets: dict[str, float]) -> Controller:
        policy = ScalingPolicy(enabled=True, tolerance=0.1, targets=targets,
                               scale_up=ScalingBehavior(0, 100, 4, 15),
                               scale_down=ScalingBehavior(300, 100, 0, 15),
                               drain_deadline_seconds=900, placement="pack")
        return Controller(pool, Autoscaler(policy, 2, 2, StormOptions(enabled=False)),
                          Rotation(path), interval=0.2, time_scale=1.0, apply=True,
                          fill=policy.pack_fill, processes=2)

    with LocalPool(cpus=0.5) as pool:
        a, b = pool.start_relay(), pool.start_relay()
        # A CPU target of 0 makes every relay saturated: both are published as full.
        saturating = controller(pool, {"allocationsPerRelay": 4, "cpuUtilization": 0})
        saturating.publish()
        saturating.step()
        time.sleep(0.3)
        saturating.step()  # CPU is a rate: known from the second sample on
        reader = Rotation(path)
        assert [u.host for u in reader.current()] == [a.host, b.host]
        assert reader.fill == 2  # 4 per relay over 2 Locust processes
        assert reader.full == {a.uri, b.uri}
        # Allocations alone: nothing saturated, the oldest relay is packed first.
        packing = controller(pool, {"allocationsPerRelay": 4})
        packing._full = saturating._full
        packing.step()
        time.sleep(0.3)
        packing.step()
        os.utime(path, ns=(1, 1))
        assert len(reader.current()) == 2 and reader.full == frozenset()
        fallback = reader.current()[-1]
        assert [reader.claim(fallback).host for _ in range(3)] == [a.host, a.host, b.host]

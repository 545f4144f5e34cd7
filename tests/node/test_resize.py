"""In-place resize on a real kubelet: with spec.scaling.vertical, an overloaded relay
gets more CPU without a restart (its container's CFS quota changes, status says
applied), and comes back to its CPU once its calls end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.node.calls import Calls
from turnstorm.testing.cluster import Pool, create_pool, wait_for
from turnstorm.testing.node import CGROUP_FS, CGROUP_ROOT, Node

CPU_PERIOD_US = 100_000


def quota_us(pod: dict[str, Any], container: str = "coturn") -> int:
    """The container's cpu.cfs_quota_us as the kernel has it."""
    status = next(c for c in pod["status"]["containerStatuses"] if c["name"] == container)
    container_id = status["containerID"].split("://", 1)[1]
    (path,) = [p for p in (CGROUP_FS / "cpu" / CGROUP_ROOT).rglob(container_id) if p.is_dir()]
    return int((path / "cpu.cfs_quota_us").read_text())


def relay(node: Node, pool: Pool) -> dict[str, Any]:
    (pod,) = pool.pods(node)
    return pod


def resized(node: Node, pool: Pool) -> list[dict[str, Any]]:
    status = pool.get(node).get("status", {})
    result: list[dict[str, Any]] = status.get("resizedRelays", [])
    return result


def test_an_overloaded_relay_is_resized_in_place_and_back(
        node: Node, operator: str, images: dict[str, str], namespace: str,
        tmp_path: Path, echo_peer: str) -> None:
    pool = create_pool(node, namespace, images["relay"], tmp_path,
                       replicas={"min": 1, "max": 1, "target": 1},
                       scaling={"targets": {"allocationsPerRelay": 4},
                                "vertical": {"enabled": True, "maxPercent": 150}})
    (pod,) = wait_for(lambda: pool.running(node), 120, what="a relay pod Ready")
    uid, ip = pod["metadata"]["uid"], pod["status"]["podIP"]
    assert quota_us(pod) == 25_000  # 250m
    calls = Calls(f"{ip}:3478", pool.secret_file, echo_peer, 6, refresh_every=5).start()
    try:
        # 6 allocations on a relay whose target is 4: 150 %, applied by the kubelet
        wait_for(lambda: resized(node, pool) == [{"name": pod["metadata"]["name"],
                                                  "cpuPercent": 150, "applied": True}],
                 60, what="status.resizedRelays applied at 150 %")
        grown = relay(node, pool)
        assert grown["metadata"]["uid"] == uid
        assert quota_us(grown) == 37_500
        assert all(c["restartCount"] == 0 for c in grown["status"]["containerStatuses"])
    finally:
        records = calls.stop()
    assert all(r.released and not r.cut for r in records), records
    wait_for(lambda: resized(node, pool) == [], 60, what="the relay back at 100 %")
    back = relay(node, pool)
    assert back["metadata"]["uid"] == uid
    wait_for(lambda: quota_us(relay(node, pool)) == 25_000, 30, what="the quota back at 250m")
    assert all(c["restartCount"] == 0 for c in back["status"]["containerStatuses"])
    events = json.loads(node.kubectl("-n", namespace, "get", "events", "-o", "json").stdout)
    assert [e for e in events["items"] if e["reason"] == "Resize"], "Resize events"

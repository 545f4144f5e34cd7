"""The relay's preStop drain wait on a real kubelet: a relay pod deleted while it carries
calls keeps serving them (it has left its Services, its calls go on at its pod IP), and
the kubelet removes it once they end, well before the drain deadline."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.node.calls import Calls
from turnstorm.testing.cluster import create_pool, wait_for
from turnstorm.testing.node import Node


def test_a_deleted_relay_waits_for_its_calls(node: Node, operator: str,
                                             images: dict[str, str], namespace: str,
                                             tmp_path: Path, echo_peer: str) -> None:
    pool = create_pool(node, namespace, images["relay"], tmp_path,
                       scaling={"enabled": False, "drainDeadlineSeconds": 120})
    (pod,) = wait_for(lambda: pool.running(node), 120, what="a relay pod Ready")
    name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
    calls = Calls(f"{ip}:3478", pool.secret_file, echo_peer, 4).start()
    try:
        time.sleep(1.0)
        deleted = time.monotonic()
        node.kubectl("-n", namespace, "delete", "pod", name, "--wait=false")
        calls.mark("deleted")
        time.sleep(8.0)  # four rounds of the hook's 2 s poll
        state = json.loads(node.kubectl("-n", namespace, "get", "pod", name, "-o",
                                        "json").stdout)
        assert state["metadata"].get("deletionTimestamp"), "the pod is being deleted"
        coturn = next(c for c in state["status"]["containerStatuses"] if c["name"] == "coturn")
        assert "running" in coturn["state"], coturn["state"]  # the hook still waits
        for record in calls.records:  # still relayed: echoes and refreshes go on
            assert record.echoed_after.get("deleted", 0) > 100, record
            assert record.refreshes and all(r == 0 for r in record.refreshes), record
        calls.end([r.index for r in calls.records])
        ended = time.monotonic()

        def gone() -> bool:
            return node.kubectl("-n", namespace, "get", "pod", name,
                                check=False).returncode != 0

        wait_for(gone, 30, what="the kubelet removing the relay after its calls ended")
        removed = time.monotonic()
    finally:
        records = calls.stop()
    assert all(r.released and not r.cut for r in records), records
    assert ended - deleted >= 8.0
    assert removed - ended < 15.0, f"removed {removed - ended:.1f} s after the calls ended"

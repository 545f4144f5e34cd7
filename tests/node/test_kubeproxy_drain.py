"""kube-proxy and drains, measured: calls running through the client Service
(ClusterIP and NodePort) and at pod IPs, one relay taken out of rotation exactly as the
operator does it (its rotation label, so it leaves the client Service), and what then
happens to its calls: refreshes answered 437, media lost, calls that end normally."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.node.calls import CallRecord, Calls
from turnstorm.operator.render import ROTATION_DRAINING, ROTATION_LABEL
from turnstorm.testing.cluster import Pool, create_pool, wait_for
from turnstorm.testing.node import Node

CALLS = 16


@pytest.fixture
def two_relays(node: Node, operator: str, images: dict[str, str], namespace: str,
               tmp_path: Path) -> Pool:
    pool = create_pool(node, namespace, images["relay"], tmp_path,
                       replicas={"min": 2, "max": 2, "target": 2},
                       scaling={"enabled": False})
    wait_for(lambda: len(pool.running(node)) == 2, 120, what="two relay pods Ready")
    return pool


def _summary(records: list[CallRecord], mark: str) -> dict[str, int]:
    return {
        "calls": len(records),
        "refreshes 437": sum(r.refreshes.count(437) for r in records),
        "refreshes failed": sum(1 for r in records for x in r.refreshes if x != 0),
        "frames lost after the drain": sum(max(0, r.lost_after(mark)) for r in records),
        "frames sent after the drain": sum(r.sent_after.get(mark, 0) for r in records),
        "ended normally": sum(1 for r in records if not r.cut),
    }


def measure(node: Node, pool: Pool, peer: str, server: str) -> dict[str, dict[str, int]]:
    calls = Calls(server, pool.secret_file, peer, CALLS).start()
    try:
        time.sleep(1.0)
        by_ip = {p["status"]["podIP"]: p["metadata"]["name"] for p in pool.running(node)}
        carried = {ip: len(calls.on_relay(ip)) for ip in by_ip}
        drained_ip = max(carried, key=lambda ip: carried[ip])
        assert carried[drained_ip] > 0, carried
        calls.mark("drain")
        node.kubectl("-n", pool.namespace, "label", "pod", by_ip[drained_ip],
                     f"{ROTATION_LABEL}={ROTATION_DRAINING}", "--overwrite")
        # kube-proxy syncs within a second; three refresh periods and 200 frames per call
        time.sleep(8.0)
    finally:
        records = calls.stop()
    drained = [r for r in records if r.relay_ip == drained_ip]
    staying = [r for r in records if r.relay_ip != drained_ip]
    node.kubectl("-n", pool.namespace, "label", "pod", by_ip[drained_ip],
                 f"{ROTATION_LABEL}=active", "--overwrite")
    return {"drained relay": _summary(drained, "drain"),
            "other relay": _summary(staying, "drain")}


def test_drain_through_each_exposure(node: Node, two_relays: Pool, echo_peer: str,
                                     record_property: object) -> None:
    pool = two_relays
    results = {}
    for label, server in pool.addresses(node).items():
        results[label] = measure(node, pool, echo_peer, server)
        wait_for(lambda: len(pool.running(node)) == 2, 30, what="both relays back")
        time.sleep(2.0)
    print(json.dumps(results, indent=1))
    for label, figures in results.items():
        drained = figures["drained relay"]
        assert drained["refreshes failed"] == 0, (label, figures)
        assert drained["frames lost after the drain"] <= 2 * drained["calls"], (label, figures)
        assert drained["ended normally"] == drained["calls"], (label, figures)

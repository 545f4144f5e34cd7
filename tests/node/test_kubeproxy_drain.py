"""kube-proxy and drains, measured: calls running through the client Service (ClusterIP
and NodePort), one relay taken out of rotation, and what then happens to its calls:
refreshes answered 437, media lost, calls that end normally. Two ways out of rotation:

* relabelled out of the client Service (the operator's drain for hostNetwork, where no
  Service carries the calls): kube-proxy deletes the conntrack entries of flows whose
  endpoint no longer serves, so behind a Service every call of that relay is cut;
* deleted (the operator's drain behind a Service): the pod is a terminating endpoint
  that still serves while its preStop hook waits, kube-proxy keeps its flows and gives
  it no new ones, and every call ends normally."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.node.calls import CallRecord, Calls
from turnstorm.operator.render import ROTATION_DRAINING, ROTATION_LABEL
from turnstorm.testing.cluster import Pool, create_pool, wait_for, wait_serving
from turnstorm.testing.node import Node

CALLS = 16


@pytest.fixture
def two_relays(node: Node, operator: str, images: dict[str, str], namespace: str,
               tmp_path: Path) -> Pool:
    pool = create_pool(node, namespace, images["relay"], tmp_path,
                       replicas={"min": 2, "max": 2, "target": 2},
                       scaling={"enabled": False})
    wait_for(lambda: len(pool.running(node)) == 2, 120, what="two relay pods Ready")
    wait_serving(node, pool)
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


def measure(node: Node, pool: Pool, peer: str, server: str, how: str
            ) -> dict[str, dict[str, int]]:
    calls = Calls(server, pool.secret_file, peer, CALLS).start()
    try:
        time.sleep(1.0)
        by_ip = {p["status"]["podIP"]: p["metadata"]["name"] for p in pool.running(node)}
        carried = {ip: len(calls.on_relay(ip)) for ip in by_ip}
        drained_ip = max(carried, key=lambda ip: carried[ip])
        assert carried[drained_ip] > 0, carried
        calls.mark("drain")
        if how == "relabelled":
            node.kubectl("-n", pool.namespace, "label", "pod", by_ip[drained_ip],
                         f"{ROTATION_LABEL}={ROTATION_DRAINING}", "--overwrite")
        else:
            node.kubectl("-n", pool.namespace, "delete", "pod", by_ip[drained_ip],
                         "--wait=false")
        # kube-proxy syncs within a second; four refresh periods and 160 frames per call
        time.sleep(8.0)
    finally:
        records = calls.stop()
    drained = [r for r in records if r.relay_ip == drained_ip]
    staying = [r for r in records if r.relay_ip != drained_ip]
    if how == "relabelled":
        node.kubectl("-n", pool.namespace, "label", "pod", by_ip[drained_ip],
                     f"{ROTATION_LABEL}=active", "--overwrite")
    return {"drained relay": _summary(drained, "drain"),
            "other relay": _summary(staying, "drain")}


def test_drain_through_each_exposure(node: Node, two_relays: Pool, echo_peer: str) -> None:
    pool = two_relays
    results: dict[str, dict[str, dict[str, int]]] = {}
    # deleted first: the relabelled rounds leave the relays allocations they can no longer
    # release (their Refresh reaches the other relay: 437), which a preStop would wait for
    for how in ("deleted", "relabelled"):
        for label, server in pool.addresses(node).items():
            results[f"{label}, {how}"] = measure(node, pool, echo_peer, server, how)
            print(f"{label}, {how}:", json.dumps(results[f"{label}, {how}"]), flush=True)
            wait_for(lambda: len(pool.running(node)) == 2 and len(pool.pods(node)) == 2,
                     90, what=lambda: "two relays again (the deleted one replaced): " + str(
                         [(p["metadata"]["name"], p["status"].get("phase"),
                           p["metadata"].get("deletionTimestamp")) for p in pool.pods(node)]))
    print(json.dumps(results, indent=1))
    for name, figures in results.items():
        drained, other = figures["drained relay"], figures["other relay"]
        assert other["refreshes failed"] == 0 and other["ended normally"] == other["calls"], \
            (name, figures)
        if name.endswith("relabelled"):
            # what the README warns of: kube-proxy flushed the drained relay's flows
            assert drained["refreshes 437"] > 0, (name, figures)
            assert drained["ended normally"] == 0, (name, figures)
        else:
            assert drained["refreshes failed"] == 0, (name, figures)
            assert drained["frames lost after the drain"] <= drained["calls"], (name, figures)
            assert drained["ended normally"] == drained["calls"], (name, figures)

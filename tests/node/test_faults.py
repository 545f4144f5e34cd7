"""Faults on a real node: the operator killed in the middle of a drain converges
afterwards with no relay removed early and no call cut; a relay pod killed under calls
is replaced, the storm's figures show the calls it carried failing and re-allocating,
and nothing else is lost."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.node.calls import Calls
from turnstorm.testing import cluster
from turnstorm.testing.node import Node


def test_operator_killed_mid_drain(node: Node, operator: str, images: dict[str, str],
                                   namespace: str, tmp_path: Path, echo_peer: str) -> None:
    pool = cluster.create_pool(
        node, namespace, images["relay"], tmp_path, replicas={"min": 1, "max": 2, "target": 2},
        scaling={"targets": {"allocationsPerRelay": 4},
                 "scaleDown": {"stabilizationWindowSeconds": 4, "periodSeconds": 2},
                 "drainDeadlineSeconds": 120})
    pods = cluster.wait_for(lambda: len(p := pool.running(node)) == 2 and p, 120,
                            what="two relays Ready")
    # one call on each relay, at its pod IP: 2 calls, target 4, one relay is enough
    calls = [Calls(f"{p['status']['podIP']}:3478", pool.secret_file, echo_peer, 1,
                   refresh_every=3).start() for p in pods]
    try:
        draining = cluster.wait_for(
            lambda: [d["name"] for d in pool.get(node).get("status", {})
                     .get("drainingRelays", []) if d.get("deleted")], 60,
            what="a relay draining with its call")
        (name,) = draining
        node.kubectl("-n", cluster.OPERATOR_NAMESPACE, "delete", "pod", operator,
                     "--grace-period=0", "--force")
        for call in calls:
            call.mark("killed")
        new_operator = cluster.operator_pod(node)
        assert new_operator != operator
        time.sleep(8)  # the new operator evaluates the pool a few times
        pod = json.loads(node.kubectl("-n", namespace, "get", "pod", name, "-o",
                                      "json").stdout)
        assert pod["metadata"].get("deletionTimestamp")  # still draining, not removed
        assert pool.deployment(node)["spec"]["replicas"] == 1  # nothing started for it
        for call in calls:
            (record,) = call.records
            assert record.echoed_after.get("killed", 0) > 100, record
            assert record.refreshes and all(r == 0 for r in record.refreshes), record
    finally:
        for call in calls:
            call.end([0])
        records = [r for call in calls for r in call.stop()]
    cluster.wait_for(lambda: len(pool.pods(node)) == 1, 60,
                     what="the drained relay removed once its call ended")
    assert all(r.released and not r.cut for r in records), records


def test_relay_killed_under_calls(node: Node, operator: str, images: dict[str, str],
                                  namespace: str, tmp_path: Path, echo_peer: str) -> None:
    pool = cluster.create_pool(
        node, namespace, images["relay"], tmp_path, replicas={"min": 2, "max": 2, "target": 2},
        scaling={"enabled": False})
    victim, survivor = cluster.wait_for(lambda: len(p := pool.running(node)) == 2 and p, 120,
                                        what="two relays Ready")
    # calls pinned on the relay that stays: nothing of theirs may be lost
    pinned = Calls(f"{survivor['status']['podIP']}:3478", pool.secret_file, echo_peer, 3,
                   refresh_every=3).start()
    pinned.mark("start")
    storm = cluster.start_storm(cluster.wait_serving(node, pool)["ClusterIP"], pool, echo_peer,
                                tmp_path / "storm", "--users", "8", "--spawn-rate", "8",
                                "--duration", "30", "--session", "uniform:6-10")
    try:
        cluster.wait_for(lambda: (cluster.relay_allocations(victim) or 0) > 0, 20,
                         what="the victim relay carrying storm calls")
        carried = cluster.relay_allocations(victim) or 0
        node.kubectl("-n", namespace, "delete", "pod", victim["metadata"]["name"],
                     "--grace-period=0", "--force")
        report = storm.wait(120)
    finally:
        records = pinned.stop()
    cluster.wait_for(lambda: len(pool.running(node)) == 2, 60, what="the relay replaced")
    assert carried > 0
    failures = sum(e["failures"] for e in report["transactions"].values())
    assert failures > 0, report["transactions"]  # the victim's calls failed ...
    assert report["allocations"]["ok"] > 8  # ... and their users allocated again
    assert all(r.released and not r.cut for r in records), records  # nothing else lost
    assert all(r.lost_after("start") <= 2 for r in records), records  # in flight at the end

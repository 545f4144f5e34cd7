"""The operator on live exporter signals: a bounded storm from the host through the
pool's ClusterIP scales the Deployment out, the new relay pods take calls, and when the
storm ends the operator drains: the relays it removes are deleted and wait in their
preStop hook for the calls they still carry, the kubelet removes them after those end,
and the generator's side counts 0 allocations cut."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.node.calls import Calls
from turnstorm.testing import cluster
from turnstorm.testing.node import Node


def test_storm_scales_out_then_drains_without_cutting_a_call(
        node: Node, operator: str, images: dict[str, str], namespace: str,
        tmp_path: Path, echo_peer: str) -> None:
    pool = cluster.create_pool(
        node, namespace, images["relay"], tmp_path, replicas={"min": 1, "max": 3, "target": 1},
        scaling={"targets": {"allocationsPerRelay": 4},
                 "scaleDown": {"stabilizationWindowSeconds": 4, "periodSeconds": 2},
                 "scaleUp": {"periodSeconds": 2}, "drainDeadlineSeconds": 60})
    (first,) = cluster.wait_for(lambda: pool.running(node), 120, what="a relay pod Ready")
    target = cluster.wait_serving(node, pool)["ClusterIP"]
    storm = cluster.start_storm(target, pool, echo_peer, tmp_path / "storm", "--users", "10",
                                "--spawn-rate", "10", "--duration", "40",
                                "--session", "uniform:4-8")

    def added_relays_carry_calls() -> list[str]:
        return [p["metadata"]["name"] for p in pool.running(node)
                if p["metadata"]["name"] != first["metadata"]["name"]
                and (cluster.relay_allocations(p) or 0) > 0]

    carrying = cluster.wait_for(added_relays_carry_calls, 40,
                                what="a relay the operator added carrying calls")
    assert carrying
    assert pool.deployment(node)["spec"]["replicas"] == 3  # 10 calls / 4 per relay
    # calls that outlive the storm: the relays drained after it still carry these
    late = Calls(target, pool.secret_file, echo_peer, 4, refresh_every=3).start()
    try:
        report = storm.wait(180)
        cluster.wait_for(lambda: pool.deployment(node)["spec"]["replicas"] < 3, 60,
                         what="the operator scaling in after the storm")
        draining = cluster.wait_for(
            lambda: [d for d in pool.get(node).get("status", {}).get("drainingRelays", [])
                     if d.get("deleted") and d["allocations"] > 0], 30,
            what="a deleted relay still carrying calls")
        waiting = draining[0]["name"]
        time.sleep(6)  # three rounds of the hook's poll: still there, still serving
        pod = json.loads(node.kubectl("-n", namespace, "get", "pod", waiting, "-o",
                                      "json").stdout)
        assert pod["metadata"].get("deletionTimestamp")
        late.mark("draining")
        time.sleep(3)
        on_it = [r for r in late.records if r.relay_ip == pod["status"]["podIP"]]
        assert on_it and all(r.echoed_after.get("draining", 0) > 30 for r in on_it), on_it
    finally:
        late.end([r.index for r in late.records])
        records = late.stop()
    # a storm user stopped in the middle of an Allocate leaves an allocation it never
    # releases (as a real client would): its relay then drains until the deadline (60 s)
    cluster.wait_for(lambda: len(pool.pods(node)) == 1
                     and not pool.get(node).get("status", {}).get("drainingRelays"), 120,
                     what=lambda: "one relay left once the calls ended: "
                     f"{pool.get(node).get('status', {}).get('drainingRelays')}")
    assert all(r.released and not r.cut for r in records), records
    assert cluster.cut_calls(report) == {}, report["transactions"]
    assert report["allocations"]["ok"] >= 10
    events = {e["reason"] for e in json.loads(node.kubectl(
        "-n", namespace, "get", "events", "-o", "json").stdout)["items"]}
    assert {"ScaleUp", "Drain"} <= events, events

"""A TurnPool on a real node: relay pods Running with their exporter sidecars, and a
STUN/TURN probe from the host through the client Service (ClusterIP and NodePort) and
at a pod IP; a denied peer gets 403 on the wire."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.helpers import FORBIDDEN
from turnstorm.testing.cluster import Pool, create_pool, probe, wait_for, wait_serving
from turnstorm.testing.node import Node


@pytest.fixture
def pool(node: Node, operator: str, images: dict[str, str], namespace: str,
         tmp_path: Path) -> Pool:
    pool = create_pool(node, namespace, images["relay"], tmp_path)
    wait_for(lambda: pool.running(node), 120, what="a relay pod Running and Ready")
    wait_serving(node, pool)
    return pool


def test_relay_pods_run_with_their_exporter(node: Node, pool: Pool,
                                            images: dict[str, str]) -> None:
    (pod,) = pool.running(node)
    containers = {c["name"]: c for c in pod["status"]["containerStatuses"]}
    assert set(containers) == {"coturn", "exporter"}
    assert all(c["ready"] and c["restartCount"] == 0 for c in containers.values())
    assert containers["coturn"]["image"].endswith(images["relay"])
    assert containers["exporter"]["image"].endswith(images["turnstorm"])
    # the exporter reads the relay's allocations through coturn's CLI: the operator
    # publishes them in the pool's status
    wait_for(lambda: pool.get(node).get("status", {}).get("saturation"), 60,
             what="the pool's status.saturation from the exporter's signals")


def _addresses(node: Node, pool: Pool) -> dict[str, str]:
    (pod,) = pool.running(node)
    return {**pool.addresses(node), "pod IP": f"{pod['status']['podIP']}:3478"}


def test_probe_through_every_exposure(node: Node, pool: Pool, echo_peer: str) -> None:
    results = {}
    for label, address in _addresses(node, pool).items():
        done = probe(f"turn:{address}?transport=udp", pool.secret_file, echo_peer)
        assert done.returncode == 0, f"{label} {address}: {done.stderr}"
        results[label] = json.loads(done.stdout)
    (pod,) = pool.running(node)
    for label, result in results.items():
        # the relay allocates on its pod IP whichever way the client came in
        assert result["relayed_address"].startswith(f"{pod['status']['podIP']}:"), label
        assert result["relay_rtt_ms"] > 0 and result["binding_rtt_ms"] > 0, label


def test_denied_peer_gets_403_on_the_wire(node: Node, pool: Pool) -> None:
    address = _addresses(node, pool)["ClusterIP"]
    # loopback is always denied: the relay must refuse its own 127.0.0.1
    done = probe(f"turn:{address}?transport=udp", pool.secret_file, "127.0.0.1:9")
    assert done.returncode == 1
    assert done.stderr.strip() == f"turnstorm probe: {FORBIDDEN.format(method='ChannelBind')}"

"""Restarting the operator converges without duplicates, and a restart redoes nothing."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.k8s.conftest import wait_for
from tests.k8s.test_operator import (
    OWNED,
    create_secret,
    get,
    pool_yaml,
    running_operator,
    wait_ready_objects,
)
from turnstorm.testing.controlplane import ControlPlane

pytestmark = pytest.mark.k8s


def test_restart_mid_reconcile_converges_and_then_redoes_nothing(
        control_plane: ControlPlane, namespace: str) -> None:
    create_secret(control_plane, "eta-auth", namespace)
    with running_operator():
        control_plane.kubectl("apply", "-f", "-", input_text=pool_yaml("eta", namespace))
        # Stop as soon as the first owned object appears: the reconcile is in flight.
        wait_for(lambda: get(control_plane, "configmap", "eta-config", namespace),
                 interval=0.05, what="first owned object")
    with running_operator():
        objects = wait_ready_objects(control_plane, "eta", namespace)
        wait_for(lambda: (get(control_plane, "turnpool", "eta", namespace) or {})
                 .get("status", {}).get("observedGeneration"), what="status")
    versions = {key: obj["metadata"]["resourceVersion"] for key, obj in objects.items()}
    with running_operator():
        time.sleep(8)  # resume handlers and one timer tick run in this time
    after = {}
    for kind, pattern in OWNED:
        name = pattern.format(n="eta")
        obj = get(control_plane, kind, name, namespace)
        assert obj is not None
        after[f"{kind}/{name}"] = obj["metadata"]["resourceVersion"]
    assert after == versions
    for kind in ("deployments", "configmaps", "services", "poddisruptionbudgets"):
        names = control_plane.kubectl("get", kind, "-n", namespace, "-o",
                                      "name").stdout.split()
        assert len(names) == len(set(names))
    assert control_plane.kubectl("get", "deployments", "-n", namespace, "-o",
                                 "name").stdout.split() == ["deployment.apps/eta"]


def test_a_reconcile_pass_reads_the_deployment_once(
        control_plane: ControlPlane, kube: Any, namespace: str) -> None:
    """One pass reads each owned object once before applying it; the status comes from
    the apply's answer (the object as stored), not from another read."""
    from turnstorm.operator.kube import Kube
    from turnstorm.operator.reconcile import reconcile_pool

    reads: list[tuple[str, str]] = []

    class Counting(Kube):
        def get(self, api_version: str, kind: str, namespace: str,
                name: str) -> dict[str, Any] | None:
            reads.append((kind, name))
            return super().get(api_version, kind, namespace, name)

    counting = Counting(kube.api_client)
    create_secret(control_plane, "iota-auth", namespace)
    control_plane.kubectl("apply", "-f", "-", input_text=pool_yaml(
        "iota", namespace, scaling={"enabled": True}))
    body = get(control_plane, "turnpool", "iota", namespace)
    assert body is not None
    for attempt in range(2):  # creating, then with everything in place
        reads.clear()
        outcome = reconcile_pool(counting, body, "turnstorm:test")
        assert reads.count(("Deployment", "iota")) == 1, (attempt, reads)
        assert len(reads) == len(set(reads)), reads
        deployment = get(control_plane, "deployment", "iota", namespace)
        assert deployment is not None
        assert outcome.status["replicas"] == int(
            (deployment.get("status") or {}).get("replicas") or 0)
        assert outcome.status["desiredReplicas"] == 2
    assert outcome.changed == [], "the second pass applied nothing new"

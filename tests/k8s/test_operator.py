"""The operator against a real kube-apiserver: CRDs, owned objects, status, scale, CEL."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.k8s.conftest import wait_for
from tests.unit.test_spec import CEL_CASES
from turnstorm.testing.controlplane import ControlPlane

pytestmark = pytest.mark.k8s

OWNED = [("configmap", "{n}-config"), ("service", "{n}"), ("service", "{n}-metrics"),
         ("deployment", "{n}"), ("poddisruptionbudget", "{n}"), ("secret", "{n}-cli")]


_registry: list[Any] = []


def handlers_registry() -> Any:
    """The registry the handlers were registered into on their (single) import: each
    `kopf run` makes a fresh default registry, and a cached module does not re-register."""
    if not _registry:
        import kopf

        from turnstorm.operator import handlers  # noqa: F401 - registers on import

        _registry.append(kopf.get_default_registry())
    return _registry[0]


@contextlib.contextmanager
def running_operator() -> Iterator[Any]:
    from kopf.testing import KopfRunner

    with KopfRunner(["run", "--all-namespaces", "--standalone", "--verbose"],
                    registry=handlers_registry(), timeout=60) as runner:
        yield runner
    assert runner.exit_code == 0, runner.output
    assert runner.exception is None


@pytest.fixture(scope="module")
def operator(control_plane: ControlPlane) -> Iterator[Any]:
    with running_operator() as runner:
        yield runner


def pool_yaml(name: str, namespace: str, **spec: Any) -> str:
    body: dict[str, Any] = {"realm": "test.example", "authSecretRef": {"name": f"{name}-auth"},
                            "replicas": {"min": 1, "max": 6, "target": 2}}
    body.update(spec)
    return yaml.safe_dump({"apiVersion": "turnstorm.io/v1alpha1", "kind": "TurnPool",
                           "metadata": {"name": name, "namespace": namespace}, "spec": body})


def get(plane: ControlPlane, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    result = plane.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


def create_secret(plane: ControlPlane, name: str, namespace: str) -> None:
    plane.kubectl("create", "secret", "generic", name, "-n", namespace,
                  "--from-literal=secret=not-a-real-secret-but-long-enough")


def wait_ready_objects(plane: ControlPlane, name: str, namespace: str) -> dict[str, Any]:
    found = {}
    for kind, pattern in OWNED:
        obj_name = pattern.format(n=name)
        found[f"{kind}/{obj_name}"] = wait_for(
            lambda k=kind, o=obj_name: get(plane, k, o, namespace), timeout=30,
            what=f"{kind}/{obj_name}")
    return found


def test_crds_are_installed_with_kubectl(control_plane: ControlPlane) -> None:
    out = control_plane.kubectl("get", "crd", "-o", "name").stdout
    assert "customresourcedefinition.apiextensions.k8s.io/turnpools.turnstorm.io" in out
    assert "customresourcedefinition.apiextensions.k8s.io/loadruns.turnstorm.io" in out


def test_pool_yields_owned_objects_and_status(control_plane: ControlPlane, operator: Any,
                                              namespace: str) -> None:
    create_secret(control_plane, "alpha-auth", namespace)
    control_plane.kubectl("apply", "-f", "-", input_text=pool_yaml("alpha", namespace))
    objects = wait_ready_objects(control_plane, "alpha", namespace)
    pool = get(control_plane, "turnpool", "alpha", namespace)
    assert pool is not None
    for key, obj in objects.items():
        refs = obj["metadata"].get("ownerReferences", [])
        assert [(r["kind"], r["name"], r["uid"], r.get("controller")) for r in refs] == [
            ("TurnPool", "alpha", pool["metadata"]["uid"], True)], key
    deployment = objects["deployment/alpha"]
    assert deployment["spec"]["replicas"] == 2
    conf = objects["configmap/alpha-config"]["data"]["turnserver.conf"]
    assert "use-auth-secret" in conf and "static-auth-secret" not in conf
    assert "not-a-real-secret" not in json.dumps(objects["configmap/alpha-config"])

    status = wait_for(lambda: (get(control_plane, "turnpool", "alpha", namespace) or {})
                      .get("status", {}).get("conditions"), what="status conditions")
    pool = get(control_plane, "turnpool", "alpha", namespace)
    assert pool is not None
    assert pool["status"]["observedGeneration"] == pool["metadata"]["generation"]
    assert pool["status"]["selector"] == "turnstorm.io/pool=alpha"
    ready = next(c for c in status if c["type"] == "Ready")
    # No kubelet runs the relays here, so none becomes ready.
    assert (ready["status"], ready["reason"]) == ("False", "RelaysStarting")
    # kopf posts events in the background, after the handler returns.
    events = wait_for(lambda: (out := control_plane.kubectl(
        "get", "events", "-n", namespace, "-o", "json").stdout) and "Applied" in {
        e["reason"] for e in json.loads(out)["items"]
        if e["involvedObject"]["name"] == "alpha"} and out, what="the Applied event")
    assert "not-a-real-secret" not in events


def test_spec_change_updates_owned_objects(control_plane: ControlPlane, operator: Any,
                                           namespace: str) -> None:
    create_secret(control_plane, "beta-auth", namespace)
    control_plane.kubectl("apply", "-f", "-", input_text=pool_yaml("beta", namespace))
    objects = wait_ready_objects(control_plane, "beta", namespace)
    old_hash = objects["deployment/beta"]["spec"]["template"]["metadata"]["annotations"][
        "turnstorm.io/config-hash"]
    control_plane.kubectl("apply", "-f", "-", input_text=pool_yaml(
        "beta", namespace, security={"userQuota": 3, "totalQuota": 50}))

    def updated() -> bool:
        cm = get(control_plane, "configmap", "beta-config", namespace) or {}
        return "user-quota=3" in cm.get("data", {}).get("turnserver.conf", "")

    wait_for(updated, what="ConfigMap with user-quota=3")
    dep = get(control_plane, "deployment", "beta", namespace)
    assert dep is not None
    assert dep["spec"]["template"]["metadata"]["annotations"][
        "turnstorm.io/config-hash"] != old_hash


def test_a_value_the_apiserver_refuses_becomes_an_invalid_spec_condition(
        control_plane: ControlPlane, operator: Any, namespace: str) -> None:
    """The CRD takes an empty image; the Deployment's schema does not. The pool reports it
    (condition and one event) instead of retrying in a traceback loop."""
    create_secret(control_plane, "eta-auth", namespace)
    control_plane.kubectl("apply", "-f", "-", input_text=pool_yaml("eta", namespace, image=""))

    def invalid() -> dict[str, Any] | None:
        pool = get(control_plane, "turnpool", "eta", namespace) or {}
        found = [c for c in pool.get("status", {}).get("conditions", [])
                 if c.get("reason") == "InvalidSpec"]
        return found[0] if found else None

    ready = wait_for(invalid, timeout=30, what="an InvalidSpec condition")
    assert ready["status"] == "False"
    assert ready["message"].startswith("the apiserver rejected Deployment eta: ")
    assert "image" in ready["message"]
    time.sleep(6)  # a timer tick later: still one event, not one per retry
    items = json.loads(control_plane.kubectl("get", "events", "-n", namespace, "-o",
                                             "json").stdout)["items"]
    warnings = [e for e in items if e["involvedObject"]["name"] == "eta"
                and e["reason"] == "InvalidSpec"]
    assert len(warnings) == 1 and warnings[0].get("count", 1) == 1, warnings


def test_with_autoscaling_off_every_relay_returns_to_rotation(
        control_plane: ControlPlane, operator: Any, namespace: str) -> None:
    """Relays the autoscaler left draining or on standby go back into the client Service
    once autoscaling is turned off (nothing would ever drain or pack them again)."""
    create_secret(control_plane, "theta-auth", namespace)
    control_plane.kubectl("apply", "-f", "-", input_text=pool_yaml(
        "theta", namespace, scaling={"enabled": False}))
    wait_ready_objects(control_plane, "theta", namespace)
    for name, rotation in (("theta-a", "draining"), ("theta-b", "standby")):
        control_plane.kubectl("apply", "-f", "-", input_text=yaml.safe_dump({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"turnstorm.io/pool": "theta",
                                    "turnstorm.io/rotation": rotation},
                         "annotations": {"turnstorm.io/drain-started": "2026-01-01T00:00:00Z",
                                         "controller.kubernetes.io/pod-deletion-cost":
                                             "-1000000"}},
            "spec": {"containers": [{"name": "coturn", "image": "coturn/coturn"}]}}))

    def rotations() -> dict[str, Any] | None:
        found = {}
        for name in ("theta-a", "theta-b"):
            meta = (get(control_plane, "pod", name, namespace) or {}).get("metadata", {})
            found[name] = (meta.get("labels", {}).get("turnstorm.io/rotation"),
                           sorted(k for k in meta.get("annotations", {})
                                  if k.startswith(("turnstorm.io/", "controller."))))
        return found if all(r == "active" for r, _ in found.values()) else None

    found = wait_for(rotations, timeout=30, what="both relays back in rotation")
    assert found == {"theta-a": ("active", []), "theta-b": ("active", [])}


def test_printer_columns(control_plane: ControlPlane, operator: Any, namespace: str) -> None:
    create_secret(control_plane, "gamma-auth", namespace)
    control_plane.kubectl("apply", "-f", "-", input_text=pool_yaml("gamma", namespace))
    wait_for(lambda: (get(control_plane, "turnpool", "gamma", namespace) or {})
             .get("status", {}).get("desiredReplicas"), what="desiredReplicas")
    out = control_plane.kubectl("get", "turnpools", "-n", namespace).stdout.splitlines()
    assert out[0].split() == ["NAME", "READY", "DESIRED", "SATURATION", "LIMITING", "AGE"]
    assert out[1].split()[:3] == ["gamma", "0", "2"]


def test_kubectl_scale_uses_the_scale_subresource(control_plane: ControlPlane, operator: Any,
                                                 namespace: str) -> None:
    create_secret(control_plane, "delta-auth", namespace)
    control_plane.kubectl("apply", "-f", "-", input_text=pool_yaml(
        "delta", namespace, scaling={"enabled": False}))
    wait_ready_objects(control_plane, "delta", namespace)
    control_plane.kubectl("scale", "turnpool", "delta", "-n", namespace, "--replicas=4")
    wait_for(lambda: (get(control_plane, "deployment", "delta", namespace) or {})
             .get("spec", {}).get("replicas") == 4, what="Deployment scaled to 4")
    scale = json.loads(control_plane.kubectl(
        "get", "turnpool", "delta", "-n", namespace, "--subresource=scale", "-o", "json").stdout)
    assert scale["kind"] == "Scale"
    assert scale["spec"]["replicas"] == 4
    assert scale["status"]["selector"] == "turnstorm.io/pool=delta"


@pytest.mark.parametrize(("spec", "message"), CEL_CASES)
def test_apiserver_rejects_invalid_specs_with_our_message(
        control_plane: ControlPlane, namespace: str, spec: dict[str, Any], message: str) -> None:
    result = control_plane.kubectl("apply", "-f", "-", check=False,
                                   input_text=pool_yaml("bad", namespace, **spec))
    assert result.returncode != 0
    cel_message = message.split("Invalid value: ", 1)[1]
    assert cel_message in result.stderr, result.stderr


def test_missing_secret_sets_ready_false_and_recovers(control_plane: ControlPlane,
                                                      operator: Any, namespace: str) -> None:
    control_plane.kubectl("apply", "-f", "-", input_text=pool_yaml("eps", namespace))

    def not_ready() -> dict[str, Any] | None:
        pool = get(control_plane, "turnpool", "eps", namespace) or {}
        for cond in pool.get("status", {}).get("conditions", []):
            if cond["type"] == "Ready" and cond["reason"] == "SecretMissing":
                return cond
        return None

    cond = wait_for(not_ready, what="Ready=False SecretMissing")
    assert cond["status"] == "False"
    assert cond["message"].startswith("auth Secret 'eps-auth' does not exist; create it with")
    warnings = wait_for(lambda: [
        e for e in json.loads(control_plane.kubectl("get", "events", "-n", namespace, "-o",
                                                    "json").stdout)["items"]
        if e["reason"] == "SecretMissing"], what="the SecretMissing event")
    assert warnings[0]["type"] == "Warning"
    assert get(control_plane, "deployment", "eps", namespace) is None

    create_secret(control_plane, "eps-auth", namespace)
    # kopf retries the handler after the TemporaryError delay (30 s); the pool converges.
    wait_for(lambda: get(control_plane, "deployment", "eps", namespace), timeout=60,
             what="Deployment after the Secret appears")

"""Live signals from real coturn relays drive a TurnPool on the real apiserver.

No kubelet runs here, so the relays are local turnserver processes on 127.0.0.2/.3 with
their exporters, and the test creates the Pod objects the Deployment would have made,
with those addresses as pod IPs.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.conftest import require
from tests.k8s.conftest import wait_for
from tests.k8s.test_operator import create_secret, get, running_operator
from turnstorm.client import TurnClient
from turnstorm.operator.render import labels
from turnstorm.proto.credentials import Credentials
from turnstorm.relay.collector import Exporter, RelayCollector
from turnstorm.relay.coturncli import CoturnCli
from turnstorm.relay.process import LocalRelay, free_port, loopback_relay_config
from turnstorm.spec import turnpool_from_object
from turnstorm.testing.controlplane import ControlPlane

pytestmark = [pytest.mark.k8s, pytest.mark.integration]

HOSTS = ("127.0.0.2", "127.0.0.3")


class Relays:
    """Two real relays with exporters on one shared exporter port."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.exporter_port = max(free_port(h) for h in HOSTS)
        self.relays: list[LocalRelay] = []
        self.exporters: list[Exporter | None] = []
        self.password = secrets.token_urlsafe(12)
        for host in HOSTS:
            relay = LocalRelay(loopback_relay_config(
                host, cli_port=free_port("127.0.0.1"), cli_password=self.password,
                user_quota=50, total_quota=100), secret)
            relay.start()
            self.relays.append(relay)
            self.exporters.append(None)
        self.start_exporters()

    def start_exporters(self) -> None:
        for index, (host, relay) in enumerate(zip(HOSTS, self.relays, strict=True)):
            cli_port = relay.config.cli_port
            assert cli_port is not None
            cli = CoturnCli("127.0.0.1", cli_port, self.password)
            collector = RelayCollector(f"relay-{index}", cli, relay.pid, cache_seconds=0.2)
            self.exporters[index] = Exporter([collector], host, self.exporter_port).start()

    def stop_exporters(self) -> None:
        for index, exporter in enumerate(self.exporters):
            if exporter is not None:
                exporter.close()
            self.exporters[index] = None

    def close(self) -> None:
        self.stop_exporters()
        for relay in self.relays:
            relay.stop()


@pytest.fixture
def relays(turnserver_bin: str) -> Iterator[Relays]:
    require(LocalRelay is not None, "")
    running = Relays(secrets.token_urlsafe(16))
    try:
        yield running
    finally:
        running.close()


def pool_doc(name: str, namespace: str, exporter_port: int) -> dict[str, Any]:
    return {"apiVersion": "turnstorm.io/v1alpha1", "kind": "TurnPool",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"realm": "turnstorm.local", "authSecretRef": {"name": f"{name}-auth"},
                     "replicas": {"min": 1, "max": 6, "target": 2},
                     "relayPorts": {"min": 20000, "max": 20999},
                     "scaling": {"targets": {"allocationsPerRelay": 4},
                                 "scaleDown": {"stabilizationWindowSeconds": 0},
                                 # Plain HPA arithmetic, so the expected sizes are exact.
                                 "storm": {"enabled": False},
                                 "drainDeadlineSeconds": 600},
                     "metrics": {"source": "exporter", "intervalSeconds": 1,
                                 "exporterPort": exporter_port}}}


def make_pod(plane: ControlPlane, doc: dict[str, Any], index: int, ip: str) -> str:
    spec = turnpool_from_object(doc)
    name = f"{spec.name}-relay-{index}"
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": spec.namespace,
                        "labels": {**labels(spec), "turnstorm.io/rotation": "active"}},
           "spec": {"containers": [{"name": "coturn", "image": spec.image, "resources": {
               "requests": {"cpu": spec.cpu, "memory": spec.memory},
               "limits": {"cpu": spec.cpu, "memory": spec.memory}}}]}}
    plane.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(pod))
    status = {"status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running",
                         "conditions": [{"type": "Ready", "status": "True"}]}}
    plane.kubectl("patch", "pod", name, "-n", spec.namespace, "--subresource=status",
                  "--type=merge", "-p", json.dumps(status))
    return name


async def allocate(host: str, secret: str, count: int) -> list[TurnClient]:
    clients = []
    for index in range(count):
        credentials = Credentials.ephemeral(secret, f"sub{index}", time.time())
        client = await TurnClient.connect((host, relay_port(host)), credentials=credentials)
        await client.allocate()
        clients.append(client)
    return clients


_ports: dict[str, int] = {}


def relay_port(host: str) -> int:
    return _ports[host]


def pool_status(plane: ControlPlane, name: str, namespace: str) -> dict[str, Any]:
    status: dict[str, Any] = (get(plane, "turnpool", name, namespace) or {}).get("status", {})
    return status


def prepare(control_plane: ControlPlane, namespace: str, relays: Relays, name: str
            ) -> dict[str, Any]:
    """The relays' ports known, the pool's auth Secret made: the TurnPool to apply."""
    for host, relay in zip(HOSTS, relays.relays, strict=True):
        _ports[host] = relay.port
    create_secret(control_plane, f"{name}-auth", namespace)
    return pool_doc(name, namespace, relays.exporter_port)


def apply_with_pods(control_plane: ControlPlane, namespace: str, doc: dict[str, Any]
                    ) -> list[str]:
    """Apply the TurnPool, wait for its Deployment, then make the relays' Pods (no
    kubelet here) with the local relays' addresses."""
    name = doc["metadata"]["name"]
    control_plane.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(doc))
    wait_for(lambda: get(control_plane, "deployment", name, namespace), timeout=30,
             what="Deployment")
    return [make_pod(control_plane, doc, i, ip) for i, ip in enumerate(HOSTS)]


def test_live_signals_scale_out_hold_on_outage_and_drain_in(
        control_plane: ControlPlane, namespace: str, relays: Relays) -> None:
    doc = prepare(control_plane, namespace, relays, "live")
    # clients reach hostNetwork relays directly: these drain out of rotation by label
    # (through a Service they drain by deletion: the next test)
    doc["spec"]["exposure"] = {"type": "hostNetwork"}
    loop = asyncio.new_event_loop()
    clients: dict[str, list[TurnClient]] = {}
    try:
        with running_operator():
            pods = apply_with_pods(control_plane, namespace, doc)

            # 6 allocations per relay against a target of 4: ratio 1.5 -> 3 relays.
            for host in HOSTS:
                clients[host] = loop.run_until_complete(allocate(host, relays.secret, 6))
            # An evaluation while the second relay's allocations were still being made
            # can already ask for 3 (e.g. 6 + 3 = ratio 1.125): wait for the full picture.
            status = wait_for(
                lambda: (s := pool_status(control_plane, "live", namespace))
                .get("desiredReplicas") == 3
                and s.get("saturation", {}).get("allocations") == pytest.approx(1.5, abs=0.01)
                and s, timeout=30,
                what=lambda: "desiredReplicas 3 at 150 % allocations: "
                             f"{pool_status(control_plane, 'live', namespace)}")
            assert status["limitingSignal"] == "allocations"
            assert status["saturationSummary"] == "150% allocations"
            dep = get(control_plane, "deployment", "live", namespace)
            assert dep is not None and dep["spec"]["replicas"] == 3

            # A rollout's surge pod (the Deployment reports more pods than replicas): the
            # autoscaler holds instead of counting it as a relay in rotation.
            control_plane.kubectl("patch", "deployment", "live", "-n", namespace,
                                  "--subresource=status", "--type=merge",
                                  "-p", json.dumps({"status": {"replicas": 4}}))
            wait_for(lambda: pool_status(control_plane, "live", namespace)
                     .get("lastDecision", "").startswith("1 pod(s) over the Deployment's "
                                                         "replicas"), timeout=20,
                     what="holding during the rollout")
            control_plane.kubectl("patch", "deployment", "live", "-n", namespace,
                                  "--subresource=status", "--type=merge",
                                  "-p", json.dumps({"status": {"replicas": 3}}))

            # Metrics outage: exporters gone, load gone. The size holds.
            relays.stop_exporters()
            for host in HOSTS:
                for client in clients.pop(host):
                    loop.run_until_complete(client.aclose())
            wait_for(lambda: pool_status(control_plane, "live", namespace)
                     .get("lastDecision") == "no signal data: holding size", timeout=20,
                     what="holding on missing data")
            time.sleep(4)
            assert pool_status(control_plane, "live", namespace)["desiredReplicas"] == 3
            dep = get(control_plane, "deployment", "live", namespace)
            assert dep is not None and dep["spec"]["replicas"] == 3

            # Metrics back: relay-0 keeps one call, relay-1 none. Scale in drains the
            # emptiest relay first, then removes it once it has no allocations.
            clients[HOSTS[0]] = loop.run_until_complete(allocate(HOSTS[0], relays.secret, 1))
            relays.start_exporters()

            def drained() -> dict[str, Any] | None:
                pod = get(control_plane, "pod", pods[1], namespace) or {}
                meta = pod.get("metadata", {})
                if meta.get("labels", {}).get("turnstorm.io/rotation") == "draining":
                    return meta
                return None

            meta = wait_for(drained, timeout=30, what="relay-1 draining")
            assert meta["annotations"]["controller.kubernetes.io/pod-deletion-cost"] == \
                "-1000000"
            assert "turnstorm.io/drain-started" in meta["annotations"]
            kept = get(control_plane, "pod", pods[0], namespace) or {}
            assert kept["metadata"]["labels"]["turnstorm.io/rotation"] == "active"
            # 3 -> 2 in rotation (+1 draining) -> 2 once the drained relay is empty. The
            # third relay was never created here (no controllers): it reports no data,
            # which counts as "at target" on scale-down, so the pool stops at 2.
            wait_for(lambda: (get(control_plane, "deployment", "live", namespace) or {})
                     .get("spec", {}).get("replicas") == 2, timeout=30,
                     what="Deployment down to 2 after the drain")
            # kopf writes the status patch after the handler that lowered the replicas.
            wait_for(lambda: (s := pool_status(control_plane, "live", namespace))
                     .get("desiredReplicas") == 2 and s.get("drainingRelays") == [],
                     timeout=10, what=lambda: f"status after the removal: "
                     f"{pool_status(control_plane, 'live', namespace)}")
            def pool_events() -> list[dict[str, Any]]:
                items: list[dict[str, Any]] = json.loads(control_plane.kubectl(
                    "get", "events", "-n", namespace, "-o", "json").stdout)["items"]
                return [e for e in items if e["involvedObject"]["name"] == "live"]

            # kopf posts events in the background, after the handler returns.
            events = wait_for(lambda: (found := pool_events()) and {
                "ScaleUp", "Drain", "Remove"} <= {e["reason"] for e in found} and found,
                timeout=10, what="ScaleUp, Drain and Remove events")
            removed = [e["message"] for e in events if e["reason"] == "Remove"]
            assert removed == [f"relay {pods[1]} removed: no allocations left"]
            meta = (get(control_plane, "pod", pods[1], namespace) or {}).get("metadata", {})
            assert "turnstorm.io/removed-at" in meta.get("annotations", {})
            # below every draining relay's cost: the ReplicaSet deletes this one
            assert meta["annotations"]["controller.kubernetes.io/pod-deletion-cost"] == \
                "-2147483648"
    finally:
        for group in clients.values():
            for client in group:
                loop.run_until_complete(client.aclose())
        loop.close()


def test_relays_behind_a_service_drain_by_deletion(
        control_plane: ControlPlane, namespace: str, relays: Relays) -> None:
    """Through a Service (the default LoadBalancer exposure) a relay leaving rotation
    would lose its calls' conntrack entries: the chosen relay gets the lowest deletion
    cost and replicas drop at once, so the ReplicaSet deletes it and its preStop hook
    drains it as a terminating endpoint; it is never relabelled, and it no longer
    counts in the Deployment's replicas."""
    doc = prepare(control_plane, namespace, relays, "svc")
    with running_operator():
        pods = apply_with_pods(control_plane, namespace, doc)

        def removed() -> list[dict[str, Any]]:
            metas = [(get(control_plane, "pod", p, namespace) or {}).get("metadata", {})
                     for p in pods]
            return [m for m in metas if "turnstorm.io/removed-at" in m.get("annotations", {})]

        # no allocations on either relay (target 4): one relay is enough
        (meta,) = wait_for(removed, timeout=30, what="a relay chosen for removal")
        assert meta["labels"]["turnstorm.io/rotation"] == "active"  # still in the Service
        assert meta["annotations"]["controller.kubernetes.io/pod-deletion-cost"] == \
            "-2147483648"
        assert "turnstorm.io/drain-started" in meta["annotations"]

        def replicas() -> int:
            dep = get(control_plane, "deployment", "svc", namespace) or {}
            return int(dep.get("spec", {}).get("replicas", -1))

        wait_for(lambda: replicas() == 1, timeout=10,
                 what=lambda: "replicas lowered at once (the ReplicaSet deletes the relay): "
                              f"{pool_status(control_plane, 'svc', namespace)}")
        status = wait_for(lambda: (s := pool_status(control_plane, "svc", namespace))
                          .get("drainingRelays") and s, timeout=10, what="drainingRelays")
        assert status["drainingRelays"] == [{"name": meta["name"], "allocations": 0,
                                             "deleted": True,
                                             "since": meta["annotations"][
                                                 "turnstorm.io/drain-started"]}]
        for _ in range(4):  # the draining relay never brings replicas back up
            time.sleep(1)
            assert replicas() == 1
        drains = wait_for(lambda: [e["message"] for e in json.loads(control_plane.kubectl(
            "get", "events", "-n", namespace, "-o", "json").stdout)["items"]
            if e["reason"] == "Drain"], timeout=10, what="the Drain event")
        assert drains == [f"relay {meta['name']} drains in its preStop hook with 0 allocations"]


def test_pack_placement_keeps_the_younger_relay_on_standby_until_needed(
        control_plane: ControlPlane, namespace: str, relays: Relays) -> None:
    doc = prepare(control_plane, namespace, relays, "pack")
    doc["spec"]["replicas"] = {"min": 2, "max": 2, "target": 2}
    # fill 4 per relay; keep 2 allocations' worth of room in rotation
    doc["spec"]["scaling"]["placement"] = {"mode": "pack", "headroomPercent": 50}
    loop = asyncio.new_event_loop()
    clients: list[TurnClient] = []

    def rotation(pod: str) -> str | None:
        found = get(control_plane, "pod", pod, namespace) or {}
        label: str | None = found.get("metadata", {}).get("labels", {}).get(
            "turnstorm.io/rotation")
        return label

    try:
        with running_operator():
            pods = apply_with_pods(control_plane, namespace, doc)
            # Both empty: the oldest relay has room enough, the other waits out of the
            # client Service.
            wait_for(lambda: rotation(pods[1]) == "standby", timeout=30,
                     what=lambda: f"{pods[1]} on standby: {rotation(pods[1])}")
            assert rotation(pods[0]) == "active"
            wait_for(lambda: pool_status(control_plane, "pack", namespace)
                     .get("standbyRelays") == [pods[1]], timeout=10,
                     what=lambda: f"status standbyRelays: "
                                  f"{pool_status(control_plane, 'pack', namespace)}")
            # 3 calls on the oldest: 1 of its 4 left, under the 2 wanted: the next opens.
            clients = loop.run_until_complete(allocate(HOSTS[0], relays.secret, 3))
            wait_for(lambda: rotation(pods[1]) == "active", timeout=30,
                     what=lambda: f"{pods[1]} back in rotation: {rotation(pods[1])}")
            assert rotation(pods[0]) == "active"
            wait_for(lambda: pool_status(control_plane, "pack", namespace)
                     .get("standbyRelays") == [], timeout=10, what="no standby relay")
            dep = get(control_plane, "deployment", "pack", namespace)
            assert dep is not None and dep["spec"]["replicas"] == 2
            # The calls end: the younger relay goes back on standby.
            for client in clients:
                loop.run_until_complete(client.aclose())
            clients = []
            wait_for(lambda: rotation(pods[1]) == "standby", timeout=30,
                     what="back on standby once the calls ended")
    finally:
        for client in clients:
            loop.run_until_complete(client.aclose())
        loop.close()


def test_vertical_resizes_an_overloaded_relay_in_place_and_back(
        control_plane: ControlPlane, namespace: str, relays: Relays) -> None:
    """spec.scaling.vertical: 5 allocations on a relay whose target is 4 resize its pod's
    CPU to 125 % through the pods/resize subresource (250m -> 312m, not a whole step in
    millicores: read back as 125 %, so it is resized once); when they end it goes back to
    100 %."""
    doc = prepare(control_plane, namespace, relays, "vert")
    doc["spec"]["replicas"] = {"min": 2, "max": 2, "target": 2}
    doc["spec"]["resources"] = {"cpu": "250m", "memory": "128Mi"}
    doc["spec"]["scaling"]["vertical"] = {"enabled": True, "maxPercent": 150}
    loop = asyncio.new_event_loop()
    clients: list[TurnClient] = []

    def cpu(pod: str) -> tuple[str | None, str | None]:
        found = get(control_plane, "pod", pod, namespace) or {}
        resources = found.get("spec", {}).get("containers", [{}])[0].get("resources", {})
        return (resources.get("requests", {}).get("cpu"),
                resources.get("limits", {}).get("cpu"))

    def status() -> dict[str, Any]:
        return pool_status(control_plane, "vert", namespace)

    def resize_events() -> str:
        # one line per Resize event (kopf may merge repeats into a count: read it too)
        return str(control_plane.kubectl(
            "get", "events", "-n", namespace, "--field-selector", "reason=Resize", "-o",
            "jsonpath={range .items[*]}{.message} x{.count}{\"\\n\"}{end}").stdout)

    try:
        with running_operator():
            pods = apply_with_pods(control_plane, namespace, doc)
            wait_for(lambda: status().get("resizedRelays") == [], timeout=30,
                     what=lambda: f"a first evaluation: {status()}")
            assert cpu(pods[0]) == ("250m", "250m")
            clients = loop.run_until_complete(allocate(HOSTS[0], relays.secret, 5))
            wait_for(lambda: cpu(pods[0]) == ("312m", "312m"), timeout=30,
                     what=lambda: f"{pods[0]} resized to 125 %: {cpu(pods[0])}")
            assert cpu(pods[1]) == ("250m", "250m")
            # no kubelet here: not reported applied until a container status says so
            wait_for(lambda: status().get("resizedRelays") == [
                {"name": pods[0], "cpuPercent": 125, "applied": False}], timeout=10,
                what=lambda: f"status resizedRelays: {status()}")
            applied = {"status": {"containerStatuses": [{
                "name": "coturn", "image": "coturn", "imageID": "", "ready": True,
                "restartCount": 0, "state": {"running": {}},
                "resources": {"requests": {"cpu": "312m"}, "limits": {"cpu": "312m"}}}]}}
            control_plane.kubectl("patch", "pod", pods[0], "-n", namespace,
                                  "--subresource=status", "--type=merge", "-p",
                                  json.dumps(applied))
            wait_for(lambda: status().get("resizedRelays") == [
                {"name": pods[0], "cpuPercent": 125, "applied": True}], timeout=10,
                what=lambda: f"status resizedRelays applied: {status()}")
            time.sleep(3)  # three more evaluations: the relay is not resized again
            assert resize_events().count("100% -> 125%") == 1, resize_events()
            found = get(control_plane, "deployment", "vert", namespace)
            assert found is not None and found["spec"]["replicas"] == 2
            for client in clients:
                loop.run_until_complete(client.aclose())
            clients = []
            wait_for(lambda: cpu(pods[0]) == ("250m", "250m"), timeout=30,
                     what=lambda: f"{pods[0]} back to 100 %: {cpu(pods[0])}")
            wait_for(lambda: status().get("resizedRelays") == [], timeout=10,
                     what=lambda: f"status resizedRelays: {status()}")
            assert "125% -> 100%" in resize_events(), resize_events()
    finally:
        for client in clients:
            loop.run_until_complete(client.aclose())
        loop.close()

"""Working with turnstorm on a running node (turnstorm/testing/node.py): the chart's
operator, TurnPools, calls and storms from the host. Shared by ``tests/node`` and
``bench.node``; every helper drives the real parts (kubectl, Helm, ``turnstorm``)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turnstorm.testing.node import CLUSTER_RANGE, POD_GATEWAY, Node

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "turnstorm"
OPERATOR_NAMESPACE = "turnstorm"
RELEASE = "turnstorm"
TURNSTORM = str(Path(sys.executable).with_name("turnstorm"))
OPERATOR_VALUES = ("--set", "operator.env[0].name=TURNSTORM_TIMER_SECONDS",
                   "--set-string", "operator.env[0].value=1")
"""The operator's timers wake every second (the apiserver tier does the same)."""


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.5,
             what: str | Callable[[], str] = "condition") -> Any:
    """``predicate()`` once it is truthy; AssertionError with the last value otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    if callable(what):
        what = what()
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def helm_binary(major: str = "3") -> Path:
    """A real Helm (scripts/get-helm.sh fetches and caches it)."""
    result = subprocess.run([str(ROOT / "scripts" / "get-helm.sh"), major],
                            capture_output=True, text=True, check=False, timeout=600)
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise AssertionError(f"Helm {major} not obtainable (scripts/get-helm.sh: {tail})")
    return Path(result.stdout.strip().splitlines()[-1])


def run_helm(helm: Path, node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(node.kubeconfig),
           "HELM_CACHE_HOME": str(node.root / "helm" / "cache"),
           "HELM_CONFIG_HOME": str(node.root / "helm" / "config"),
           "HELM_DATA_HOME": str(node.root / "helm" / "data")}
    result = subprocess.run([str(helm), *args], capture_output=True, text=True, check=False,
                            timeout=300, env=env)
    if result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args[:2])} failed: {result.stderr.strip()}")
    return result


def install_operator(helm: Path, node: Node) -> str:
    """The chart with its defaults (the image `make image` builds); the operator pod's
    name once it is Ready."""
    run_helm(helm, node, "upgrade", "--install", RELEASE, str(CHART), "--namespace",
             OPERATOR_NAMESPACE, "--create-namespace", "--wait", "--timeout", "180s",
             *OPERATOR_VALUES)
    return operator_pod(node)


def operator_pod(node: Node, timeout: float = 180.0) -> str:
    def ready() -> str:
        out = node.kubectl("-n", OPERATOR_NAMESPACE, "get", "pods", "-l",
                           "app.kubernetes.io/component=operator", "-o", "json").stdout
        for pod in json.loads(out)["items"]:
            if is_ready(pod):
                return str(pod["metadata"]["name"])
        return ""

    name: str = wait_for(ready, timeout, what="the operator pod Ready")
    return name


def is_ready(pod: dict[str, Any]) -> bool:
    """Running, Ready (every container), and not being deleted."""
    if pod["metadata"].get("deletionTimestamp") or pod["status"].get("phase") != "Running":
        return False
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in pod["status"].get("conditions", []))


@dataclass
class Pool:
    """A TurnPool on the node, with what a client needs to reach it."""

    name: str
    namespace: str
    secret_file: Path

    def _get(self, node: Node, *what: str) -> dict[str, Any]:
        out = node.kubectl("-n", self.namespace, "get", *what, "-o", "json")
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def get(self, node: Node) -> dict[str, Any]:
        return self._get(node, "turnpool", self.name)

    def service(self, node: Node) -> dict[str, Any]:
        return self._get(node, "service", self.name)

    def deployment(self, node: Node) -> dict[str, Any]:
        return self._get(node, "deployment", self.name)

    def pods(self, node: Node) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._get(node, "pods", "-l",
                                                f"turnstorm.io/pool={self.name}")["items"]
        return items

    def running(self, node: Node) -> list[dict[str, Any]]:
        return [p for p in self.pods(node) if is_ready(p)]

    def addresses(self, node: Node) -> dict[str, str]:
        """The client Service's ClusterIP and NodePort addresses (UDP)."""
        from turnstorm.testing.node import NODE_IP

        service = self.service(node)
        port = next(p for p in service["spec"]["ports"] if p["name"] == "turn-udp")
        return {"ClusterIP": f"{service['spec']['clusterIP']}:{port['port']}",
                "NodePort": f"{NODE_IP}:{port['nodePort']}"}


def pool_manifest(name: str, namespace: str, image: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "image": image,
        "realm": "node.turnstorm.test",
        "authSecretRef": {"name": f"{name}-auth"},
        "replicas": {"min": 1, "max": 3, "target": 1},
        "relayPorts": {"min": 61000, "max": 61999},
        "exposure": {"type": "NodePort"},
        # the host's echo peer and the storm sit on the node's bridge
        "security": {"allowedPeerCIDRs": [CLUSTER_RANGE]},
        "resources": {"cpu": "250m", "memory": "128Mi"},
        "metrics": {"intervalSeconds": 2},
    }
    body.update(spec)
    return {"apiVersion": "turnstorm.io/v1alpha1", "kind": "TurnPool",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}


def create_pool(node: Node, namespace: str, image: str, directory: Path,
                name: str = "relays", **spec: Any) -> Pool:
    """The pool's Secret (a random shared secret, also written 0600 into ``directory``
    for the clients' ``--secret-file``) and the TurnPool."""
    secret = secrets.token_urlsafe(24)
    node.kubectl("-n", namespace, "apply", "-f", "-", input_text=json.dumps({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": f"{name}-auth", "namespace": namespace},
        "data": {"secret": base64.b64encode(secret.encode()).decode()}}))
    node.kubectl("-n", namespace, "apply", "-f", "-",
                 input_text=json.dumps(pool_manifest(name, namespace, image, **spec)))
    secret_file = directory / f"{name}.secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    return Pool(name, namespace, secret_file)


@contextlib.contextmanager
def echo_peer() -> Iterator[str]:
    """A UDP echo peer on the host at the node bridge's address (relay pods reach it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe_socket:
        probe_socket.bind((POD_GATEWAY, 0))
        port = probe_socket.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "turnstorm.loadgen.echo", "--host",
                                POD_GATEWAY, "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        if process.poll() is not None:
            stderr = process.stderr.read().decode() if process.stderr else ""
            raise AssertionError(f"the echo peer exited: {stderr}")
        yield f"{POD_GATEWAY}:{port}"
    finally:
        process.terminate()
        process.wait(10)


def stun_answers(address: str, timeout: float = 0.5) -> bool:
    """Whether a STUN Binding to ``address`` (HOST:PORT over UDP) is answered. Right after
    a relay becomes ready kube-proxy may not have programmed its Service yet: sending to
    the ClusterIP then fails with EPERM for a moment."""
    from turnstorm.proto import stun

    host, _, port = address.rpartition(":")
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(request.encode(), (host, int(port)))
            return sock.recv(2048)[8:20] == request.transaction_id
        except OSError:
            return False


def wait_serving(node: Node, pool: Pool, timeout: float = 30.0) -> dict[str, str]:
    """The pool's Service addresses once both answer STUN (kube-proxy synced)."""
    addresses = pool.addresses(node)
    for address in addresses.values():
        wait_for(lambda a=address: stun_answers(a), timeout, interval=0.2,  # type: ignore[misc]
                 what=f"the Service answering STUN at {address}")
    return addresses


def probe(uri: str, secret_file: Path, peer: str, *extra: str,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TURNSTORM, "probe", uri, "--secret-file", str(secret_file),
                           "--peer", peer, "--allow-target", CLUSTER_RANGE, "--json",
                           "--timeout", "3", *extra],
                          capture_output=True, text=True, check=False, timeout=timeout)


@dataclass
class Storm:
    """A bounded ``turnstorm storm`` from the host, running in the background."""

    process: subprocess.Popen[str]
    out: Path

    def wait(self, timeout: float = 300) -> dict[str, Any]:
        _, stderr = self.process.communicate(timeout=timeout)
        if self.process.returncode != 0:
            raise AssertionError(f"storm exited {self.process.returncode}: {stderr[-2000:]}")
        report: dict[str, Any] = json.loads((self.out / "results.json").read_text())
        return report


def start_storm(target: str, pool: Pool, peer: str, out: Path, *args: str) -> Storm:
    """``args``: --users, --duration, --session, --shape ... (bounded by --max-pps)."""
    process = subprocess.Popen(
        [TURNSTORM, "storm", "--target", f"turn:{target}", "--secret-file",
         str(pool.secret_file), "--peer", peer, "--allow-target", CLUSTER_RANGE,
         "--max-pps", "5000", "--out", str(out), "--quiet", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return Storm(process, out)


def relay_allocations(pod: dict[str, Any], port: int = 9641) -> int | None:
    """The relay's live allocations as its exporter sidecar reports them."""
    url = f"http://{pod['status']['podIP']}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name == "turnstorm_relay_allocations":
            return int(float(line.rsplit(" ", 1)[1]))
    return None


def cut_calls(report: dict[str, Any]) -> dict[str, int]:
    """What a storm's report counts as calls its relays cut: failed refreshes and
    releases (437 and the like) and allocations that failed."""
    found = {name: entry["failures"] for name, entry in report["transactions"].items()
             if entry["failures"] and ("Refresh" in name or "release" in name.lower())}
    found["allocations failed"] = report["allocations"]["failed"]
    found["release failed"] = report["allocations"]["release_failed"]
    return {k: v for k, v in found.items() if v}


def scale_cycle(node: Node, namespace: str, image: str, peer: str, work: Path,
                duration: int, interval: int = 2) -> dict[str, float | str]:
    """A pool of 1-3 relays (target 4 allocations each) and a storm of 10 users making
    calls of 1-3 s (so new calls keep arriving) for ``duration`` seconds through its
    ClusterIP: the times of pod start (apply -> Ready),
    scale-out reaction (storm -> a relay the operator added carries calls) and drain
    (storm end -> one relay again), peak relays and the allocations cut."""
    applied = time.monotonic()
    pool = create_pool(
        node, namespace, image, work,
        replicas={"min": 1, "max": 3, "target": 1},
        scaling={"targets": {"allocationsPerRelay": 4},
                 "scaleDown": {"stabilizationWindowSeconds": 4, "periodSeconds": 2},
                 "scaleUp": {"periodSeconds": 2}, "drainDeadlineSeconds": 120},
        metrics={"intervalSeconds": interval})
    (first,) = wait_for(lambda: pool.running(node), 120, interval=0.1,
                                what="the first relay pod Ready")
    pod_start = time.monotonic() - applied
    target = wait_serving(node, pool)["ClusterIP"]
    storm = start_storm(target, pool, peer, work / "storm", "--users", "10",
                                "--spawn-rate", "10", "--duration", str(duration),
                                "--session", "uniform:1-3")
    started = time.monotonic()
    peak = 1

    def new_relay_carries() -> bool:
        nonlocal peak
        pods = pool.running(node)
        peak = max(peak, len(pods))
        return any(p["metadata"]["name"] != first["metadata"]["name"]
                   and (relay_allocations(p) or 0) > 0 for p in pods)

    wait_for(new_relay_carries, duration, interval=0.1,
                     what="a relay the operator added carrying calls")
    reaction = time.monotonic() - started
    report = storm.wait(duration + 120)
    ended = time.monotonic()

    def drained() -> bool:
        nonlocal peak
        pods = pool.pods(node)
        peak = max(peak, len(pods))
        status = pool.get(node).get("status", {})
        return len(pods) == 1 and not status.get("drainingRelays")

    wait_for(drained, 180, interval=0.2, what="the pool back at one relay")
    cut = cut_calls(report)
    return {"pod start": pod_start, "scale-out reaction": reaction,
            "drain": time.monotonic() - ended, "peak relays": float(peak),
            "allocations cut": float(sum(cut.values())),
            "cut detail": json.dumps(cut) if cut else "(none)"}

"""Pure renderers: a TurnPool spec in, the Kubernetes objects the operator owns out.

No kopf, no API calls: the same functions back ``turnstorm render`` and the golden-file
tests. Owner references are added by the caller (``kopf.adopt``).

Workload: a Deployment, not a StatefulSet. A StatefulSet always removes the highest
ordinal on scale-in; the drain-aware scale-down must remove the relays with the fewest
live allocations. With a Deployment the operator (1) takes the chosen pods out of
rotation by relabelling them (the client Service selects ``turnstorm.io/rotation:
active``), (2) sets ``controller.kubernetes.io/pod-deletion-cost`` so the ReplicaSet
deletes exactly those pods, and (3) lowers ``replicas`` once their allocations reach zero
or the drain deadline passes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from turnstorm import __version__
from turnstorm.coturnconf import DEFAULT_DENIED_PEERS, RelayConfig, render
from turnstorm.spec import API_VERSION, TurnPoolSpec

Manifest = dict[str, Any]

POOL_LABEL = "turnstorm.io/pool"
ROTATION_LABEL = "turnstorm.io/rotation"
ROTATION_ACTIVE = "active"
ROTATION_DRAINING = "draining"
ROTATION_STANDBY = "standby"
"""placement pack: ready, not draining, kept out of the client Service until needed."""
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
RELAY_CONTAINER = "coturn"
"""The relay container's name in every relay pod."""
CONFIG_HASH = "turnstorm.io/config-hash"
CLI_PORT = 5766
IMAGE_REPOSITORY = "localhost/turnstorm"
"""The image `make image` builds (scripts/build-images.sh); push it to your registry and
set the chart's ``image.repository`` (README, "Images")."""
DEFAULT_EXPORTER_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}"


def labels(spec: TurnPoolSpec) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "turnstorm-relay",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/managed-by": "turnstorm",
        POOL_LABEL: spec.name,
    }


def selector(spec: TurnPoolSpec) -> dict[str, str]:
    return {POOL_LABEL: spec.name}


def selector_string(spec: TurnPoolSpec) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(spec).items())


def _readiness(spec: TurnPoolSpec) -> dict[str, Any]:
    """A TCP connect to the TURN listener; without one (``listeners.tcp: 0``) a STUN
    Binding over UDP from inside the container (the image's ``turnutils_stunclient``,
    which waits without end for an answer that does not come: the probe's timeout fails
    it). The admin CLI is no fallback: it listens on 127.0.0.1 only."""
    if spec.tcp_port:
        return {"tcpSocket": {"port": spec.tcp_port}, "periodSeconds": 5}
    return {"exec": {"command": ["turnutils_stunclient", "-p", str(spec.udp_port),
                                 "127.0.0.1"]},
            "periodSeconds": 5, "timeoutSeconds": 2}


def relay_config(spec: TurnPoolSpec) -> RelayConfig:
    """The relay's coturn config (without secrets: those come from Secrets at start-up)."""
    return RelayConfig(
        realm=spec.realm,
        listening_ips=["0.0.0.0"],
        external_ip=spec.external_ip,
        listening_port=spec.udp_port,
        tls_port=spec.tls_port,
        tcp=spec.tcp_port != 0,
        min_port=spec.relay_port_min,
        max_port=spec.relay_port_max,
        # the built-in ranges always; the spec can add ranges, only allowedPeerCIDRs opens
        denied_peers=list(dict.fromkeys([*DEFAULT_DENIED_PEERS, *spec.denied_peers])),
        allowed_peers=list(spec.allowed_peers),
        user_quota=spec.user_quota,
        total_quota=spec.total_quota,
        max_bps=spec.max_bps,
        cli_port=CLI_PORT,
        cli_password="${CLI_PASSWORD}",  # noqa: S106 - a placeholder, dropped below
        log_file="stdout",
        pid_file="/var/lib/coturn/turnserver.pid",
        userdb="/var/lib/coturn/turndb",
    )


def turnserver_conf(spec: TurnPoolSpec) -> str:
    # The CLI password placeholder is dropped from the file and passed as an argument
    # from the pool's CLI Secret, like the shared secret.
    text = render(relay_config(spec))
    return "".join(line + "\n" for line in text.splitlines()
                   if not line.startswith("cli-password="))


def _meta(spec: TurnPoolSpec, name: str, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": spec.namespace, "labels": labels(spec)}
    meta.update(extra)
    return meta


def config_map(spec: TurnPoolSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(spec, f"{spec.name}-config"),
        "data": {"turnserver.conf": turnserver_conf(spec)},
    }


def cli_secret_name(spec: TurnPoolSpec) -> str:
    return f"{spec.name}-cli"


def cli_secret(spec: TurnPoolSpec, password: str) -> Manifest:
    """The coturn admin CLI password (random, created once, read by the exporter)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(spec, cli_secret_name(spec)),
        "type": "Opaque",
        "stringData": {"password": password},
    }


def _ports(spec: TurnPoolSpec, service: bool) -> list[dict[str, Any]]:
    ports: list[dict[str, Any]] = [{"name": "turn-udp", "protocol": "UDP",
                                    "port" if service else "containerPort": spec.udp_port}]
    if spec.tcp_port:
        ports.append({"name": "turn-tcp", "protocol": "TCP",
                      "port" if service else "containerPort": spec.tcp_port})
    if spec.tls_port:
        ports.append({"name": "turn-tls", "protocol": "TCP",
                      "port" if service else "containerPort": spec.tls_port})
    if service:
        for port in ports:
            port["targetPort"] = port["port"]
    return ports


EXPORTER_UID = 65533
"""The exporter sidecar's user: not the relay's (65534), so sharing the pod's process
namespace does not let it read the relay's environment or file descriptors."""


DRAIN_GRACE_SECONDS = 30
"""Time the relay gets after its drain wait (SIGTERM to exit)."""


def drain_wait_script(min_port: int, max_port: int, deadline: int) -> str:
    """A POSIX shell + awk loop (the relay image's own tools) that waits until no UDP
    socket is bound in the relay port range, i.e. no allocation is left, or ``deadline``
    seconds pass. Run as the relay container's ``preStop`` hook: a relay pod deleted
    for any reason (a rollout, a node drain, the ReplicaSet picking it) has already left
    its Services and DNS, so its calls end by themselves before the relay stops. Without
    ``/proc/net/udp`` or ``awk`` it does not wait."""
    program = ('function h(s, i, v) { v = 0; for (i = 1; i <= length(s); i++) '
               'v = v * 16 + index("0123456789ABCDEF", toupper(substr(s, i, 1))) - 1; '
               'return v } { n = split($2, a, ":"); if (n == 2) { p = h(a[2]); '
               'if (p >= lo && p <= hi) c++ } } END { print c + 0 }')
    count = f"awk -v lo={min_port} -v hi={max_port} '{program}'"
    return (f"end=$(( $(date +%s) + {deadline} )); "
            "while :; do "
            f"n=$(cat /proc/net/udp /proc/net/udp6 2>/dev/null | {count}); "
            '[ "${n:-0}" -gt 0 ] 2>/dev/null || exit 0; '
            '[ "$(date +%s)" -lt "$end" ] || exit 0; '
            "sleep 2; done")


def deployment(spec: TurnPoolSpec, replicas: int, exporter_image: str) -> Manifest:
    conf = turnserver_conf(spec)
    conf_hash = hashlib.sha256(conf.encode()).hexdigest()[:16]
    host_network = spec.exposure == "hostNetwork"
    relay = {
        "name": RELAY_CONTAINER,
        "image": spec.image,
        "args": [
            "-c", "/etc/coturn/turnserver.conf",
            "--static-auth-secret=$(TURN_SECRET)",
            "--cli-password=$(CLI_PASSWORD)",
        ],
        "env": [
            {"name": "TURN_SECRET", "valueFrom": {"secretKeyRef": {
                "name": spec.secret_name, "key": spec.secret_key}}},
            {"name": "CLI_PASSWORD", "valueFrom": {"secretKeyRef": {
                "name": cli_secret_name(spec), "key": "password"}}},
        ],
        "ports": _ports(spec, service=False),
        "resources": {
            "requests": {"cpu": spec.cpu, "memory": spec.memory},
            "limits": {"cpu": spec.cpu, "memory": spec.memory},
        },
        "readinessProbe": _readiness(spec),
        # deleted for any reason, the relay waits for its allocations to end first
        "lifecycle": {"preStop": {"exec": {"command": [
            "/bin/sh", "-c", drain_wait_script(spec.relay_port_min, spec.relay_port_max,
                                               spec.scaling.drain_deadline_seconds)]}}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"],
                                             "add": ["NET_BIND_SERVICE"]}},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/coturn", "readOnly": True},
                         {"name": "var", "mountPath": "/var/lib/coturn"}],
    }
    exporter = {
        "name": "exporter",
        "image": exporter_image,
        "args": ["exporter", "--cli", f"127.0.0.1:{CLI_PORT}",
                 "--listen", f"0.0.0.0:{spec.exporter_port}", "--process", "turnserver"],
        "env": [{"name": "TURNSTORM_CLI_PASSWORD", "valueFrom": {"secretKeyRef": {
            "name": cli_secret_name(spec), "key": "password"}}}],
        "ports": [{"name": "metrics", "protocol": "TCP", "containerPort": spec.exporter_port}],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                      "limits": {"cpu": "200m", "memory": "128Mi"}},
        # A user of its own: in the shared process namespace it reads the relay's
        # world-readable /proc/<pid>/stat, never its environment (the TURN secret).
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]},
                            "runAsUser": EXPORTER_UID, "runAsGroup": EXPORTER_UID},
    }
    pod_spec: dict[str, Any] = {
        "containers": [relay, exporter],
        # the exporter finds the relay process for its CPU seconds (cpuUtilization)
        "shareProcessNamespace": True,
        "volumes": [{"name": "config", "configMap": {"name": f"{spec.name}-config"}},
                    {"name": "var", "emptyDir": {}}],
        "terminationGracePeriodSeconds": (spec.scaling.drain_deadline_seconds
                                          + DRAIN_GRACE_SECONDS),
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534},
    }
    if host_network:
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
        # One relay per node: they all bind the same host ports.
        pod_spec["affinity"] = {"podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [{
                "labelSelector": {"matchLabels": selector(spec)},
                "topologyKey": "kubernetes.io/hostname",
            }]}}
    pod_labels = {**labels(spec), ROTATION_LABEL: ROTATION_ACTIVE}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(spec, spec.name),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(spec)},
            # Rolling a relay cuts its allocations: one at a time, never below capacity.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": pod_labels,
                             "annotations": {CONFIG_HASH: conf_hash}},
                "spec": pod_spec,
            },
        },
    }


def services(spec: TurnPoolSpec) -> list[Manifest]:
    client_selector = {**selector(spec), ROTATION_LABEL: ROTATION_ACTIVE}
    result: list[Manifest] = []
    if spec.exposure == "hostNetwork":
        client: Manifest = {"apiVersion": "v1", "kind": "Service",
                            "metadata": _meta(spec, spec.name),
                            "spec": {"clusterIP": "None", "selector": client_selector,
                                     "ports": _ports(spec, service=True),
                                     "publishNotReadyAddresses": False}}
    else:
        client = {"apiVersion": "v1", "kind": "Service",
                  "metadata": _meta(spec, spec.name),
                  "spec": {"type": spec.exposure, "selector": client_selector,
                           "ports": _ports(spec, service=True),
                           "externalTrafficPolicy": "Local"}}
    result.append(client)
    result.append({
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(spec, f"{spec.name}-metrics"),
        "spec": {"clusterIP": "None", "selector": selector(spec),
                 "ports": [{"name": "metrics", "protocol": "TCP", "port": spec.exporter_port,
                            "targetPort": spec.exporter_port}]},
    })
    return result


def pod_disruption_budget(spec: TurnPoolSpec) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(spec, spec.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(spec)}},
    }


def service_monitor(spec: TurnPoolSpec) -> Manifest:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(spec, spec.name),
        "spec": {
            "selector": {"matchLabels": labels(spec)},
            "endpoints": [{"port": "metrics", "interval": f"{spec.interval_seconds}s"}],
        },
    }


def render_pool(
    spec: TurnPoolSpec,
    *,
    replicas: int | None = None,
    exporter_image: str = DEFAULT_EXPORTER_IMAGE,
    service_monitor_available: bool = False,
) -> list[Manifest]:
    """Every object owned by the pool, in apply order (no Secret: created once, apart)."""
    count = spec.target_replicas if replicas is None else replicas
    objects = [config_map(spec), *services(spec), deployment(spec, count, exporter_image),
               pod_disruption_budget(spec)]
    if spec.service_monitor and service_monitor_available:
        objects.append(service_monitor(spec))
    return objects


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (turnserver.conf) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[Manifest]) -> str:
    return "".join("---\n" + yaml.dump(obj, Dumper=_Dumper, sort_keys=False)
                   for obj in objects)


def fingerprint(obj: Manifest) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


__all__ = ["API_VERSION", "render_pool", "to_yaml"]

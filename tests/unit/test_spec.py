"""TurnPool/LoadRun specs: defaults, schema checks and the CEL rules mirrored locally."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from turnstorm.spec import CEL_RULES, SpecError, crd, turnpool_from_object, validate


def pool(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"realm": "r.example", "authSecretRef": {"name": "auth"}}
    base.update(spec)
    return {"apiVersion": "turnstorm.io/v1alpha1", "kind": "TurnPool",
            "metadata": {"name": "p", "namespace": "ns"}, "spec": base}


def _rules(node: Any) -> list[str]:
    found = []
    if isinstance(node, dict):
        for rule in node.get("x-kubernetes-validations", []):
            found.append(rule["rule"])
        for value in node.values():
            found += _rules(value)
    elif isinstance(node, list):
        for value in node:
            found += _rules(value)
    return found


def test_every_cel_rule_in_the_crds_has_a_local_check() -> None:
    rules = _rules(crd("TurnPool")) + _rules(crd("LoadRun"))
    assert rules, "the CRDs carry CEL rules"
    missing = [r for r in rules if r not in CEL_RULES]
    assert missing == []
    unused = set(CEL_RULES) - set(rules)
    assert unused == set()


def test_defaults_match_the_crd() -> None:
    spec = turnpool_from_object(pool())
    assert (spec.min_replicas, spec.max_replicas, spec.target_replicas) == (1, 10, 1)
    assert (spec.udp_port, spec.tcp_port, spec.tls_port) == (3478, 3478, None)
    assert (spec.relay_port_min, spec.relay_port_max) == (61000, 65535)
    assert spec.secret_key == "secret"
    assert spec.denied_peers == []  # added to the built-in ranges (see test_render)
    assert spec.allowed_peers == []
    assert spec.scaling.targets == {"allocationsPerRelay": 400.0}
    assert spec.scaling.scale_up.pods == 4 and spec.scaling.scale_up.percent == 100
    assert spec.scaling.scale_down.stabilization_window_seconds == 300
    assert spec.scaling.tolerance == pytest.approx(0.1)
    assert spec.cpu_cores == 1.0


CEL_CASES = [
    ({"replicas": {"min": 3, "max": 2, "target": 2}},
     "spec: Invalid value: spec.replicas.min must be less than or equal to spec.replicas.max"),
    ({"replicas": {"min": 1, "max": 2, "target": 5}},
     "spec: Invalid value: spec.replicas.target must lie between spec.replicas.min and "
     "spec.replicas.max"),
    ({"relayPorts": {"min": 20000, "max": 10000}},
     "spec: Invalid value: spec.relayPorts.min must be less than or equal to "
     "spec.relayPorts.max"),
    ({"relayPorts": {"min": 30000, "max": 40000}},
     "spec: Invalid value: spec.relayPorts must not overlap the kernel's ephemeral port range "
     "32768-60999 (coturn loops on bind errors there)"),
    ({"relayPorts": {"min": 3000, "max": 4000}},
     "spec: Invalid value: spec.listeners ports must lie outside spec.relayPorts"),
    ({"listeners": {"udp": 3478, "tcp": 3478, "tls": 3478}},
     "spec: Invalid value: spec.listeners.tls must differ from the udp and tcp ports"),
    ({"relayPorts": {"min": 10000, "max": 10099}},
     "spec: Invalid value: spec.relayPorts is smaller than "
     "spec.scaling.targets.allocationsPerRelay: each allocation needs one relay port"),
    ({"security": {"userQuota": 50, "totalQuota": 10}},
     "spec: Invalid value: spec.security.userQuota must not exceed spec.security.totalQuota"),
    ({"exposure": {"type": "LoadBalancer", "externalIP": "203.0.113.7\ncli-ip=0.0.0.0"}},
     "spec.exposure.externalIP: Invalid value: spec.exposure.externalIP must be an IP "
     "address"),
    ({"security": {"deniedPeerCIDRs": ["10.0.0.0/8", "not-a-cidr"]}},
     "spec.security.deniedPeerCIDRs: Invalid value: spec.security.deniedPeerCIDRs entries "
     "must be CIDR networks like 10.0.0.0/8"),
]


@pytest.mark.parametrize(("spec", "message"), CEL_CASES)
def test_cel_rules_reject_with_exact_message(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as info:
        turnpool_from_object(pool(**spec))
    assert str(info.value) == message


@pytest.mark.parametrize(("spec", "message"), [
    ({"replicas": {"min": 0}}, "spec.replicas.min: should be greater than or equal to 1"),
    ({"exposure": {"type": "Ingress"}},
     'spec.exposure.type: unsupported value \'Ingress\': supported values: "hostNetwork", '
     '"LoadBalancer", "NodePort"'),
    ({"replicas": {"min": "two"}}, "spec.replicas.min: must be an integer, got str 'two'"),
    ({"bogus": 1}, "spec.bogus: unknown field"),
    ({"realm": "example.org\nallow-loopback-peers"},
     "spec.realm: 'example.org\\nallow-loopback-peers' should match '^[!-~]+$'"),
    ({"resources": {"cpu": "lots"}},
     "spec.resources.cpu: 'lots' is not a CPU quantity like 500m or 2"),
    ({"resources": {"cpu": "1_000"}},
     "spec.resources.cpu: '1_000' is not a CPU quantity like 500m or 2"),
    ({"resources": {"cpu": " 1"}},
     "spec.resources.cpu: ' 1' is not a CPU quantity like 500m or 2"),
    ({"resources": {"cpu": "1", "memory": "lots"}},
     "spec.resources.memory: 'lots' is not a quantity like 256Mi or 1Gi"),
])
def test_schema_errors_name_the_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as info:
        turnpool_from_object(pool(**spec))
    assert str(info.value) == message


def test_required_fields() -> None:
    obj = pool()
    del obj["spec"]["authSecretRef"]
    with pytest.raises(SpecError, match=r"^spec.authSecretRef: Required value$"):
        turnpool_from_object(obj)
    obj = pool()
    obj["kind"] = "LoadRun"
    with pytest.raises(SpecError, match=r"^kind: must be TurnPool, got 'LoadRun'$"):
        turnpool_from_object(obj)


def test_valid_edge_cases_pass() -> None:
    # Relay range ending right below the ephemeral range; TLS on its own port.
    spec = turnpool_from_object(pool(relayPorts={"min": 20000, "max": 32767},
                                     listeners={"udp": 3478, "tcp": 0, "tls": 5349},
                                     resources={"cpu": "500m"}))
    assert spec.relay_port_count == 12768
    assert spec.cpu_cores == 0.5


def test_loadrun_target_needs_exactly_one_of_pool_or_uris() -> None:
    base = {"apiVersion": "turnstorm.io/v1alpha1", "kind": "LoadRun",
            "metadata": {"name": "l"}, "spec": {"durationSeconds": 60, "target": {}}}
    with pytest.raises(SpecError) as info:
        validate("LoadRun", base)
    assert str(info.value) == ("spec.target: Invalid value: spec.target needs exactly one of "
                               "poolRef or uris")
    ok = copy.deepcopy(base)
    ok["spec"]["target"] = {"poolRef": {"name": "p"}}
    assert validate("LoadRun", ok)["spec"]["shape"]["name"] == "steady"

"""TurnPool and LoadRun specs: the CRD schemas in ``crds/`` are the single source of truth.

This module applies the schemas' defaults, checks the same rules the apiserver enforces
(types, enums, minimum/maximum, and each CEL rule with the same message), and turns a
defaulted spec into typed dataclasses. Every node's type is checked before it is read,
``metadata``'s too, so a value of any type gets a :class:`SpecError` naming its field.
The local mode uses it for scenario files, so an invalid file gets the message ``kubectl
apply`` would give.
"""

from __future__ import annotations

import copy
import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import yaml

from turnstorm.errors import TurnstormError

GROUP = "turnstorm.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CRD_FILES = {"TurnPool": "turnpools.yaml", "LoadRun": "loadruns.yaml"}


class SpecError(TurnstormError):
    """A TurnPool/LoadRun that the apiserver would reject."""


@cache
def crd(kind: str) -> dict[str, Any]:
    text = resources.files("turnstorm").joinpath("crds", CRD_FILES[kind]).read_text("utf8")
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def schema(kind: str) -> dict[str, Any]:
    version = crd(kind)["spec"]["versions"][0]
    result: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return result


# -- structural defaulting and validation --------------------------------------------------

def apply_defaults(value: Any, node: dict[str, Any]) -> Any:
    """Fill defaults like the apiserver: a missing property with a default gets it, then
    defaulting recurses into it."""
    if node.get("type") == "object" and isinstance(value, dict):
        for name, child in node.get("properties", {}).items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                value[name] = apply_defaults(value[name], child)
    elif node.get("type") == "array" and isinstance(value, list) and "items" in node:
        value = [apply_defaults(item, node["items"]) for item in value]
    return value


INT64 = (-(2**63), 2**63 - 1)
"""The apiserver's integers are 64-bit."""

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}

METADATA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "x-kubernetes-preserve-unknown-fields": True,
    "properties": {
        "name": {"type": "string", "nullable": True},
        "namespace": {"type": "string", "nullable": True},
        "labels": {"type": "object", "nullable": True,
                   "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "nullable": True,
                        "additionalProperties": {"type": "string"}},
    },
}
"""The fields of ``metadata`` (Kubernetes' ObjectMeta, which a CRD's schema leaves out)
that turnstorm reads, with the types the apiserver gives them; null reads as unset."""


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for a message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def field_path(path: str, name: str) -> str:
    """``path.name`` for a message; a name that is not plain printable text (empty,
    holding a line break, very long) is quoted: ``path['a\\nb']``."""
    if name and name.isprintable() and len(name) <= 63:
        return f"{path}.{name}"
    return f"{path}[{shown(name)}]"


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def _check_type(value: Any, kind: str, path: str) -> None:
    """The JSON type ``kind`` of the schema: a YAML value of another type, a number JSON
    cannot carry (NaN, infinity) or an integer over 64 bits is refused here."""
    if not _TYPES[kind](value):
        raise SpecError(f"{path}: must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, "
                        f"got {type(value).__name__} {shown(value)}")
    if kind == "number" and not _finite(value):
        raise SpecError(f"{path}: must be a finite number, got {shown(value)}")
    if kind == "integer" and not INT64[0] <= value <= INT64[1]:
        raise SpecError(f"{path}: must be a 64-bit integer, got {shown(value)}")
    if isinstance(value, dict):
        for name in value:
            if not isinstance(name, str):
                raise SpecError(f"{path}: field names must be strings, got "
                                f"{type(name).__name__} {shown(name)}")


def check_schema(value: Any, node: dict[str, Any], path: str) -> None:
    """Raise :class:`SpecError` naming the field for the first schema violation."""
    kind = node.get("type")
    if value is None and node.get("nullable"):
        return
    if node.get("x-kubernetes-int-or-string"):
        if not isinstance(value, int | str) or isinstance(value, bool):
            raise SpecError(f"{path}: must be an integer or a string")
        if isinstance(value, int):
            _check_type(value, "integer", path)
        return
    if kind:
        _check_type(value, kind, path)
    if "enum" in node and value not in node["enum"]:
        raise SpecError(f"{path}: unsupported value {shown(value)}: supported values: "
                        + ", ".join(f'"{v}"' for v in node["enum"]))
    if "minimum" in node and value < node["minimum"]:
        raise SpecError(f"{path}: should be greater than or equal to {node['minimum']}")
    if "maximum" in node and value > node["maximum"]:
        raise SpecError(f"{path}: should be less than or equal to {node['maximum']}")
    if kind == "string":
        if len(value) < node.get("minLength", 0):
            raise SpecError(f"{path}: should be at least {node['minLength']} chars long")
        if "maxLength" in node and len(value) > node["maxLength"]:
            raise SpecError(f"{path}: may not be more than {node['maxLength']} bytes")
        if "pattern" in node and not re.search(node["pattern"], value):
            raise SpecError(f"{path}: {value!r} should match '{node['pattern']}'")
    if kind == "object":
        props = node.get("properties", {})
        for name in node.get("required", []):
            if name not in value:
                raise SpecError(f"{path}.{name}: Required value")
        extra = node.get("additionalProperties")
        for name, child in value.items():
            if name in props:
                check_schema(child, props[name], f"{path}.{name}")
            elif isinstance(extra, dict):
                check_schema(child, extra, field_path(path, name))
            elif not node.get("x-kubernetes-preserve-unknown-fields"):
                raise SpecError(f"{field_path(path, name)}: unknown field")
    if kind == "array":
        if "maxItems" in node and len(value) > node["maxItems"]:
            raise SpecError(f"{path}: must have at most {node['maxItems']} items")
        if len(value) < node.get("minItems", 0):
            raise SpecError(f"{path}: must have at least {node['minItems']} items")
        for index, item in enumerate(value):
            check_schema(item, node.get("items", {}), f"{path}[{index}]")
    for rule in node.get("x-kubernetes-validations", []):
        check = CEL_RULES.get(rule["rule"])
        if check is None:
            raise SpecError(f"internal: no local check for CEL rule {rule['rule']!r}")
        if not check(value):
            raise SpecError(f"{path}: Invalid value: {rule['message']}")


def _is_cidr(text: str) -> bool:
    if "/" not in text:
        return False
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError:
        return False
    return True


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _listener_ports_outside(s: dict[str, Any]) -> bool:
    ports = [s["listeners"]["udp"], s["listeners"]["tcp"], s["listeners"].get("tls", 0)]
    lo, hi = s["relayPorts"]["min"], s["relayPorts"]["max"]
    return all(p == 0 or p < lo or p > hi for p in ports)


# Every CEL rule in crds/*.yaml, by its exact text, with an equivalent Python check.
# tests/unit/test_spec.py proves each rule has one and that both agree.
CEL_RULES: dict[str, Callable[[Any], bool]] = {
    "isIP(self)": _is_ip,
    "self.replicas.min <= self.replicas.max":
        lambda s: s["replicas"]["min"] <= s["replicas"]["max"],
    "self.replicas.target >= self.replicas.min && self.replicas.target <= self.replicas.max":
        lambda s: s["replicas"]["min"] <= s["replicas"]["target"] <= s["replicas"]["max"],
    "self.relayPorts.min <= self.relayPorts.max":
        lambda s: s["relayPorts"]["min"] <= s["relayPorts"]["max"],
    "self.relayPorts.max < 32768 || self.relayPorts.min > 60999":
        lambda s: s["relayPorts"]["max"] < 32768 or s["relayPorts"]["min"] > 60999,
    "[self.listeners.udp, self.listeners.tcp, has(self.listeners.tls) ? self.listeners.tls : 0]"
    ".all(p, p == 0 || p < self.relayPorts.min || p > self.relayPorts.max)":
        _listener_ports_outside,
    "!has(self.listeners.tls) || (self.listeners.tls != self.listeners.udp && "
    "self.listeners.tls != self.listeners.tcp)":
        lambda s: "tls" not in s["listeners"] or s["listeners"]["tls"] not in (
            s["listeners"]["udp"], s["listeners"]["tcp"]),
    "!has(self.scaling.targets.allocationsPerRelay) || self.relayPorts.max - "
    "self.relayPorts.min + 1 >= self.scaling.targets.allocationsPerRelay":
        lambda s: "allocationsPerRelay" not in s["scaling"]["targets"]
        or s["relayPorts"]["max"] - s["relayPorts"]["min"] + 1
        >= s["scaling"]["targets"]["allocationsPerRelay"],
    "self.security.userQuota <= self.security.totalQuota":
        lambda s: s["security"]["userQuota"] <= s["security"]["totalQuota"],
    "self.all(c, isCIDR(c))": lambda items: all(_is_cidr(c) for c in items),
    "has(self.poolRef) != has(self.uris)": lambda t: ("poolRef" in t) != ("uris" in t),
}


def validate(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """Default and validate a whole object (apiVersion, kind, metadata, spec); returns the
    defaulted copy. Field paths in errors start at ``spec``."""
    if obj.get("apiVersion") != API_VERSION:
        raise SpecError(f"apiVersion: must be {API_VERSION}, got "
                        f"{shown(obj.get('apiVersion'))}")
    if obj.get("kind") != kind:
        raise SpecError(f"kind: must be {kind}, got {shown(obj.get('kind'))}")
    metadata = obj.get("metadata")
    if metadata is not None:
        check_schema(metadata, METADATA_SCHEMA, "metadata")
    if not (metadata or {}).get("name"):
        raise SpecError("metadata.name: Required value")
    root = schema(kind)
    spec_schema = root["properties"]["spec"]
    if "spec" not in obj:
        raise SpecError("spec: Required value")
    spec = apply_defaults(copy.deepcopy(obj["spec"]), spec_schema)
    check_schema(spec, spec_schema, "spec")
    result = copy.deepcopy(obj)
    result["spec"] = spec
    return result


def load_documents(text: str, path: str) -> list[Any]:
    """The YAML documents of a file (empty ones left out); :class:`SpecError` names the
    file and the line of a syntax error."""
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SpecError(f"{path}: not valid YAML{where}: {first}") from None
    except ValueError as exc:  # a timestamp of no calendar, e.g. 2026-02-30
        raise SpecError(f"{path}: not valid YAML: {exc}") from None


# -- typed view ------------------------------------------------------------------------------

QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?([numkMGTPE]|[KMGTPE]i|[eE][+-]?[0-9]+)?$")
"""A Kubernetes resource quantity (unsigned: requests and limits are never negative)."""


def check_quantity(path: str, text: str, example: str) -> None:
    """Raise :class:`SpecError` unless ``text`` is a quantity the apiserver takes."""
    if not QUANTITY.match(text):
        raise SpecError(f"{path}: {text!r} is not a quantity like {example}")


def parse_quantity_cpu(text: str) -> float:
    """Kubernetes CPU quantity to cores: ``500m`` -> 0.5, ``2`` -> 2.0."""
    if not QUANTITY.match(text):
        raise SpecError(f"spec.resources.cpu: {text!r} is not a CPU quantity like 500m or 2")
    try:
        if text.endswith("m"):
            return int(text[:-1]) / 1000
        value = float(text)
    except ValueError:
        raise SpecError(f"spec.resources.cpu: {text!r} is not a CPU quantity like 500m or 2"
                        ) from None
    if not math.isfinite(value) or value <= 0:
        raise SpecError(f"spec.resources.cpu: {text!r} must be positive")
    return value


@dataclass
class ScalingBehavior:
    stabilization_window_seconds: int
    percent: int
    pods: int
    period_seconds: int


@dataclass(frozen=True)
class VerticalScaling:
    """In-place CPU resizing of single relays (``spec.scaling.vertical``): factors of
    ``spec.resources.cpu``."""

    enabled: bool = False
    max_factor: float = 1.5
    """A relay in rotation over its allocation target gets up to this much CPU."""
    min_factor: float = 0.25
    """A draining relay's CPU shrinks with its calls, never below this."""
    step: float = 0.25
    """Factors are multiples of this."""


@dataclass
class ScalingPolicy:
    enabled: bool
    tolerance: float
    targets: dict[str, float]
    scale_up: ScalingBehavior
    scale_down: ScalingBehavior
    drain_deadline_seconds: int
    storm_enabled: bool = True
    lookahead_seconds: float = 30.0
    port_headroom: float = 0.9
    slope_window_seconds: float = 30.0
    placement: str = "spread"
    """``pack`` or ``spread``: where new allocations land (see :mod:`turnstorm.policy`)."""
    pack_headroom: float = 0.5
    """``pack`` through rotation labels: free room kept in rotation, in relays' targets."""
    vertical: VerticalScaling = field(default_factory=VerticalScaling)

    @property
    def pack_fill(self) -> float | None:
        """Allocations a relay is filled to before the next one takes new calls
        (``pack``: the ``allocationsPerRelay`` target), else None (spread)."""
        if self.placement != "pack":
            return None
        return self.targets.get("allocationsPerRelay")


@dataclass
class TurnPoolSpec:
    """Typed, defaulted TurnPool spec (field docs live in the CRD schema)."""

    name: str
    namespace: str
    image: str
    min_replicas: int
    max_replicas: int
    target_replicas: int
    udp_port: int
    tcp_port: int
    tls_port: int | None
    relay_port_min: int
    relay_port_max: int
    exposure: str
    external_ip: str | None
    realm: str
    secret_name: str
    secret_key: str
    denied_peers: list[str]
    allowed_peers: list[str]
    user_quota: int
    total_quota: int
    max_bps: int
    cpu: str
    memory: str
    scaling: ScalingPolicy
    metrics_source: str
    prometheus_url: str | None
    interval_seconds: int
    exporter_port: int
    service_monitor: bool
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def cpu_cores(self) -> float:
        return parse_quantity_cpu(self.cpu)

    @property
    def relay_port_count(self) -> int:
        return self.relay_port_max - self.relay_port_min + 1


def turnpool_from_object(obj: dict[str, Any]) -> TurnPoolSpec:
    """Validate (with defaults) and convert a TurnPool object."""
    return turnpool_from_checked(validate("TurnPool", obj))


def turnpool_from_checked(checked: dict[str, Any]) -> TurnPoolSpec:
    """Convert a TurnPool that :func:`validate` returned."""
    s = checked["spec"]
    meta = checked["metadata"]
    sc = s["scaling"]

    def behavior(b: dict[str, Any]) -> ScalingBehavior:
        return ScalingBehavior(b["stabilizationWindowSeconds"], b["percent"], b.get("pods", 0),
                               b["periodSeconds"])

    spec = TurnPoolSpec(
        name=meta["name"],
        namespace=meta.get("namespace") or "default",
        image=s["image"],
        min_replicas=s["replicas"]["min"],
        max_replicas=s["replicas"]["max"],
        target_replicas=s["replicas"]["target"],
        udp_port=s["listeners"]["udp"],
        tcp_port=s["listeners"]["tcp"],
        tls_port=s["listeners"].get("tls"),
        relay_port_min=s["relayPorts"]["min"],
        relay_port_max=s["relayPorts"]["max"],
        exposure=s["exposure"]["type"],
        external_ip=s["exposure"].get("externalIP"),
        realm=s["realm"],
        secret_name=s["authSecretRef"]["name"],
        secret_key=s["authSecretRef"]["key"],
        denied_peers=list(s["security"]["deniedPeerCIDRs"]),
        allowed_peers=list(s["security"]["allowedPeerCIDRs"]),
        user_quota=s["security"]["userQuota"],
        total_quota=s["security"]["totalQuota"],
        max_bps=s["security"]["maxBps"],
        cpu=s["resources"]["cpu"],
        memory=s["resources"]["memory"],
        scaling=ScalingPolicy(
            enabled=sc["enabled"],
            tolerance=float(sc["tolerance"]),
            targets={k: float(v) for k, v in sc["targets"].items()},
            scale_up=behavior(sc["scaleUp"]),
            scale_down=behavior(sc["scaleDown"]),
            drain_deadline_seconds=sc["drainDeadlineSeconds"],
            storm_enabled=sc["storm"]["enabled"],
            lookahead_seconds=float(sc["storm"]["lookaheadSeconds"]),
            port_headroom=sc["storm"]["portHeadroomPercent"] / 100,
            slope_window_seconds=float(sc["storm"]["slopeWindowSeconds"]),
            placement=sc["placement"]["mode"],
            pack_headroom=sc["placement"]["headroomPercent"] / 100,
            vertical=VerticalScaling(
                enabled=sc["vertical"]["enabled"],
                max_factor=sc["vertical"]["maxPercent"] / 100,
                min_factor=sc["vertical"]["minPercent"] / 100,
                step=sc["vertical"]["stepPercent"] / 100,
            ),
        ),
        metrics_source=s["metrics"]["source"],
        prometheus_url=s["metrics"].get("prometheusURL"),
        interval_seconds=s["metrics"]["intervalSeconds"],
        exporter_port=s["metrics"]["exporterPort"],
        service_monitor=s["metrics"]["serviceMonitor"],
        labels=dict(meta.get("labels") or {}),
    )
    spec.cpu_cores  # noqa: B018 - validates the quantity early
    check_quantity("spec.resources.memory", spec.memory, "256Mi or 1Gi")
    return spec

"""Scenario files: one TurnPool and one LoadRun in a multi-document YAML file.

Both documents use the CRD schemas (:mod:`turnstorm.spec` applies the same defaults and
rules as the apiserver, CEL messages included), so a scenario that runs locally applies
unchanged to a cluster. The LoadRun must target the TurnPool of the same file
(``spec.target.poolRef.name``).

Local-mode knobs that have no place in the CRDs are annotations (ignored by the
operator):

``turnstorm.io/session-length`` (LoadRun)
    call length of the TURN users: ``fixed:S``, ``uniform:A-B`` or ``exp:MEAN`` seconds
    (default ``uniform:10-30``).
``turnstorm.io/binding-interval`` (LoadRun)
    seconds between the Binding requests of one STUN user of ``spec.mix.binding``
    (default 1).
``turnstorm.io/cgnat`` (LoadRun)
    ``"off"`` runs the subscribers without the emulated CGNAT of ``spec.cgnat``.
``turnstorm.io/time-scale`` (TurnPool)
    how much faster the autoscaler's clock runs than the wall clock (default 10; see
    :class:`LocalTiming`). ``turnstorm run --time-scale`` overrides it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from turnstorm.errors import TurnstormError
from turnstorm.loadgen.config import ConfigError, SessionLength
from turnstorm.spec import (
    SpecError,
    TurnPoolSpec,
    field_path,
    load_documents,
    shown,
    turnpool_from_checked,
    validate,
)

ANNOTATION_PREFIX = "turnstorm.io/"
DEFAULT_TIME_SCALE = 10.0
DEFAULT_SESSION = "uniform:10-30"
MIN_INTERVAL = 1.0
MAX_INTERVAL = 2.0
SHAPE_USER_PARAM = {"steady": "users", "reconnect-storm": "users", "ramp": "end_users",
                    "flash-crowd": "peak_users", "diurnal": "max_users"}
"""The shape parameter that ``spec.users`` (peak subscribers) fills when it is not given."""


class ScenarioError(TurnstormError):
    """A scenario file that cannot be run; the message names the file and the field."""


@dataclass(frozen=True)
class LocalTiming:
    """How the TurnPool's timings map onto a short local demo.

    The policy engine is unchanged; only its clock runs ``time_scale`` times faster than
    the wall clock. A scale-up period of 15 s becomes 1.5 s, a 300 s scale-down
    stabilization window 30 s, a 900 s drain deadline 90 s and the storm lookahead of
    30 s 3 s. Signals are read and the policy evaluated every
    ``metrics.intervalSeconds / time_scale`` seconds, kept within 1-2 s.
    """

    time_scale: float
    interval_seconds: float

    @classmethod
    def for_pool(cls, pool: TurnPoolSpec, time_scale: float) -> LocalTiming:
        interval = min(MAX_INTERVAL, max(MIN_INTERVAL, pool.interval_seconds / time_scale))
        return cls(time_scale, interval)

    def local(self, seconds: float) -> float:
        """Wall-clock seconds of a scenario duration."""
        return seconds / self.time_scale


@dataclass
class LoadPlan:
    """The LoadRun, read for the local generator."""

    name: str
    shape: str
    shape_params: dict[str, float]
    users: int
    turn_weight: int
    binding_weight: int
    session: SessionLength
    binding_interval: float
    cgnat: tuple[int, int, float] | None
    """(gateways, port quota, mapping timeout) or None."""
    duration: float
    max_pps: float
    workers: int


@dataclass
class Scenario:
    path: str
    pool: TurnPoolSpec
    load: LoadPlan
    time_scale: float
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The defaulted TurnPool and LoadRun objects, by kind."""

    def timing(self, time_scale: float | None = None) -> LocalTiming:
        return LocalTiming.for_pool(self.pool, time_scale or self.time_scale)


def _annotation(obj: dict[str, Any], key: str) -> str | None:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(ANNOTATION_PREFIX + key)
    return None if value is None else str(value)


def _number(text: str, where: str, minimum: float = 0.0) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SpecError(f"{where}: {shown(text)} is not a number") from None
    if not math.isfinite(value) or value <= minimum:
        raise SpecError(f"{where}: must be a number greater than {minimum:g}")
    return value


def _load_plan(checked: dict[str, Any], pool_name: str) -> LoadPlan:
    """The LoadRun that :func:`~turnstorm.spec.validate` returned, read for the local
    generator."""
    spec = checked["spec"]
    target = spec["target"]
    if "poolRef" not in target or target["poolRef"]["name"] != pool_name:
        raise SpecError(f"spec.target.poolRef.name: the local mode loads the TurnPool of the "
                        f"same file: set it to {pool_name!r}")
    mix = spec["mix"]
    if mix["ice"]:
        raise SpecError("spec.mix.ice: the local mode runs TURN and Binding users only: set "
                        "it to 0")
    if mix["binding"] + mix["turnSession"] <= 0:
        raise SpecError("spec.mix: binding + turnSession must be more than 0")
    params: dict[str, float] = {}
    for key, value in (spec["shape"].get("params") or {}).items():
        params[key.replace("-", "_")] = _number(str(value),
                                                field_path("spec.shape.params", key), -1)
    shape = spec["shape"]["name"]
    user_param = SHAPE_USER_PARAM.get(shape)
    if user_param is not None:
        params.setdefault(user_param, float(spec["users"]))
    annotation = "metadata.annotations." + ANNOTATION_PREFIX
    session_text = _annotation(checked, "session-length") or DEFAULT_SESSION
    try:
        session = SessionLength.parse(session_text)
    except ConfigError as exc:
        raise SpecError(f"{annotation}session-length: {exc}") from None
    interval_text = _annotation(checked, "binding-interval")
    interval = (_number(interval_text, f"{annotation}binding-interval")
                if interval_text is not None else 1.0)
    cgnat = spec["cgnat"]
    cgnat_off = (_annotation(checked, "cgnat") or "").lower() in ("off", "false", "no")
    return LoadPlan(
        name=checked["metadata"]["name"], shape=shape, shape_params=params,
        users=spec["users"], turn_weight=mix["turnSession"], binding_weight=mix["binding"],
        session=session, binding_interval=interval,
        cgnat=None if cgnat_off else (cgnat["gateways"], cgnat["portQuota"],
                                      float(cgnat["mappingTimeoutSeconds"])),
        duration=float(spec["durationSeconds"]), max_pps=float(spec["limits"]["maxPps"]),
        workers=spec["workers"])


def _name(document: dict[str, Any]) -> str:
    """The document's metadata.name for a message, "?" where there is none to show."""
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return name if isinstance(name, str) and name else "?"


def parse_scenario(text: str, path: str = "<scenario>") -> Scenario:
    """Validate a scenario; :class:`ScenarioError` names the file, the kind and the field."""
    try:
        documents = load_documents(text, path)
    except SpecError as exc:
        raise ScenarioError(str(exc)) from None
    return scenario_from_documents(documents, path)


def scenario_from_documents(documents: list[Any], path: str = "<scenario>") -> Scenario:
    """:func:`parse_scenario` after the YAML: ``documents`` as ``yaml.safe_load_all`` gives
    them (empty ones left out). Every node is checked against the CRD schemas before it
    is read, so any value of any type gets a :class:`ScenarioError` naming its field."""
    by_kind: dict[str, dict[str, Any]] = {}
    for index, document in enumerate(documents):
        if not isinstance(document, dict):
            raise ScenarioError(f"{path}: document {index + 1}: must be a mapping with "
                                "apiVersion, kind, metadata and spec")
        kind = document.get("kind")
        if kind not in ("TurnPool", "LoadRun"):
            raise ScenarioError(f"{path}: document {index + 1}: kind: must be TurnPool or "
                                f"LoadRun, got {shown(kind)}")
        if kind in by_kind:
            raise ScenarioError(f"{path}: kind: exactly one {kind} per scenario file")
        by_kind[kind] = document
    for kind in ("TurnPool", "LoadRun"):
        if kind not in by_kind:
            raise ScenarioError(f"{path}: kind: a {kind} document is missing")
    kind = "TurnPool"
    try:
        checked = {"TurnPool": validate("TurnPool", by_kind["TurnPool"])}
        pool = turnpool_from_checked(checked["TurnPool"])
        scale_text = _annotation(checked["TurnPool"], "time-scale")
        time_scale = (_number(scale_text, "metadata.annotations."
                              f"{ANNOTATION_PREFIX}time-scale")
                      if scale_text is not None else DEFAULT_TIME_SCALE)
        kind = "LoadRun"
        checked["LoadRun"] = validate("LoadRun", by_kind["LoadRun"])
        load = _load_plan(checked["LoadRun"], pool.name)
    except SpecError as exc:
        raise ScenarioError(f"{path}: {kind} {_name(by_kind[kind])}: {exc}") from None
    return Scenario(path, pool, load, time_scale, checked)


def load_scenario(path: str) -> Scenario:
    try:
        with open(path, encoding="utf8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc.strerror or exc}") from None
    return parse_scenario(text, path)

"""The pool's relay pods as the autoscaler sees them: plain views of the pod objects.

Pure (no API calls): the annotations and labels the autoscaler writes, read back, and the
relay container's CPU as a factor of the pool's.
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass
from typing import Any

from turnstorm.operator.render import (
    RELAY_CONTAINER,
    ROTATION_DRAINING,
    ROTATION_LABEL,
    ROTATION_STANDBY,
)
from turnstorm.spec import SpecError, TurnPoolSpec, parse_quantity_cpu

DRAIN_STARTED = "turnstorm.io/drain-started"
REMOVED_AT = "turnstorm.io/removed-at"
REMOVE_GRACE_SECONDS = 30.0
"""After lowering replicas, the ReplicaSet should delete the removed relay. It ranks
not-ready pods before deletion cost, so if the removed relay still exists after this
grace the operator deletes it itself (replicas already count it out)."""
DRAINING_COST = "-1000000"
REMOVED_COST = "-2147483648"
"""Lower than any draining relay's: of the pods it may delete, the ReplicaSet picks the
removed ones, not a draining relay that still carries calls (both would otherwise tie)."""


@dataclass
class PodView:
    name: str
    ip: str | None
    ready: bool
    draining: bool
    drain_started: float | None
    deleting: bool
    removed_at: float | None = None
    created: float | None = None
    standby: bool = False
    cpu: float | None = None
    """The relay container's CPU limit (cores), as the pod spec has it now."""
    cpu_applied: float | None = None
    """The same limit as the kubelet reports it applied (``status.containerStatuses``);
    None when not reported."""


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def iso(ts: float) -> str:
    """A UNIX time as the API's timestamps (RFC 3339, UTC, whole seconds)."""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_views(pods: list[dict[str, Any]]) -> list[PodView]:
    views = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        labels = meta.get("labels") or {}
        annotations = meta.get("annotations") or {}
        conditions = status.get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        cpu = _relay_cpu((pod.get("spec") or {}).get("containers"))
        applied = _relay_cpu(status.get("containerStatuses"))
        views.append(PodView(
            name=meta["name"], ip=status.get("podIP"), ready=ready,
            draining=labels.get(ROTATION_LABEL) == ROTATION_DRAINING,
            drain_started=parse_time(annotations.get(DRAIN_STARTED)),
            deleting=bool(meta.get("deletionTimestamp")),
            removed_at=parse_time(annotations.get(REMOVED_AT)),
            created=parse_time(meta.get("creationTimestamp")),
            standby=labels.get(ROTATION_LABEL) == ROTATION_STANDBY,
            cpu=cpu, cpu_applied=applied,
        ))
    return sorted(views, key=lambda v: v.name)


def _relay_cpu(containers: list[dict[str, Any]] | None) -> float | None:
    """The relay container's CPU limit in cores from pod spec containers or container
    statuses (both carry ``name`` and ``resources``), or None."""
    for container in containers or []:
        limit = ((container.get("resources") or {}).get("limits") or {}).get("cpu")
        if container.get("name") == RELAY_CONTAINER and limit is not None:
            with contextlib.suppress(SpecError):
                return parse_quantity_cpu(str(limit))
    return None


def cpu_factor(spec: TurnPoolSpec, view: PodView) -> float:
    """The relay's CPU as a factor of ``spec.resources.cpu`` (1 when unknown), snapped to
    the factor it was resized to: a resize is written in whole millicores, so 125 % of
    250m reads back as 312m, which must still count as 125 %."""
    if view.cpu is None or spec.cpu_cores <= 0:
        return 1.0
    factor = view.cpu / spec.cpu_cores
    vertical = spec.scaling.vertical
    candidates = [1.0, vertical.min_factor, vertical.max_factor,
                  round(factor / vertical.step) * vertical.step]
    for candidate in candidates:
        if millicores(spec.cpu_cores * candidate) == millicores(view.cpu):
            return candidate
    return round(factor, 6)


def millicores(cores: float) -> str:
    return f"{max(1, round(cores * 1000))}m"

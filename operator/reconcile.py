"""Reconcile a TurnPool: plain data in, API calls through :class:`Kube`, a status patch
and events out. No kopf here; handlers adapt these functions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from turnstorm.coturnconf import RelayConfigError
from turnstorm.operator import render
from turnstorm.operator.events import Event
from turnstorm.operator.kube import Kube, Rejected, random_password
from turnstorm.operator.pods import iso, pod_views
from turnstorm.operator.scaling import back_in_rotation
from turnstorm.spec import SpecError, TurnPoolSpec, turnpool_from_object


@dataclass
class Outcome:
    """What one reconcile decided: a status patch, events, and whether to retry later."""

    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    retry_after: float | None = None
    changed: list[str] = field(default_factory=list)


def now_iso() -> str:
    return iso(time.time())


def condition(type_: str, ok: bool | None, reason: str, message: str, generation: int,
              previous: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    transition = now_iso()
    for old in previous or []:
        if old.get("type") == type_ and old.get("status") == status:
            transition = old.get("lastTransitionTime", transition)
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": transition, "observedGeneration": generation}


def desired_replicas(spec: TurnPoolSpec, status: dict[str, Any]) -> int:
    """Relays in rotation: the autoscaler's current decision when there is one, else the
    spec's target; always inside [min, max]."""
    wanted = spec.target_replicas
    if spec.scaling.enabled and isinstance(status.get("desiredReplicas"), int):
        wanted = status["desiredReplicas"]
    return max(spec.min_replicas, min(spec.max_replicas, wanted))


def deployment_replicas(spec: TurnPoolSpec, status: dict[str, Any]) -> int:
    """Pods the Deployment keeps: relays in rotation plus those still draining in
    rotation's stead (a deleted relay draining in its preStop hook is no longer one)."""
    draining = (status.get("drainingRelays") or []) if spec.scaling.enabled else []
    return desired_replicas(spec, status) + sum(1 for d in draining if not d.get("deleted"))


def reconcile_pool(kube: Kube, body: dict[str, Any], exporter_image: str) -> Outcome:
    """Render and apply every object the pool owns; report readiness."""
    meta = body["metadata"]
    generation = int(meta.get("generation", 0))
    old_status = body.get("status") or {}
    previous = old_status.get("conditions") or []
    outcome = Outcome()
    try:
        spec = turnpool_from_object(body)
    except SpecError as exc:
        # The apiserver's schema catches most of this; a value it cannot check lands here.
        outcome.status = {"observedGeneration": generation, "conditions": [
            condition("Ready", False, "InvalidSpec", str(exc), generation, previous)]}
        outcome.events.append(Event("Warning", "InvalidSpec", str(exc)))
        return outcome

    present = kube.secret_has_key(spec.namespace, spec.secret_name, spec.secret_key)
    if not present:
        what = ("does not exist" if present is None
                else f"has no key {spec.secret_key!r}")
        message = (f"auth Secret {spec.secret_name!r} {what}; create it with "
                   f"kubectl create secret generic {spec.secret_name} "
                   f"--from-literal={spec.secret_key}=...")
        reason = "SecretMissing"
        outcome.status = {"observedGeneration": generation, "conditions": [
            condition("Ready", False, reason, message, generation, previous)]}
        if not any(c.get("reason") == reason and c.get("message") == message
                   for c in previous):
            outcome.events.append(Event("Warning", reason, message))
        outcome.retry_after = 30.0
        return outcome

    owner = owner_reference(body)
    cli = render.cli_secret(spec, random_password())
    cli["metadata"]["ownerReferences"] = [owner]
    if kube.ensure_secret(cli):
        outcome.changed.append(f"Secret/{cli['metadata']['name']}")

    replicas = desired_replicas(spec, old_status)
    pods = deployment_replicas(spec, old_status)
    current = kube.get("apps/v1", "Deployment", spec.namespace, spec.name)
    if spec.scaling.enabled and current is not None:
        # Never fewer pods than now: a lower max (or a stale status) is reached by the
        # autoscaler draining relays, not by the ReplicaSet deleting relays with calls.
        pods = max(pods, int(current.get("spec", {}).get("replicas") or 0))
    try:
        applied = _apply_pool(kube, spec, owner, pods, exporter_image, outcome,
                              {("Deployment", spec.name): current})
    except (RelayConfigError, Rejected) as exc:
        # a value the CRD schema lets through but the relay config or the apiserver's
        # Deployment schema does not: report it on the pool, do not retry in a loop
        message = str(exc)
        outcome.status = {"observedGeneration": generation, "conditions": [
            condition("Ready", False, "InvalidSpec", message, generation, previous)]}
        if not any(c.get("reason") == "InvalidSpec" and c.get("message") == message
                   for c in previous):
            outcome.events.append(Event("Warning", "InvalidSpec", message))
        return outcome

    if not spec.scaling.enabled:
        _back_in_rotation(kube, spec, outcome)
    # the apply's answer is the object as stored, status included: no other read
    deployment = applied.get(("Deployment", spec.name)) or {}
    dep_status = deployment.get("status") or {}
    ready = int(dep_status.get("readyReplicas") or 0)
    outcome.status = {
        "observedGeneration": generation,
        "replicas": int(dep_status.get("replicas") or 0),
        "readyReplicas": ready,
        "desiredReplicas": replicas,
        "selector": render.selector_string(spec),
        "conditions": [condition(
            "Ready", ready >= spec.min_replicas,
            "RelaysReady" if ready >= spec.min_replicas else "RelaysStarting",
            f"{ready} of {replicas} relays ready", generation, previous)],
    }
    if outcome.changed:
        outcome.events.append(Event("Normal", "Applied", "applied " + ", ".join(outcome.changed)))
    return outcome


def _apply_pool(kube: Kube, spec: TurnPoolSpec, owner: dict[str, Any], pods: int,
                exporter_image: str, outcome: Outcome,
                known: dict[tuple[str, str], dict[str, Any] | None]
                ) -> dict[tuple[str, str], dict[str, Any]]:
    """Render the pool's objects with ``pods`` relays and apply them (changes noted).
    ``known`` holds objects already read this pass, by (kind, name), so they are not read
    again; returns the applied objects as the apiserver stored them."""
    objects = render.render_pool(
        spec, replicas=pods, exporter_image=exporter_image,
        service_monitor_available=spec.service_monitor
        and kube.has_resource("monitoring.coreos.com/v1", "ServiceMonitor"),
    )
    applied: dict[tuple[str, str], dict[str, Any]] = {}
    for obj in objects:
        obj["metadata"]["ownerReferences"] = [owner]
        key = (obj["kind"], obj["metadata"]["name"])
        before = known[key] if key in known else kube.get(
            obj["apiVersion"], obj["kind"], spec.namespace, obj["metadata"]["name"])
        after = applied[key] = kube.apply(obj)
        if before is None or (before["metadata"].get("resourceVersion")
                              != after["metadata"].get("resourceVersion")):
            outcome.changed.append(f"{obj['kind']}/{obj['metadata']['name']}")
    return applied


def _back_in_rotation(kube: Kube, spec: TurnPoolSpec, outcome: Outcome) -> None:
    """With autoscaling off nothing drains or packs: relays the autoscaler left draining
    or on standby return to the client Service (else they would stay out for good)."""
    for view in pod_views(kube.list_pods(spec.namespace, render.selector_string(spec))):
        if view.draining or view.standby:
            back_in_rotation(kube, spec.namespace, view.name)
            outcome.changed.append(f"Pod/{view.name} back in rotation")


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {"apiVersion": body["apiVersion"], "kind": body["kind"], "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}

"""Autoscaling a TurnPool: one evaluation of live relay signals against the policy.

Kept kopf-free: the timer handler passes plain data, a :class:`Kube`, a signal source
(:mod:`turnstorm.operator.sources`) and the clock. An evaluation reads the pool's pods
(:mod:`turnstorm.operator.pods`), their signals, runs the policy, hands the decision to
the cluster actuator (:mod:`turnstorm.operator.scaling`: it drains before it removes,
so scale-in never deletes a relay with live allocations) and builds the status.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from turnstorm.operator.events import Event
from turnstorm.operator.kube import Kube
from turnstorm.operator.pods import PodView, cpu_factor, iso, pod_views
from turnstorm.operator.render import selector_string
from turnstorm.operator.scaling import (
    ClusterActuator,
    allocations,
    draining_after,
    drains_by_deletion,
)
from turnstorm.operator.sources import SignalSource, probe_rtt_ms
from turnstorm.policy import Autoscaler, Decision, RelaySample, StormOptions
from turnstorm.signals import SignalTracker
from turnstorm.spec import TurnPoolSpec


def storm_options(spec: TurnPoolSpec) -> StormOptions:
    return StormOptions.from_policy(spec.scaling)


@dataclass
class PoolScaler:
    """Per-pool autoscaling state, kept in memory by the operator (lost on restart, which
    is safe: the policy then holds the size for a full stabilization window)."""

    autoscaler: Autoscaler
    tracker: SignalTracker
    fingerprint: str
    last_eval: float = 0.0


def scaler_for(spec: TurnPoolSpec, existing: PoolScaler | None) -> PoolScaler:
    fingerprint = repr((spec.scaling, spec.min_replicas, spec.max_replicas, spec.cpu))
    if existing is not None and existing.fingerprint == fingerprint:
        return existing
    return PoolScaler(
        autoscaler=Autoscaler(spec.scaling, spec.min_replicas, spec.max_replicas,
                              storm_options(spec)),
        tracker=SignalTracker(cpu_limit_cores=spec.cpu_cores),
        fingerprint=fingerprint,
    )


@dataclass
class ScaleOutcome:
    decision: Decision
    replicas: int
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    probes: dict[str, float | None] = field(default_factory=dict)
    """The operator's STUN probe RTT (ms) per ready relay; None: no answer."""


def samples_for(spec: TurnPoolSpec, views: list[PodView], replicas: int,
                raw: Mapping[str, dict[str, float] | None], scaler: PoolScaler,
                now: float, wall: float, probe: bool) -> list[RelaySample]:
    samples = []
    for view in views:
        if view.deleting or view.removed_at is not None:
            continue
        values = raw.get(view.name)
        signals: dict[str, float | None] = (
            dict(scaler.tracker.update(view.name, now, values)) if values is not None else {})
        if probe and view.ip and view.ready:
            signals["probe_rtt_ms"] = probe_rtt_ms(view.ip, spec.udp_port)
        samples.append(RelaySample(
            name=view.name, ready=view.ready, signals=signals, draining=view.draining,
            drain_started=(now - (wall - view.drain_started)
                           if view.drain_started is not None else None),
            port_capacity=spec.relay_port_count,
            cpu_factor=cpu_factor(spec, view),
        ))
    # Pods the Deployment wants but that do not exist yet: not ready, no data.
    active = sum(1 for s in samples if not s.draining)
    draining = sum(1 for s in samples if s.draining)
    for index in range(max(0, replicas - draining - active)):
        samples.append(RelaySample(name=f"(pending-{index})", ready=False))
    return samples


def autoscale_pool(kube: Kube, spec: TurnPoolSpec, replicas: int, scaler: PoolScaler,
                   source: SignalSource, now: float, wall: float) -> ScaleOutcome:
    """One evaluation: signals -> decision -> pod labels and Deployment replicas."""
    views = pod_views(kube.list_pods(spec.namespace, selector_string(spec)))
    actuator = ClusterActuator(kube, spec, replicas, wall)
    actuator.delete_leftovers(views)
    live = [v for v in views if not v.deleting and v.removed_at is None]
    samples = samples_for(spec, views, replicas, source.read(spec, live), scaler, now, wall,
                          probe=True)
    decision = scaler.autoscaler.evaluate(now, samples)
    actuator.apply(decision, views, samples)
    probes = {s.name: s.signals.get("probe_rtt_ms") for s in samples
              if not s.name.startswith("(pending") and s.ready}
    status = pool_status(spec, views, samples, decision, actuator, replicas, now)
    if drains_by_deletion(spec):
        status["drainingRelays"] += terminating(spec, views, source, wall)
    return ScaleOutcome(decision, actuator.replicas, status, actuator.events, probes)


def pool_status(spec: TurnPoolSpec, views: list[PodView], samples: list[RelaySample],
                decision: Decision, actuator: ClusterActuator, replicas: int, now: float
                ) -> dict[str, Any]:
    """The TurnPool status an evaluation writes (merged key by key into the old one)."""
    wall = actuator.wall
    by_name = {s.name: s for s in samples}
    ratios = {k: round(v, 3) for k, v in decision.ratios.items()}
    top = max(ratios.items(), key=lambda kv: kv[1]) if ratios else None
    status: dict[str, Any] = {
        "desiredReplicas": decision.desired,
        "saturation": ratios,
        "saturationSummary": f"{top[1]:.0%} {top[0]}" if top else "no data",
        "limitingSignal": decision.limiting_signal or "",
        "lastDecision": decision.reason,
        "drainingRelays": [
            {"name": s.name, "since": iso(wall - (now - (s.drain_started or now))),
             "allocations": int(s.allocations or 0)}
            for s in draining_after(decision, samples)
        ] + [{"name": n, "since": iso(wall), "allocations": allocations(by_name[n]),
              **({"deleted": True} if drains_by_deletion(spec) else {})}
             for n in decision.drain if not n.startswith("(pending")],
    }
    if spec.scaling.pack_fill is not None or any(v.standby for v in views):
        status["standbyRelays"] = actuator.standby
    # always written: the status is merged key by key, a stale list would stay
    status["resizedRelays"] = [
        {"name": n, "cpuPercent": round(100 * f), "applied": n in actuator.applied_cpu}
        for n, f in sorted(actuator.resized.items()) if f != 1.0 and n not in decision.remove]
    if actuator.replicas != replicas:
        status["lastScaleTime"] = iso(wall)
    return status


def terminating(spec: TurnPoolSpec, views: list[PodView], source: SignalSource,
                wall: float) -> list[dict[str, Any]]:
    """Relays draining in their preStop hook (deleted, still serving their calls), for
    status.drainingRelays."""
    leaving = [v for v in views if v.deleting or v.removed_at is not None]
    raw = source.read(spec, [v for v in leaving if v.ip]) if leaving else {}
    return [{"name": v.name, "since": iso(v.drain_started or v.removed_at or wall),
             "allocations": int((raw.get(v.name) or {}).get("allocations", 0)),
             "deleted": True} for v in leaving]

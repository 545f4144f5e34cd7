"""kopf entry points: thin adapters from kopf's callbacks to the reconcile functions.

Handlers are synchronous: kopf runs them in its thread pool, and the official
Kubernetes client they use is synchronous.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import kopf

from turnstorm.operator import telemetry
from turnstorm.operator.evaluation import PoolScaler, autoscale_pool, scaler_for
from turnstorm.operator.kube import Kube, load_api_client
from turnstorm.operator.reconcile import Outcome, deployment_replicas, reconcile_pool
from turnstorm.operator.settings import Settings, timer_seconds
from turnstorm.operator.sources import signal_source
from turnstorm.spec import GROUP, VERSION, SpecError, TurnPoolSpec, turnpool_from_object

TIMER_SECONDS = timer_seconds()
"""How often each pool's timer wakes; the policy runs every spec.metrics.intervalSeconds."""

SCALE_ACTIONS = ("ScaleUp", "ScaleDown", "Drain", "Undrain", "Remove", "Delete")

_state: dict[str, Any] = {}
"""Operator-wide bookkeeping for the metrics: pools seen, pools waiting for a retry."""


def settings_of(memo: kopf.Memo) -> Settings:
    settings: Settings = memo.settings
    return settings


def kube_of(memo: kopf.Memo) -> Kube:
    """The one API gateway, made at startup with the settings' kubeconfig."""
    kube: Kube = memo.kube
    return kube


@kopf.on.login()
def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """The official client's login (in-cluster, else the kubeconfig with every auth
    plugin): the settings' kubeconfig, or $KUBECONFIG read now (the client library reads
    it once, when it is first imported, which may be before the variable was set)."""
    import kubernetes

    path = settings_of(memo).kubeconfig or os.environ.get("KUBECONFIG")
    if path:
        kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = path
    info: kopf.ConnectionInfo | None = kopf.login_via_client(memo=memo, **kwargs)
    return info


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # `turnstorm operator` passes its settings in the memo; `kopf run` (the tests) does
    # not, and then the environment has them.
    if not isinstance(memo.get("settings"), Settings):
        memo.settings = Settings.from_environment()
    memo.kube = Kube(load_api_client(memo.settings.kubeconfig))
    # Bounded watches: a silently dead connection is noticed within a minute.
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 70
    settings.watching.connect_timeout = 10
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.INFO
    settings.execution.max_workers = 8


def _apply_outcome(outcome: Outcome, body: kopf.Body, patch: kopf.Patch) -> None:
    pending: set[str] = _state.setdefault("pending", set())
    if outcome.retry_after is None:
        pending.discard(body["metadata"]["uid"])
    else:
        pending.add(body["metadata"]["uid"])
    telemetry.QUEUE_DEPTH.set(len(pending))
    for key, value in outcome.status.items():
        patch.status[key] = value
    for event in outcome.events:
        if event.type == "Warning":
            kopf.warn(body, reason=event.reason, message=event.message)
        else:
            kopf.info(body, reason=event.reason, message=event.message)
    if outcome.retry_after is not None:
        telemetry.RETRIES.inc()
        # Status is patched by kopf even when the handler asks for a retry.
        raise kopf.TemporaryError(outcome.status["conditions"][0]["message"],
                                  delay=outcome.retry_after)


@kopf.on.resume(GROUP, VERSION, "turnpools")
@kopf.on.create(GROUP, VERSION, "turnpools")
@kopf.on.update(GROUP, VERSION, "turnpools")
def reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    pools: set[str] = _state.setdefault("pools", set())
    pools.add(body["metadata"]["uid"])
    telemetry.POOLS.set(len(pools))
    with telemetry.RECONCILE_SECONDS.labels("reconcile").time(), \
            telemetry.RECONCILE_ERRORS.labels("reconcile").count_exceptions(Exception):
        outcome = reconcile_pool(kube_of(memo), dict(body), settings_of(memo).exporter_image)
    _apply_outcome(outcome, body, patch)


def _autoscale(body: kopf.Body, spec: TurnPoolSpec, memo: kopf.Memo,
               status: dict[str, Any]) -> None:
    """Run the policy when due; update ``status`` in place and post events."""
    scaler: PoolScaler = scaler_for(spec, getattr(memo, "scaler", None))
    memo.scaler = scaler
    now = time.monotonic()
    if now - scaler.last_eval < spec.interval_seconds - 0.05:
        return
    scaler.last_eval = now
    kube = kube_of(memo)
    deployment = kube.get("apps/v1", "Deployment", spec.namespace, spec.name)
    if deployment is None:
        return
    surplus = (int((deployment.get("status") or {}).get("replicas") or 0)
               - int(deployment["spec"].get("replicas") or 0))
    if surplus > 0:
        # A rollout's surge pods (or pods the ReplicaSet is about to delete) would count
        # as relays in rotation and inflate the pool: decide once they are gone.
        status["lastDecision"] = (f"{surplus} pod(s) over the Deployment's replicas (a "
                                  "rollout or a removal under way): holding size")
        return
    source = signal_source(spec)
    if source is None:
        status["lastDecision"] = "metrics.source is prometheus but metrics.prometheusURL " \
                                 "is unset: holding size"
        return
    replicas = int(deployment["spec"].get("replicas") or deployment_replicas(spec, status))
    outcome = autoscale_pool(kube, spec, replicas, scaler, source, now, time.time())
    status.update(outcome.status)
    labels = (spec.namespace, spec.name)
    telemetry.DESIRED.labels(*labels).set(outcome.decision.desired)
    telemetry.DEPLOYMENT.labels(*labels).set(outcome.replicas)
    telemetry.DRAINING.labels(*labels).set(len(outcome.status["drainingRelays"]))
    telemetry.STANDBY.labels(*labels).set(len(outcome.status.get("standbyRelays", [])))
    for signal, ratio in outcome.decision.ratios.items():
        telemetry.SATURATION.labels(*labels, signal).set(ratio)
    for action in SCALE_ACTIONS:  # zero series first, so increase() sees the first event
        telemetry.SCALE_EVENTS.labels(*labels, action)
    for relay, rtt in outcome.probes.items():
        telemetry.PROBE_RTT.labels(*labels, relay).set(float("nan") if rtt is None else rtt / 1000)
    for event in outcome.events:
        telemetry.SCALE_EVENTS.labels(*labels, event.reason).inc()
        post = kopf.warn if event.type == "Warning" else kopf.info
        post(body, reason=event.reason, message=event.message)


@kopf.timer(GROUP, VERSION, "turnpools", interval=TIMER_SECONDS, initial_delay=1.0, idle=0)
def track(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Track actual state (relays ready, drift) and autoscale, between spec changes."""
    status = dict(body.get("status") or {})
    if status.get("observedGeneration") != body["metadata"].get("generation"):
        return  # the change handler has not run yet for this generation
    raw = dict(body)
    with telemetry.RECONCILE_SECONDS.labels("track").time(), \
            telemetry.RECONCILE_ERRORS.labels("track").count_exceptions(Exception):
        try:
            spec = turnpool_from_object(raw)
        except SpecError:
            return  # reported by the change handler
        if spec.scaling.enabled and status.get("conditions") and not any(
                c.get("reason") in ("SecretMissing", "InvalidSpec")
                for c in status["conditions"]):
            before = dict(status)
            _autoscale(body, spec, memo, status)
            for key, value in status.items():
                if before.get(key) != value:
                    patch.status[key] = value
            raw["status"] = status
        outcome = reconcile_pool(kube_of(memo), raw, settings_of(memo).exporter_image)
    outcome.events = [e for e in outcome.events if e.type == "Warning"
                      and e.reason != "SecretMissing"]
    outcome.retry_after = None
    # Only the change handler records which generation it handled: this timer's body may
    # be older than a change handled meanwhile, and writing its generation back would
    # regress observedGeneration (after which the timer would wait forever).
    outcome.status.pop("observedGeneration", None)
    _apply_outcome(outcome, body, patch)


@kopf.on.delete(GROUP, VERSION, "turnpools", optional=True)
def forget(body: kopf.Body, **_: Any) -> None:
    """Owned objects go with the pool (owner references); only forget it here."""
    pools: set[str] = _state.setdefault("pools", set())
    pools.discard(body["metadata"]["uid"])
    telemetry.POOLS.set(len(pools))
    pending: set[str] = _state.setdefault("pending", set())
    pending.discard(body["metadata"]["uid"])
    telemetry.QUEUE_DEPTH.set(len(pending))


@kopf.on.probe(id="pools")
def pools_seen(**_: Any) -> int:
    return len(_state.get("pools", ()))

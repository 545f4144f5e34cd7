"""kopf entry points: thin adapters from kopf's callbacks to the reconcile functions.

Handlers are synchronous: kopf runs them in its thread pool, and the official
Kubernetes client they use is synchronous.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from turnstorm.operator.kube import Kube, load_api_client
from turnstorm.operator.reconcile import Outcome, reconcile_pool
from turnstorm.operator.render import DEFAULT_EXPORTER_IMAGE
from turnstorm.spec import GROUP, VERSION

_state: dict[str, Any] = {}


def kube() -> Kube:
    if "kube" not in _state:
        _state["kube"] = Kube(load_api_client(os.environ.get("TURNSTORM_KUBECONFIG")))
    result: Kube = _state["kube"]
    return result


def exporter_image() -> str:
    return os.environ.get("TURNSTORM_EXPORTER_IMAGE", DEFAULT_EXPORTER_IMAGE)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
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
    for key, value in outcome.status.items():
        patch.status[key] = value
    for event in outcome.events:
        if event.type == "Warning":
            kopf.warn(body, reason=event.reason, message=event.message)
        else:
            kopf.info(body, reason=event.reason, message=event.message)
    if outcome.retry_after is not None:
        # Status is patched by kopf even when the handler asks for a retry.
        raise kopf.TemporaryError(outcome.status["conditions"][0]["message"],
                                  delay=outcome.retry_after)


@kopf.on.resume(GROUP, VERSION, "turnpools")
@kopf.on.create(GROUP, VERSION, "turnpools")
@kopf.on.update(GROUP, VERSION, "turnpools")
def reconcile(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    outcome = reconcile_pool(kube(), dict(body), exporter_image())
    _apply_outcome(outcome, body, patch)


@kopf.timer(GROUP, VERSION, "turnpools", interval=15.0, initial_delay=5.0, idle=0)
def track(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """Track actual state (relays ready, objects drifted) between spec changes."""
    status = body.get("status") or {}
    if status.get("observedGeneration") != body["metadata"].get("generation"):
        return  # the change handler has not run yet for this generation
    outcome = reconcile_pool(kube(), dict(body), exporter_image())
    outcome.events = [e for e in outcome.events if e.type == "Warning" and
                      e.reason != "SecretMissing"]
    if outcome.retry_after is not None:
        outcome.retry_after = None
    _apply_outcome(outcome, body, patch)


@kopf.on.probe(id="relays")
def pools_seen(**_: Any) -> int:
    return len(_state)

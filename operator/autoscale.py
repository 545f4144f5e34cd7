"""Autoscaling a TurnPool: read live relay signals, run the policy, drain before removing.

Kept kopf-free: the timer handler passes plain data, a :class:`Kube`, a signal source and
the clock. Scale-in never cuts a live allocation; the policy picks the relays with the
fewest allocations, and how they drain depends on how clients reach them:

* **through a Service** (``LoadBalancer``, ``NodePort``): kube-proxy DNATs each call's
  UDP flow to its relay, and it deletes the conntrack entries of a flow whose endpoint
  stops *serving*: a relay taken out of the Service by its label loses every call at
  once (measured on a real node: every refresh 437, every frame lost). A *terminating*
  endpoint still serves, and kube-proxy gives it no new flow while a ready relay exists.
  So the chosen relays get the lowest ``controller.kubernetes.io/pod-deletion-cost`` and
  ``replicas`` drops at once: the ReplicaSet deletes exactly these pods, each stays in
  the Service as a terminating endpoint while its ``preStop`` hook waits for its calls
  to end (or ``drainDeadlineSeconds``), and nothing else takes its place;
* **directly** (``hostNetwork``, no DNAT): they leave rotation by label
  ``turnstorm.io/rotation=draining`` (the headless Service lists ``active`` relays
  only), with a low deletion cost, and ``replicas`` drops once a draining relay's
  allocations reach 0 or its drain deadline passes; until then it can come back.

With ``placement: pack`` each evaluation also labels the ready relays outside
:func:`~turnstorm.policy.open_relays` (oldest pods first) ``turnstorm.io/rotation=standby``
and those inside it ``active``: new allocations fill the oldest relays first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException

from turnstorm.operator.kube import Kube
from turnstorm.operator.render import (
    DELETION_COST,
    RELAY_CONTAINER,
    ROTATION_ACTIVE,
    ROTATION_DRAINING,
    ROTATION_LABEL,
    ROTATION_STANDBY,
    selector_string,
)
from turnstorm.policy import Autoscaler, Decision, RelaySample, StormOptions, open_relays
from turnstorm.proto import stun
from turnstorm.signals import SignalTracker, scrape_signals
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


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def iso(ts: float) -> str:
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
            drain_started=_parse_time(annotations.get(DRAIN_STARTED)),
            deleting=bool(meta.get("deletionTimestamp")),
            removed_at=_parse_time(annotations.get(REMOVED_AT)),
            created=_parse_time(meta.get("creationTimestamp")),
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


def back_in_rotation(kube: Kube, namespace: str, name: str) -> None:
    """Put a draining or standby relay back in the client Service, clearing its drain
    marks (start time, low deletion cost)."""
    kube.patch_pod_metadata(namespace, name, {ROTATION_LABEL: ROTATION_ACTIVE},
                            {DRAIN_STARTED: None, DELETION_COST: None})


class SignalSource(Protocol):
    def read(self, spec: TurnPoolSpec, pods: list[PodView]) -> dict[str, dict[str, float] | None]:
        """Raw exporter values per pod name; None when the pod's signals are missing."""


class ExporterScraper:
    """Scrapes each relay's exporter sidecar directly (no Prometheus needed)."""

    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout

    def read(self, spec: TurnPoolSpec, pods: list[PodView]) -> dict[str, dict[str, float] | None]:
        out: dict[str, dict[str, float] | None] = {}
        for pod in pods:
            out[pod.name] = None
            if not pod.ip:
                continue
            host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip
            url = f"http://{host}:{spec.exporter_port}/metrics"
            try:
                with urllib.request.urlopen(url, timeout=self.timeout) as response:
                    text = response.read().decode("utf8", "replace")
                out[pod.name] = scrape_signals(text)
            except (OSError, ValueError, urllib.error.URLError):
                continue
        return out


SCRAPE_LABELS = frozenset({"__name__", "job", "instance", "endpoint", "service",
                           "container", "namespace", "pod", "prometheus", "pool"})
"""Labels that name where a series was scraped from, not which series it is."""


class PrometheusSource:
    """Reads the exporters' series from Prometheus (``pod`` label from the ServiceMonitor)."""

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def query(self, spec: TurnPoolSpec, pods: list[PodView]) -> str:
        names = "|".join(p.name for p in pods)
        return (f'{{__name__=~"turnstorm_relay_.+",namespace="{spec.namespace}",'
                f'pod=~"{names}"}}')

    def read(self, spec: TurnPoolSpec, pods: list[PodView]) -> dict[str, dict[str, float] | None]:
        import json
        import urllib.parse

        out: dict[str, dict[str, float] | None] = {p.name: None for p in pods}
        if not pods:
            return out
        url = (f"{self.base_url}/api/v1/query?"
               + urllib.parse.urlencode({"query": self.query(spec, pods)}))
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                payload = json.load(response)
        except (OSError, ValueError, urllib.error.URLError):
            return out
        # One exporter may be scraped by several jobs (a ServiceMonitor and a PodMonitor):
        # the same series then arrives once per job. Keep one value per series (the
        # labels other than the scrape target's), then add up a metric's series per pod.
        series: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        for item in payload.get("data", {}).get("result", []):
            metric = item.get("metric", {})
            pod = metric.get("pod")
            name = metric.get("__name__", "")
            if pod not in out or not name.startswith("turnstorm_relay_"):
                continue
            own = tuple(sorted((k, v) for k, v in metric.items() if k not in SCRAPE_LABELS))
            value = float(item["value"][1])
            key = (pod, name[len("turnstorm_relay_"):], own)
            series[key] = max(series.get(key, value), value)
        for (pod, signal, _), value in series.items():
            values = out[pod] or {}
            values[signal] = values.get(signal, 0.0) + value
            out[pod] = values
        return out


def probe_rtt_ms(host: str, port: int, timeout: float = 1.0) -> float | None:
    """The operator's own black-box STUN Binding RTT to one relay, or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        start = time.perf_counter()
        try:
            sock.sendto(request.encode(), (host, port))
            while True:
                data = sock.recv(2048)
                if stun.is_stun(data) and data[8:20] == request.transaction_id:
                    return (time.perf_counter() - start) * 1000
        except OSError:
            return None


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
    events: list[tuple[str, str, str]] = field(default_factory=list)
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


def drains_by_deletion(spec: TurnPoolSpec) -> bool:
    """True where clients reach the relays through a Service (module docstring)."""
    return spec.exposure != "hostNetwork"


def autoscale_pool(kube: Kube, spec: TurnPoolSpec, replicas: int, scaler: PoolScaler,
                   source: SignalSource, now: float, wall: float) -> ScaleOutcome:
    """One evaluation: signals -> decision -> pod labels and Deployment replicas."""
    pods = kube.list_pods(spec.namespace, selector_string(spec))
    views = pod_views(pods)
    events: list[tuple[str, str, str]] = []
    for view in views:
        if (view.removed_at is not None and not view.deleting
                and wall - view.removed_at >= REMOVE_GRACE_SECONDS):
            kube.delete_pod(spec.namespace, view.name)
            events.append(("Normal", "Delete", f"relay {view.name} deleted: the ReplicaSet "
                                               "kept it after its removal"))
    live = [v for v in views if not v.deleting and v.removed_at is None]
    raw = source.read(spec, live)
    samples = samples_for(spec, views, replicas, raw, scaler, now, wall, probe=True)
    decision = scaler.autoscaler.evaluate(now, samples)
    by_name = {s.name: s for s in samples}

    by_deletion = drains_by_deletion(spec)
    for name in decision.drain:
        if name.startswith("(pending"):
            continue
        if by_deletion:
            kube.patch_pod_metadata(spec.namespace, name, {}, {
                DRAIN_STARTED: iso(wall), REMOVED_AT: iso(wall), DELETION_COST: REMOVED_COST})
            events.append(("Normal", "Drain", f"relay {name} drains in its preStop hook "
                           f"with {_allocs(by_name[name])} allocations"))
            continue
        kube.patch_pod_metadata(spec.namespace, name, {ROTATION_LABEL: ROTATION_DRAINING},
                                {DRAIN_STARTED: iso(wall), DELETION_COST: DRAINING_COST})
        events.append(("Normal", "Drain", f"relay {name} out of rotation with "
                       f"{_allocs(by_name[name])} allocations"))
    for name in decision.undrain:
        back_in_rotation(kube, spec.namespace, name)
        events.append(("Normal", "Undrain", f"relay {name} back in rotation"))
    past_deadline: list[str] = []
    for name in decision.remove:
        sample = by_name[name]
        if sample.allocations != 0:
            past_deadline.append(name)
        why = ("no allocations left" if sample.allocations == 0
               else f"drain deadline passed with {_allocs(sample)} allocations")
        kube.patch_pod_metadata(spec.namespace, name, {},
                                {REMOVED_AT: iso(wall), DELETION_COST: REMOVED_COST})
        events.append(("Normal" if sample.allocations == 0 else "Warning", "Remove",
                       f"relay {name} removed: {why}"))

    standby = _place(kube, spec, views, by_name, decision)
    resized = {v.name: by_name[v.name].cpu_factor for v in live if v.name in by_name}
    # the kubelet reports the CPU the spec asks for as applied (not yet after a resize,
    # or never when the node cannot grant it: PodResizePending)
    applied = {v.name for v in live if v.cpu is not None and v.cpu_applied is not None
               and millicores(v.cpu) == millicores(v.cpu_applied)}
    for name, factor in decision.resize.items():
        if name.startswith("(pending") or name not in resized:
            continue
        cpu = millicores(spec.cpu_cores * factor)
        try:
            kube.resize_pod_cpu(spec.namespace, name, RELAY_CONTAINER, cpu)
        except ApiException as exc:
            events.append(("Warning", "ResizeFailed", f"relay {name} CPU to {cpu}: "
                           f"{exc.status} {exc.reason}"))
            continue
        except AttributeError:  # a kubernetes client older than the resize subresource
            events.append(("Warning", "ResizeFailed", f"relay {name} CPU to {cpu}: this "
                           "kubernetes client has no pods/resize call"))
            continue
        events.append(("Normal", "Resize", f"relay {name} CPU {resized[name]:.0%} -> "
                       f"{factor:.0%} of {spec.cpu} ({_allocs(by_name[name])} allocations)"))
        resized[name] = factor
        applied.discard(name)

    draining = [s for s in samples if s.draining and s.name not in decision.undrain
                and s.name not in decision.remove]
    draining_names = [s.name for s in draining] + [
        n for n in decision.drain if not n.startswith("(pending") and not by_deletion]
    new_replicas = decision.desired + len(draining_names)
    if new_replicas != replicas:
        kube.apps.patch_namespaced_deployment(spec.name, spec.namespace,
                                              {"spec": {"replicas": new_replicas}})
        verb = "ScaleUp" if decision.desired > decision.active else "ScaleDown"
        events.append(("Normal", verb, f"relays {replicas} -> {new_replicas}: "
                                       f"{decision.reason}"))
    for name in past_deadline:
        # Its drain is over: deleted now, without the preStop drain wait a second time.
        kube.delete_pod(spec.namespace, name, grace_seconds=0)
    ratios = {k: round(v, 3) for k, v in decision.ratios.items()}
    top = max(ratios.items(), key=lambda kv: kv[1]) if ratios else None
    terminating = _terminating(spec, views, source, wall) if by_deletion else []
    status: dict[str, Any] = {
        "desiredReplicas": decision.desired,
        "saturation": ratios,
        "saturationSummary": f"{top[1]:.0%} {top[0]}" if top else "no data",
        "limitingSignal": decision.limiting_signal or "",
        "lastDecision": decision.reason,
        "drainingRelays": [
            {"name": s.name, "since": iso(wall - (now - (s.drain_started or now))),
             "allocations": int(s.allocations or 0)} for s in draining
        ] + [{"name": n, "since": iso(wall), "allocations": int(_allocs(by_name[n])),
              **({"deleted": True} if by_deletion else {})}
             for n in decision.drain if not n.startswith("(pending")] + terminating,
    }
    if spec.scaling.pack_fill is not None or any(v.standby for v in views):
        status["standbyRelays"] = standby
    # always written: the status is merged key by key, a stale list would stay
    status["resizedRelays"] = [
        {"name": n, "cpuPercent": round(100 * f), "applied": n in applied}
        for n, f in sorted(resized.items()) if f != 1.0 and n not in decision.remove]
    if new_replicas != replicas:
        status["lastScaleTime"] = iso(wall)
    probes = {s.name: s.signals.get("probe_rtt_ms") for s in samples
              if not s.name.startswith("(pending") and s.ready}
    return ScaleOutcome(decision, new_replicas, status, events, probes)


def _terminating(spec: TurnPoolSpec, views: list[PodView], source: SignalSource,
                 wall: float) -> list[dict[str, Any]]:
    """Relays draining in their preStop hook (deleted, still serving their calls), for
    status.drainingRelays."""
    leaving = [v for v in views if v.deleting or v.removed_at is not None]
    raw = source.read(spec, [v for v in leaving if v.ip]) if leaving else {}
    return [{"name": v.name, "since": iso(v.drain_started or v.removed_at or wall),
             "allocations": int((raw.get(v.name) or {}).get("allocations", 0)),
             "deleted": True} for v in leaving]


def _place(kube: Kube, spec: TurnPoolSpec, views: list[PodView],
           by_name: dict[str, RelaySample], decision: Decision) -> list[str]:
    """Label the relays staying in rotation ``active`` or ``standby`` as the placement
    says; returns the standby relays. Spread (or no allocation target): all active."""
    leaving = set(decision.drain) | set(decision.remove)
    staying = [v for v in sorted(views, key=lambda v: (v.created or 0.0, v.name))
               if v.name in by_name and v.name not in leaving and not v.deleting
               and (not v.draining or v.name in decision.undrain)]
    fill = spec.scaling.pack_fill
    if fill is None:
        opened = {v.name for v in staying}
    else:
        # (relays undrained by this evaluation are back in rotation)
        candidates = [dataclasses.replace(by_name[v.name], draining=False)
                      for v in staying if v.ready]
        opened = set(open_relays(candidates, fill, spec.scaling.pack_headroom,
                                 spec.scaling.targets))
        opened |= {v.name for v in staying if not v.ready}
    standby = []
    for view in staying:
        if view.name in decision.undrain:
            continue  # labelled active above
        if view.name in opened:
            if view.standby:
                kube.patch_pod_metadata(spec.namespace, view.name,
                                        {ROTATION_LABEL: ROTATION_ACTIVE}, {})
        elif by_name[view.name].allocations != 0 and drains_by_deletion(spec):
            # out of the Service, its calls would lose their conntrack entries: a relay
            # with calls (or unknown ones) stays in rotation
            if view.standby:
                kube.patch_pod_metadata(spec.namespace, view.name,
                                        {ROTATION_LABEL: ROTATION_ACTIVE}, {})
        else:
            standby.append(view.name)
            if not view.standby:
                kube.patch_pod_metadata(spec.namespace, view.name,
                                        {ROTATION_LABEL: ROTATION_STANDBY}, {})
    return standby


def _allocs(sample: RelaySample) -> int:
    return int(sample.allocations or 0)

"""Carrying out the policy's :class:`~turnstorm.policy.Decision` on a cluster.

The operator's actuator, the twin of the local mode's process actuator
(:meth:`turnstorm.relay.actuator.LocalPool.apply`), with the same result
(:class:`~turnstorm.policy.Applied`). Every change goes through :class:`Kube`.

Scale-in never cuts a live allocation; the policy picks the relays with the fewest
allocations, and how they drain depends on how clients reach them:

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

Besides:

1. removed relays get the lowest deletion cost and ``replicas`` drops: a relay removed
   at its drain deadline, with calls still on it, is then deleted at once;
2. with ``placement: pack`` the ready relays outside
   :func:`~turnstorm.policy.open_relays` (oldest pods first) are labelled ``standby``
   and those inside it ``active``: new allocations fill the oldest relays first (behind
   a Service, a relay with calls stays in rotation);
3. relays the decision resizes get their CPU through the pod's ``resize`` subresource.
"""

from __future__ import annotations

import dataclasses

from turnstorm.operator.events import Event
from turnstorm.operator.kube import Kube, ResizeRefused
from turnstorm.operator.pods import (
    DRAIN_STARTED,
    DRAINING_COST,
    REMOVE_GRACE_SECONDS,
    REMOVED_AT,
    REMOVED_COST,
    PodView,
    iso,
    millicores,
)
from turnstorm.operator.render import (
    DELETION_COST,
    RELAY_CONTAINER,
    ROTATION_ACTIVE,
    ROTATION_DRAINING,
    ROTATION_LABEL,
    ROTATION_STANDBY,
)
from turnstorm.policy import Applied, Decision, RelaySample, open_relays
from turnstorm.spec import TurnPoolSpec


def back_in_rotation(kube: Kube, namespace: str, name: str) -> None:
    """Put a draining or standby relay back in the client Service, clearing its drain
    marks (start time, low deletion cost)."""
    kube.patch_pod_metadata(namespace, name, {ROTATION_LABEL: ROTATION_ACTIVE},
                            {DRAIN_STARTED: None, DELETION_COST: None})


def drains_by_deletion(spec: TurnPoolSpec) -> bool:
    """True where clients reach the relays through a Service (module docstring)."""
    return spec.exposure != "hostNetwork"


def _real(name: str) -> bool:
    """Not one of the policy's placeholders for pods the Deployment has yet to create."""
    return not name.startswith("(pending")


class ClusterActuator:
    """One evaluation's changes to a pool's pods and Deployment, and the events they
    make. ``wall`` is the UNIX time written into the drain and removal annotations."""

    def __init__(self, kube: Kube, spec: TurnPoolSpec, replicas: int, wall: float) -> None:
        self.kube = kube
        self.spec = spec
        self.replicas = replicas
        """The Deployment's replicas: as found, then as :meth:`apply` set them."""
        self.wall = wall
        self.events: list[Event] = []
        self.standby: list[str] = []
        """Relays in rotation that placement keeps out of the client Service."""
        self.resized: dict[str, float] = {}
        """Each live relay's CPU factor after :meth:`apply`."""
        self.applied_cpu: set[str] = set()
        """Relays whose CPU the kubelet reports applied as the spec asks."""

    def _event(self, kind: str, reason: str, message: str) -> None:
        self.events.append(Event(kind, reason, message))

    def delete_leftovers(self, views: list[PodView]) -> None:
        """Delete relays removed longer than the grace ago that the ReplicaSet kept."""
        for view in views:
            if (view.removed_at is not None and not view.deleting
                    and self.wall - view.removed_at >= REMOVE_GRACE_SECONDS):
                self.kube.delete_pod(self.spec.namespace, view.name)
                self._event("Normal", "Delete", f"relay {view.name} deleted: the "
                            "ReplicaSet kept it after its removal")

    def apply(self, decision: Decision, views: list[PodView], samples: list[RelaySample]
              ) -> Applied:
        """Drain, undrain, remove, place, resize, then set the Deployment's replicas."""
        by_name = {s.name: s for s in samples}
        done = Applied(undrained=[], drained=[], removed=[], started=[], resized=[])
        self._drain(decision, by_name, done)
        past_deadline = self._remove(decision, by_name, done)
        self.standby = self._place(views, by_name, decision)
        live = [v for v in views if not v.deleting and v.removed_at is None]
        self.resized = {v.name: by_name[v.name].cpu_factor for v in live if v.name in by_name}
        # the kubelet reports the CPU the spec asks for as applied (not yet after a resize,
        # or never when the node cannot grant it: PodResizePending)
        self.applied_cpu = {v.name for v in live if v.cpu is not None
                            and v.cpu_applied is not None
                            and millicores(v.cpu) == millicores(v.cpu_applied)}
        self._resize(decision, by_name, done)
        self._scale(decision, samples, done)
        for name in past_deadline:
            # Its drain is over: deleted now, without the preStop drain wait a second time.
            self.kube.delete_pod(self.spec.namespace, name, grace_seconds=0)
        return done

    def _drain(self, decision: Decision, by_name: dict[str, RelaySample],
               done: Applied) -> None:
        namespace = self.spec.namespace
        by_deletion = drains_by_deletion(self.spec)
        for name in filter(_real, decision.drain):
            done["drained"].append(name)
            if by_deletion:
                self.kube.patch_pod_metadata(namespace, name, {}, {
                    DRAIN_STARTED: iso(self.wall), REMOVED_AT: iso(self.wall),
                    DELETION_COST: REMOVED_COST})
                self._event("Normal", "Drain", f"relay {name} drains in its preStop hook "
                            f"with {allocations(by_name[name])} allocations")
                continue
            self.kube.patch_pod_metadata(
                namespace, name, {ROTATION_LABEL: ROTATION_DRAINING},
                {DRAIN_STARTED: iso(self.wall), DELETION_COST: DRAINING_COST})
            self._event("Normal", "Drain", f"relay {name} out of rotation with "
                        f"{allocations(by_name[name])} allocations")
        for name in decision.undrain:
            back_in_rotation(self.kube, namespace, name)
            self._event("Normal", "Undrain", f"relay {name} back in rotation")
            done["undrained"].append(name)

    def _remove(self, decision: Decision, by_name: dict[str, RelaySample],
                done: Applied) -> list[str]:
        """Mark the removed relays; returns those removed with calls still on them."""
        past_deadline = []
        for name in decision.remove:
            sample = by_name[name]
            if sample.allocations != 0:
                past_deadline.append(name)
            why = ("no allocations left" if sample.allocations == 0
                   else f"drain deadline passed with {allocations(sample)} allocations")
            self.kube.patch_pod_metadata(
                self.spec.namespace, name, {},
                {REMOVED_AT: iso(self.wall), DELETION_COST: REMOVED_COST})
            self._event("Normal" if sample.allocations == 0 else "Warning", "Remove",
                        f"relay {name} removed: {why}")
            done["removed"].append(name)
        return past_deadline

    def _place(self, views: list[PodView], by_name: dict[str, RelaySample],
               decision: Decision) -> list[str]:
        """Label the relays staying in rotation ``active`` or ``standby`` as the placement
        says; returns the standby relays. Spread (or no allocation target): all active."""
        spec = self.spec
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
            if view.name in opened or (by_name[view.name].allocations != 0
                                       and drains_by_deletion(spec)):
                # (behind a Service a relay with calls, or unknown ones, stays in rotation:
                # out of the Service its calls would lose their conntrack entries)
                if view.standby:
                    self.kube.patch_pod_metadata(spec.namespace, view.name,
                                                 {ROTATION_LABEL: ROTATION_ACTIVE}, {})
            else:
                standby.append(view.name)
                if not view.standby:
                    self.kube.patch_pod_metadata(spec.namespace, view.name,
                                                 {ROTATION_LABEL: ROTATION_STANDBY}, {})
        return standby

    def _resize(self, decision: Decision, by_name: dict[str, RelaySample],
                done: Applied) -> None:
        spec = self.spec
        for name, factor in decision.resize.items():
            if not _real(name) or name not in self.resized:
                continue
            cpu = millicores(spec.cpu_cores * factor)
            try:
                self.kube.resize_pod_cpu(spec.namespace, name, RELAY_CONTAINER, cpu)
            except ResizeRefused as exc:
                self._event("Warning", "ResizeFailed", f"relay {name} CPU to {cpu}: {exc}")
                continue
            self._event("Normal", "Resize", f"relay {name} CPU {self.resized[name]:.0%} -> "
                        f"{factor:.0%} of {spec.cpu} ({allocations(by_name[name])} "
                        "allocations)")
            self.resized[name] = factor
            self.applied_cpu.discard(name)
            done["resized"].append(name)

    def _scale(self, decision: Decision, samples: list[RelaySample], done: Applied) -> None:
        """Replicas: the relays in rotation plus those still draining."""
        draining = draining_after(decision, samples)
        labelled = [] if drains_by_deletion(self.spec) else list(filter(_real, decision.drain))
        wanted = decision.desired + len(draining) + len(labelled)
        if wanted == self.replicas:
            return
        self.kube.scale_deployment(self.spec.namespace, self.spec.name, wanted)
        verb = "ScaleUp" if decision.desired > decision.active else "ScaleDown"
        self._event("Normal", verb, f"relays {self.replicas} -> {wanted}: {decision.reason}")
        done["started"] += [f"(pending-{i})" for i in range(max(0, wanted - self.replicas))]
        self.replicas = wanted


def draining_after(decision: Decision, samples: list[RelaySample]) -> list[RelaySample]:
    """The relays that were draining and still are once ``decision`` is carried out."""
    return [s for s in samples if s.draining and s.name not in decision.undrain
            and s.name not in decision.remove]


def allocations(sample: RelaySample) -> int:
    return int(sample.allocations or 0)

"""A thin adapter over the Kubernetes API (the official client, server-side apply).

The reconcile functions take a :class:`Kube` and plain data; tests hand them one that
talks to a real test apiserver.
"""

from __future__ import annotations

import secrets
import threading
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import (
    NotFoundError,
    ResourceNotFoundError,
    UnprocessibleEntityError,
)

from turnstorm.errors import TurnstormError


class Rejected(TurnstormError):
    """The apiserver refused a rendered object (422): a spec value its schema rejects."""

FIELD_MANAGER = "turnstorm-operator"


def load_api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig."""
    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return client.ApiClient(configuration)


class ResizeRefused(TurnstormError):
    """The apiserver (or this kubernetes client) cannot resize a pod in place."""


class Kube:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.dynamic = DynamicClient(api_client)
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        # kopf runs sync handlers in a thread pool; the dynamic client's discovery cache
        # is not thread-safe (seen corrupting itself with KeyError), so lookups are
        # serialized and memoized. Requests themselves run concurrently.
        self._lock = threading.Lock()
        self._resources: dict[tuple[str, str], Any] = {}

    def resource(self, api_version: str, kind: str) -> Any:
        key = (api_version, kind)
        with self._lock:
            if key not in self._resources:
                self._resources[key] = self.dynamic.resources.get(api_version=api_version,
                                                                  kind=kind)
            return self._resources[key]

    def has_resource(self, api_version: str, kind: str) -> bool:
        """Whether the API serves ``kind`` (a CRD installed later is seen on a later call)."""
        try:
            self.resource(api_version, kind)
        except ResourceNotFoundError:
            return False
        return True

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply: idempotent, an unchanged object is not written again."""
        meta = obj["metadata"]
        try:
            result = self.resource(obj["apiVersion"], obj["kind"]).server_side_apply(
                body=obj, name=meta["name"], namespace=meta.get("namespace"),
                field_manager=FIELD_MANAGER, force_conflicts=True,
            )
        except UnprocessibleEntityError as exc:
            raise Rejected(f"the apiserver rejected {obj['kind']} {meta['name']}: "
                           f"{_api_message(exc)}") from None
        applied: dict[str, Any] = result.to_dict()
        return applied

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found = self.resource(api_version, kind).get(name=name, namespace=namespace)
        except NotFoundError:
            return None
        result: dict[str, Any] = found.to_dict()
        return result

    def secret_has_key(self, namespace: str, name: str, key: str) -> bool | None:
        """None: no such Secret; False: no such key; True: present. Never reads values
        into logs."""
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data = secret.data or {}
        return key in data

    def ensure_secret(self, obj: dict[str, Any]) -> bool:
        """Create ``obj`` unless a Secret of that name exists; True when created."""
        meta = obj["metadata"]
        try:
            self.core.read_namespaced_secret(meta["name"], meta["namespace"])
            return False
        except ApiException as exc:
            if exc.status != 404:
                raise
        try:
            self.core.create_namespaced_secret(meta["namespace"], obj)  # type: ignore[arg-type]
        except ApiException as exc:
            if exc.status == 409:  # created concurrently: fine
                return False
            raise
        return True

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector)
        return [self.api_client.sanitize_for_serialization(p) for p in pods.items]

    def patch_pod_metadata(self, namespace: str, name: str, labels: dict[str, str],
                           annotations: dict[str, str | None]) -> None:
        """Merge-patch labels/annotations; a None value removes the key."""
        body = {"metadata": {"labels": labels, "annotations": annotations}}
        self.core.patch_namespaced_pod(name, namespace, body)


    def resize_pod_cpu(self, namespace: str, name: str, container: str, cpu: str) -> None:
        """Set one container's CPU request and limit in place (the pod's ``resize``
        subresource, Kubernetes 1.33+); the kubelet applies it without a restart."""
        body = {"spec": {"containers": [{"name": container, "resources": {
            "requests": {"cpu": cpu}, "limits": {"cpu": cpu}}}]}}
        resize = getattr(self.core, "patch_namespaced_pod_resize", None)
        if resize is None:  # a kubernetes client older than the resize subresource
            raise ResizeRefused("this kubernetes client has no pods/resize call")
        try:
            resize(name, namespace, body)
        except ApiException as exc:
            raise ResizeRefused(f"{exc.status} {exc.reason}") from None

    def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
        """Set a Deployment's ``spec.replicas`` (a merge patch of that field alone)."""
        self.apps.patch_namespaced_deployment(name, namespace, {"spec": {"replicas": replicas}})

    def delete_pod(self, namespace: str, name: str, grace_seconds: int | None = None) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace,
                                            grace_period_seconds=grace_seconds)
        except ApiException as exc:
            if exc.status != 404:
                raise


def random_password() -> str:
    return secrets.token_urlsafe(24)


def _api_message(exc: Exception) -> str:
    """The ``message`` of a Kubernetes Status body, else the exception's text."""
    import json

    try:
        return str(json.loads(getattr(exc, "body", "") or "{}")["message"])
    except (ValueError, KeyError, TypeError):
        return str(exc)

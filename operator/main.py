"""``turnstorm operator``: run the kopf operator."""

from __future__ import annotations

import asyncio
import os


def run(*, namespace: str | None, liveness: str | None, kubeconfig: str | None,
        exporter_image: str | None) -> None:
    if kubeconfig:
        os.environ["TURNSTORM_KUBECONFIG"] = kubeconfig
        os.environ["KUBECONFIG"] = kubeconfig
    if exporter_image:
        os.environ["TURNSTORM_EXPORTER_IMAGE"] = exporter_image
    import kopf

    from turnstorm.operator import handlers  # noqa: F401 - registers the handlers

    asyncio.run(kopf.operator(
        clusterwide=namespace is None,
        namespaces=[namespace] if namespace else (),
        liveness_endpoint=liveness,
        standalone=True,
    ))

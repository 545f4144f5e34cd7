"""``turnstorm operator``: run the kopf operator."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any, cast


def run(*, namespace: str | None, liveness: str | None, kubeconfig: str | None,
        exporter_image: str | None, metrics_port: int | None = None) -> None:
    if kubeconfig:
        os.environ["TURNSTORM_KUBECONFIG"] = kubeconfig
        os.environ["KUBECONFIG"] = kubeconfig
    if exporter_image:
        os.environ["TURNSTORM_EXPORTER_IMAGE"] = exporter_image
    import kopf

    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port)

    from turnstorm.operator import handlers  # noqa: F401 - registers the handlers

    asyncio.run(kopf.operator(
        # kopf's own default asks the password database for the user's name, which a
        # container running as a bare uid (the chart's 65532) does not have
        # (kopf's Identity is a NewType of str that kopf does not export)
        identity=cast(Any, f"turnstorm@{socket.gethostname()}/{os.getpid()}"),
        clusterwide=namespace is None,
        namespaces=[namespace] if namespace else (),
        liveness_endpoint=liveness,
        standalone=True,
    ))

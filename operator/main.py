"""``turnstorm operator``: run the kopf operator."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from typing import Any, cast


def run(*, namespace: str | None, liveness: str | None, kubeconfig: str | None,
        exporter_image: str | None, metrics_port: int | None = None) -> None:
    import kopf

    from turnstorm.operator.settings import Settings

    settings = Settings.from_environment()
    settings = dataclasses.replace(settings, kubeconfig=kubeconfig or settings.kubeconfig,
                                   exporter_image=exporter_image or settings.exporter_image)

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
        memo=kopf.Memo(settings=settings),
    ))

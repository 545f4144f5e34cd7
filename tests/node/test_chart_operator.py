"""The chart on a real node: `helm install` with the image `make image` builds (the
chart's default), the operator pod Ready with only the chart's RBAC, its liveness probe
passing, its metrics scraped by a real Prometheus."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from tests.node.conftest import Prometheus
from turnstorm.testing.cluster import OPERATOR_NAMESPACE, wait_for
from turnstorm.testing.node import Node


def test_operator_pod_runs_the_built_image_and_stays_live(
        node: Node, operator: str, images: dict[str, str]) -> None:
    pod = json.loads(node.kubectl("-n", OPERATOR_NAMESPACE, "get", "pod", operator,
                                  "-o", "json").stdout)
    container = pod["spec"]["containers"][0]
    assert container["image"] == images["turnstorm"]  # the chart's default, not --set
    assert pod["spec"]["serviceAccountName"] == "turnstorm"
    assert pod["spec"]["securityContext"]["runAsUser"] == 65532
    # the liveness probe (kopf's /healthz) is run by the kubelet every 20 s after 10 s:
    # still no restart a full probe period later
    started = pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
    assert started
    time.sleep(max(0.0, 35 - _age_seconds(pod)))
    pod = json.loads(node.kubectl("-n", OPERATOR_NAMESPACE, "get", "pod", operator,
                                  "-o", "json").stdout)
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"] is True
    assert status["restartCount"] == 0
    events = node.kubectl("-n", OPERATOR_NAMESPACE, "get", "events", "--field-selector",
                          f"involvedObject.name={operator}", "-o", "json").stdout
    reasons = {e["reason"] for e in json.loads(events)["items"]}
    assert "Unhealthy" not in reasons and "BackOff" not in reasons, reasons


def _age_seconds(pod: dict[str, object]) -> float:
    import datetime

    status = pod["status"]
    assert isinstance(status, dict)
    start = datetime.datetime.fromisoformat(str(status["startTime"]).replace("Z", "+00:00"))
    return (datetime.datetime.now(datetime.UTC) - start).total_seconds()


def test_operator_metrics_are_scraped(node: Node, operator: str,
                                      prometheus: Callable[[list[str]], Prometheus]) -> None:
    ip = node.kubectl("-n", OPERATOR_NAMESPACE, "get", "pod", operator, "-o",
                      "jsonpath={.status.podIP}").stdout.strip()
    server = prometheus([f"{ip}:9642"])

    def scraped() -> list[dict[str, object]]:
        return server.query('up{job="node"} == 1') and server.query(
            "turnstorm_operator_pools")

    result = wait_for(scraped, 60, what="Prometheus scraping the operator pod")
    assert result[0]["metric"]["instance"] == f"{ip}:9642"

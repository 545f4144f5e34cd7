"""Where a pool's relay signals come from: each relay's exporter sidecar, Prometheus, and
the operator's own STUN probe.

Each source returns the raw exporter values per pod (:func:`turnstorm.signals.scrape_signals`
keys); :class:`~turnstorm.signals.SignalTracker` turns them into the policy's signals.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Protocol

from turnstorm.operator.pods import PodView
from turnstorm.proto import stun
from turnstorm.signals import METRIC_PREFIX, scrape_signals
from turnstorm.spec import TurnPoolSpec


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
        return (f'{{__name__=~"{METRIC_PREFIX}.+",namespace="{spec.namespace}",'
                f'pod=~"{names}"}}')

    def read(self, spec: TurnPoolSpec, pods: list[PodView]) -> dict[str, dict[str, float] | None]:
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
            if pod not in out or not name.startswith(METRIC_PREFIX):
                continue
            own = tuple(sorted((k, v) for k, v in metric.items() if k not in SCRAPE_LABELS))
            value = float(item["value"][1])
            key = (pod, name[len(METRIC_PREFIX):], own)
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


def signal_source(spec: TurnPoolSpec) -> SignalSource | None:
    """The source ``spec.metrics`` names; None when Prometheus has no URL."""
    if spec.metrics_source == "prometheus":
        return PrometheusSource(spec.prometheus_url) if spec.prometheus_url else None
    return ExporterScraper()

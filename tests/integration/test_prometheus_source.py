"""The operator's Prometheus signal source against a real Prometheus."""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from turnstorm.operator.pods import PodView
from turnstorm.operator.sources import PrometheusSource
from turnstorm.relay.process import free_port
from turnstorm.spec import turnpool_from_object

pytestmark = pytest.mark.integration

METRICS = b"""# TYPE turnstorm_relay_allocations gauge
turnstorm_relay_allocations 300
# TYPE turnstorm_relay_packets_total counter
turnstorm_relay_packets_total{direction="rx"} 10
turnstorm_relay_packets_total{direction="tx"} 5
"""


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(METRICS)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def twice_scraped(tmp_path: Path) -> Iterator[str]:
    """A Prometheus scraping one relay's metrics endpoint through two jobs, as when both
    the pool's ServiceMonitor and a PodMonitor select it."""
    binary = shutil.which("prometheus")
    require(binary is not None, "Prometheus not found (Debian: apt-get install prometheus)")
    assert binary is not None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = f"127.0.0.1:{server.server_address[1]}"
    labels = {"namespace": "ns", "pod": "relay-0"}
    (tmp_path / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": job, "static_configs": [
            {"targets": [target], "labels": labels}]} for job in ("service", "pod")]}))
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode(
                        {"query": "count(turnstorm_relay_allocations)"}), timeout=2) as reply:
                    result = json.load(reply)["data"]["result"]
            except OSError:
                continue
            if result and result[0]["value"][1] == "2":  # both jobs scraped
                break
        else:
            pytest.fail("Prometheus did not scrape the endpoint through both jobs")
        yield url
    finally:
        process.terminate()
        process.wait(10)
        server.shutdown()


def test_a_relay_scraped_by_two_jobs_counts_once(twice_scraped: str) -> None:
    spec = turnpool_from_object({
        "apiVersion": "turnstorm.io/v1alpha1", "kind": "TurnPool",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"realm": "r.example", "authSecretRef": {"name": "auth"}}})
    pod = PodView("relay-0", "127.0.0.1", True, False, None, False)
    signals = PrometheusSource(twice_scraped).read(spec, [pod])
    assert signals == {"relay-0": {"allocations": 300.0, "packets_total": 15.0}}

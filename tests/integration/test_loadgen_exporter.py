"""The Prometheus endpoint of `turnstorm storm`, scraped while the storm runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from turnstorm.relay.process import LocalRelay, free_port

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_storm_serves_prometheus_metrics_during_the_run(relay: LocalRelay,
                                                         tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(relay.secret)
    port = free_port()
    target = f"turn:{relay.host}:{relay.port}?transport=udp"
    storm = subprocess.Popen(
        [sys.executable, "-m", "turnstorm", "storm", "--target", target, "--secret-file",
         str(secret_file), "--mix", "both", "--users", "4", "--spawn-rate", "50",
         "--duration", "6", "--session", "fixed:2", "--max-pps", "1000", "--quiet",
         "--metrics-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                samples = scrape(port)
            except OSError:
                continue
            if samples.get(("turnstorm_loadgen_media_rtt_seconds_count",
                            (("target", target),)), 0) > 50:
                break
        _, err = storm.communicate(timeout=30)
    finally:
        if storm.poll() is None:
            storm.kill()
            storm.wait()
    assert storm.returncode == 0, err

    def value(metric: str, **labels: str) -> float:
        return samples[(metric, tuple(sorted(labels.items())))]

    assert value("turnstorm_loadgen_transactions_total", type="STUN", name="Binding",
                 result="ok") > 100
    assert value("turnstorm_loadgen_transactions_total", type="TURN", name="Allocate",
                 result="failure") == 0
    assert value("turnstorm_loadgen_rtt_seconds_count", type="STUN", name="Binding") > 100
    assert value("turnstorm_loadgen_rtt_seconds_bucket", type="STUN", name="Binding",
                 le="+Inf") == value("turnstorm_loadgen_rtt_seconds_count", type="STUN",
                                     name="Binding")
    p50 = value("turnstorm_loadgen_media_rtt_seconds", target=target, quantile="0.5")
    p999 = value("turnstorm_loadgen_media_rtt_seconds", target=target, quantile="0.999")
    assert 0 < p50 <= p999 < 0.1
    assert 0 <= value("turnstorm_loadgen_media_jitter_seconds", target=target) < 0.05
    assert value("turnstorm_loadgen_media_loss_ratio", target=target) == 0
    assert value("turnstorm_loadgen_allocations", state="active") >= 1
    assert value("turnstorm_loadgen_allocations", state="failed") == 0
    assert value("turnstorm_loadgen_users", user_class="TurnSessionUser") >= 1
    assert ("turnstorm_loadgen_relay_overhead_seconds", (("target", target),)) in samples

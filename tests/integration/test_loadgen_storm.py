"""`turnstorm storm` as a subprocess against a real coturn: results.json and the table."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from turnstorm.localrelay import LocalRelay

pytestmark = pytest.mark.integration


def test_storm_writes_results_with_sane_values(relay: LocalRelay, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(relay.secret + "\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "turnstorm", "storm",
               "--target", f"turn:{relay.host}:{relay.port}", "--secret-file", str(secret_file),
               "--mix", "both", "--users", "4", "--spawn-rate", "20", "--duration", "5",
               "--session", "fixed:1.5", "--max-pps", "1500", "--out", str(out)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    for key in ("rtt_ms", "jitter_ms", "delay_std_ms", "loss_pct", "relay_overhead_ms",
                "allocations", "transactions"):
        assert key in results
    assert set(results["rtt_ms"]) == {"p50", "p95", "p99", "p999"}
    assert 0 < results["rtt_ms"]["p50"] <= results["rtt_ms"]["p99"] <= results["rtt_ms"]["p999"]
    assert results["rtt_ms"]["p50"] < 50
    assert results["loss_pct"] == 0
    assert 0 <= results["jitter_ms"] < 50
    assert 0 <= results["delay_std_ms"] < 50
    assert -5 < results["relay_overhead_ms"] < 30
    allocations = results["allocations"]
    assert allocations["ok"] >= 4 and allocations["failed"] == 0
    assert allocations["released"] == allocations["ok"]
    transactions = results["transactions"]
    assert transactions["STUN Binding"]["count"] > 1000  # the flood users, within 1500/s
    assert transactions["STUN Binding"]["count"] < 1500 * 6
    assert transactions["TURN Allocate"] == {"count": allocations["ok"], "failures": 0}
    assert all(row["failures"] == 0 for row in transactions.values()), transactions
    assert results["packets"]["sent"] == results["packets"]["received"] > 200
    rows = list(csv.DictReader((out / "transactions.csv").open()))
    assert {(r["type"], r["name"]) for r in rows} >= {("TURN", "Allocate"), ("MEDIA", "echo")}
    assert "latency (media RTT p50/p99)" in done.stdout
    assert "< 150 ms" in done.stdout and "0-30 ms" in done.stdout
    assert "[    1 s] users" in done.stderr  # progress while running

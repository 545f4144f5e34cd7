"""`turnstorm storm` as a subprocess against a real coturn: results.json and the table."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from turnstorm.relay.process import LocalRelay

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


def storm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "turnstorm", "storm", *args], check=False,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_a_storm_that_measured_nothing_says_so(relay: LocalRelay, tmp_path: Path) -> None:
    """A wrong secret: every Allocate fails. The table shows no figure as within the ideal,
    the failures are named and the exit status is not 0."""
    secret_file = tmp_path / "secret"
    secret_file.write_text("not-the-relay-secret\n")
    done = storm("--target", f"turn:{relay.host}:{relay.port}", "--secret-file",
                 str(secret_file), "--users", "2", "--duration", "3", "--quiet",
                 "--out", str(tmp_path / "out"))
    assert done.returncode == 3, done.stderr
    lines = [line for line in done.stdout.splitlines() if "n/a (no media)" in line]
    assert len(lines) == 4 and all(line.endswith("OUTSIDE") for line in lines), done.stdout
    assert "no media was measured: TURN Allocate:" in done.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["media_measured"] is False
    assert results["allocations"]["ok"] == 0 and results["allocations"]["failed"] >= 2


def count_datagrams(seconds: float) -> tuple[socket.socket, Callable[[], int]]:
    """A UDP socket on loopback that never answers; the function counts what arrived."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(seconds)

    def count() -> int:
        received = 0
        sink.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            while True:
                sink.recv(2048)
                received += 1
        return received

    return sink, count


@pytest.mark.parametrize("kind", ["idle keepalives", "retransmissions"])
def test_max_pps_bounds_keepalives_and_retransmissions(kind: str) -> None:
    """A silent server: idle subscribers keep sending keepalives and every Binding of a
    non-backing-off flood is retransmitted; --max-pps 40 holds all of it."""
    sink, count = count_datagrams(10)
    with sink:
        port = sink.getsockname()[1]
        args = ["--target", f"turn:127.0.0.1:{port}", "--duration", "3", "--quiet",
                "--max-pps", "40"]
        if kind == "idle keepalives":
            args += ["--mix", "idle", "--crowd-size", "100", "--binding-interval", "0.1",
                     "--users", "1", "--crowd-transport", "sockets"]
        else:
            args += ["--mix", "stun", "--users", "20", "--spawn-rate", "100",
                     "--shape", "retransmit-amplification", "--shape-param", "base_users=20",
                     "--shape-param", "wave_users=0", "--shape-param", "no_backoff_fraction=1"]
        done = storm(*args)
        received = count()
    assert done.returncode == 3, done.stderr  # nothing was ever answered
    # 3 s at 40/s plus the limiter's 50 ms of credit; unbounded it would be 1000/s
    assert 40 <= received <= 40 * 3.5, received


def test_ctrl_c_stops_the_users_and_keeps_the_results(relay: LocalRelay,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "turnstorm", "storm", "--target",
         f"turn:{relay.host}:{relay.port}", "--mix", "stun", "--users", "2", "--duration",
         "60", "--max-pps", "200", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert process.stderr is not None
    for line in process.stderr:  # the run is under way once progress shows
        if "[    2 s] users" in line:
            break
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "interrupted after" in stderr
    results = json.loads((out / "results.json").read_text())
    assert results["transactions"]["STUN Binding"]["count"] > 100
    assert results["run"]["duration_s"] < 30
    assert "latency (media RTT p50/p99)" in stdout

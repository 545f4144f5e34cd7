"""``turnstorm run`` end to end on real coturn: the quick scenario, Ctrl-C, leftovers."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "scenarios" / "quick.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def prerequisites(turnserver_bin: str) -> None:
    require(os.geteuid() == 0, "the local mode caps relays with cgroups: run as root")
    pytest.importorskip("matplotlib")


def marked_processes(mark: str) -> list[int]:
    """Processes whose environment carries ``mark`` (everything the run started)."""
    needle = f"TURNSTORM_TEST_MARK={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as handle:
                    if needle in handle.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def relay_cgroups() -> list[str]:
    from turnstorm.relay.cgroup import PARENT, detect

    parent = os.path.join(detect().root, PARENT)
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return []
    return [n for n in names if "-fixed-relay-" in n or "-autoscaled-relay-" in n]


def udp_bound(host: str, port: int) -> bool:
    a, b, c, d = (int(x) for x in host.split("."))
    local = f"{d:02X}{c:02X}{b:02X}{a:02X}:{port:04X}"
    with open("/proc/net/udp", encoding="ascii") as handle:
        return any(line.split()[1] == local for line in handle.readlines()[1:])


def start(args: list[str], mark: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "turnstorm", "run", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TURNSTORM_TEST_MARK=mark))


def assert_nothing_left(mark: str, cgroups_before: set[str]) -> None:
    deadline = time.monotonic() + 5
    while marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marked_processes(mark) == []
    assert set(relay_cgroups()) - cgroups_before == set()


def test_quick_scenario(prerequisites: None, tmp_path: Path) -> None:
    mark = secrets.token_hex(8)
    cgroups_before = set(relay_cgroups())
    out = tmp_path / "out"
    began = time.monotonic()
    process = start([str(QUICK), "--out", str(out), "--plain"], mark)
    stdout, stderr = process.communicate(timeout=150)
    took = time.monotonic() - began
    assert process.returncode == 0, stderr[-3000:]
    assert took <= 90, f"the quick scenario took {took:.0f} s"
    report = json.loads((out / "report.json").read_text())
    fixed, auto = report["phases"]["fixed"], report["phases"]["autoscaled"]
    fm, am = fixed["media"], auto["media"]
    # the storm breaks the fixed pool's ideal column
    assert fm["rtt_ms"]["p99"] > 150 or fm["loss_pct"] > 1, fm
    # the autoscaled pool scales out and back in, without cutting a call
    scaling = auto["scaling"]
    assert scaling["relays_max"] > report["scenario"]["turnpool"]["spec"]["replicas"]["min"]
    assert scaling["relays_started"] >= 1 and scaling["relays_removed"] >= 1, scaling
    assert auto["allocations_cut"] == 0
    assert fixed["scaling"]["relays_max"] == fixed["scaling"]["relays_min"]
    # and does better than the fixed pool
    assert am["rtt_ms"]["p99"] < fm["rtt_ms"]["p99"]
    # loss: lower, or both within the ideal and apart by less than the noise floor (a few
    # packets of calls stopped mid-flight)
    assert am["loss_pct"] < fm["loss_pct"] or (am["loss_pct"] < 1 and
                                               am["loss_pct"] - fm["loss_pct"] < 0.05), (am, fm)
    # the table and the files
    assert "| metric" in stdout and "end-to-end latency p99" in stdout
    header = (out / "timeseries.csv").read_text().splitlines()[0]
    assert header.startswith("time_s,phase,phase_time_s,users,offered_pps,rtt_p50_ms")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in report["files"].values():
        if name.endswith(".png"):
            data = (out / name).read_bytes()
            assert data[:8] == PNG_MAGIC, name
            image = plt.imread(str(out / name))
            assert image.shape[0] > 100 and image.shape[1] > 100
    # nothing left behind: processes, cgroups, relay ports
    assert_nothing_left(mark, cgroups_before)
    for event in fixed["pool_events"] + auto["pool_events"]:
        if event.startswith("started "):
            host, port = event.split(" on ")[1].split()[0].split(":")
            assert not udp_bound(host, int(port)), event


def test_sigint_stops_everything(prerequisites: None, tmp_path: Path) -> None:
    mark = secrets.token_hex(8)
    cgroups_before = set(relay_cgroups())
    process = start([str(QUICK), "--out", str(tmp_path / "out"), "--plain",
                     "--no-prometheus"], mark)
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    for line in process.stderr:
        if line.startswith("phase ") or time.monotonic() > deadline:
            break
    time.sleep(4)
    assert len(marked_processes(mark)) >= 3  # us, the echo peer, a relay, the generator
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=40)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert_nothing_left(mark, cgroups_before)

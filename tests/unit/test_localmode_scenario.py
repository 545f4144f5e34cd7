"""Scenario files, the run command's options and the local mode's pure parts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from turnstorm.cli import build_parser
from turnstorm.loadgen.metrics import percentile_ms, std_ms
from turnstorm.loadgen.rotation import Rotation
from turnstorm.localmode.report import format_table, table_rows
from turnstorm.localmode.scenario import ScenarioError, load_scenario, parse_scenario
from turnstorm.uri import parse_uri

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "scenarios"

POOL = """\
apiVersion: turnstorm.io/v1alpha1
kind: TurnPool
metadata: {name: p}
spec:
  realm: r
  authSecretRef: {name: s}
  replicas: {min: 1, max: 4, target: 1}
  resources: {cpu: 100m}
"""
LOAD = """\
apiVersion: turnstorm.io/v1alpha1
kind: LoadRun
metadata: {name: l}
spec:
  target: {poolRef: {name: p}}
  durationSeconds: 30
"""


@pytest.mark.parametrize("name", ["default.yaml", "quick.yaml"])
def test_shipped_scenarios_are_valid(name: str) -> None:
    scenario = load_scenario(str(SCENARIOS / name))
    assert scenario.pool.min_replicas < scenario.pool.max_replicas
    assert scenario.pool.cpu_cores <= 0.2
    timing = scenario.timing()
    assert 1.0 <= timing.interval_seconds <= 2.0
    total = 2 * scenario.load.duration
    assert total <= (200 if name == "default.yaml" else 75)


def test_defaults_and_timing_mapping() -> None:
    scenario = parse_scenario(POOL + "---\n" + LOAD)
    assert scenario.load.shape == "steady"
    assert scenario.load.shape_params == {"users": 100.0}
    assert scenario.load.turn_weight == 70 and scenario.load.binding_weight == 30
    timing = scenario.timing()
    assert timing.time_scale == 10
    assert timing.interval_seconds == 1.5  # intervalSeconds 15 / 10
    assert timing.local(300) == 30  # the default scale-down window
    assert scenario.timing(30).interval_seconds == 1.0  # clamped


@pytest.mark.parametrize(("text", "field"), [
    (POOL.replace("min: 1, max: 4", "min: 5, max: 4") + "---\n" + LOAD,
     "TurnPool p: spec: Invalid value: spec.replicas.min must be less than"),
    (POOL + "---\n" + LOAD.replace("durationSeconds: 30", "durationSeconds: 0"),
     "LoadRun l: spec.durationSeconds: should be greater than or equal to 1"),
    (POOL + "---\n" + LOAD.replace("name: p}", "name: other}"),
     "LoadRun l: spec.target.poolRef.name"),
    (POOL, "a LoadRun document is missing"),
    (POOL + "---\n" + LOAD.replace("  durationSeconds: 30\n", "  usrs: 3\n"),
     "LoadRun l: spec.durationSeconds: Required value"),
    (POOL.replace("cpu: 100m", "cpu: lots") + "---\n" + LOAD, "spec.resources.cpu"),
    ("a: [", "not valid YAML"),
])
def test_bad_scenarios_name_the_field(text: str, field: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text, "bad.yaml")
    message = str(caught.value)
    assert message.startswith("bad.yaml: ")
    assert field in message
    assert "\n" not in message


def test_cel_message_is_the_apiservers() -> None:
    import yaml

    crd = yaml.safe_load((ROOT / "crds" / "turnpools.yaml").read_text())
    rules = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "x-kubernetes-validations"]
    message = next(r["message"] for r in rules if r["rule"] ==
                   "self.replicas.min <= self.replicas.max")
    with pytest.raises(ScenarioError, match=message.replace(".", r"\.")):
        parse_scenario(POOL.replace("min: 1, max: 4", "min: 5, max: 4") + "---\n" + LOAD)


def test_bad_file_one_line_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(POOL + "---\n" + LOAD.replace("durationSeconds: 30", "durationSeconds: -5"))
    done = subprocess.run([sys.executable, "-m", "turnstorm", "run", str(bad)],
                          check=False, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "spec.durationSeconds" in lines[0] and "Traceback" not in done.stderr
    assert lines[0].startswith("turnstorm run: ")


def test_help_documents_every_option() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    run = sub.choices["run"]  # type: ignore[attr-defined]
    text = run.format_help()
    for action in run._actions:
        assert action.help, action.dest
        for option in action.option_strings:
            assert option in text
    for option in ("--web", "--workers", "--duration", "--out", "--seed", "--time-scale"):
        assert option in text


def test_rotation_least_connections(tmp_path: Path) -> None:
    path = str(tmp_path / "rotation.json")
    writer = Rotation(path)
    writer.publish(["turn:127.0.0.2:3478", "turn:127.0.0.3:3478"])
    reader = Rotation(path)  # another process would see this
    first = reader.pick()
    assert first is not None
    reader.acquire(first)
    second = reader.pick()
    assert second is not None and second != first
    reader.acquire(second)
    writer.publish(["turn:127.0.0.2:3478", "turn:127.0.0.3:3478", "turn:127.0.0.4:3478"])
    os.utime(path, ns=(1, 1))  # a different stamp even within one mtime tick
    third = reader.pick()
    assert third is not None and third.host == "127.0.0.4"
    reader.release(first)
    assert reader.active == {str(second): 1}


def test_rotation_pack_fills_the_oldest_relay_first(tmp_path: Path) -> None:
    path = str(tmp_path / "rotation.json")
    relays = ["turn:127.0.0.2:3478", "turn:127.0.0.3:3478", "turn:127.0.0.4:3478"]
    writer = Rotation(path)
    # fill 6 over 2 Locust processes: 3 calls of this process per relay
    writer.publish(relays, fill=6, processes=2)
    reader = Rotation(path)
    fallback = parse_uri("turn:127.0.0.9:3478")  # used only if the rotation were empty
    hosts = [reader.claim(fallback).host for _ in range(7)]
    assert hosts == ["127.0.0.2"] * 3 + ["127.0.0.3"] * 3 + ["127.0.0.4"]
    # A saturated relay is skipped even below its fill; a call ending makes room again.
    writer.publish(relays, fill=6, processes=2, full=frozenset([relays[2]]))
    os.utime(path, ns=(2, 2))
    reader.release(parse_uri(relays[0]))
    assert str(reader.pick()) == str(parse_uri(relays[0]))
    reader.acquire(parse_uri(relays[0]))
    # every relay full or saturated: least connections (127.0.0.4 has 1 call)
    assert str(reader.pick()) == str(parse_uri(relays[2]))
    # spread again
    writer.publish(relays)
    os.utime(path, ns=(3, 3))
    assert reader.pick() is not None and reader.fill is None and not reader.full


def test_interval_statistics() -> None:
    buckets = {1000: 98, 200_0: 1}  # 98 x 1 ms, 1 x 2 ms (exact buckets below 2048 us)
    assert percentile_ms(buckets, 50) == 1.0
    assert percentile_ms({}, 99) is None
    assert std_ms({1000: 1, 3000 // 2: 1}) is not None


def test_table_marks_what_breaks_the_ideal() -> None:
    phases = {
        "fixed": {"media": {"rtt_ms": {"p99": 420.0}, "loss_pct": 2.0, "delay_std_ms": 90.0,
                            "relay_overhead_ms": 60.0},
                  "scaling": {"relay_seconds": 30.0}, "allocations_cut": 0},
        "autoscaled": {"media": {"rtt_ms": {"p99": 40.0}, "loss_pct": 0.0,
                                 "delay_std_ms": 8.0, "relay_overhead_ms": 2.0},
                       "scaling": {"relay_seconds": 90.0}, "allocations_cut": 0},
    }
    rows = table_rows(phases)
    assert [r["metric"] for r in rows][:4] == ["end-to-end latency p99", "packet loss",
                                               "jitter (std)", "relay overhead"]
    assert rows[0]["fixed_ok"] is False and rows[0]["autoscaled_ok"] is True
    text = format_table(rows)
    assert text.splitlines()[0].startswith("| metric")
    assert "420.00 ms ✗" in text and "| 40.00 ms " in text

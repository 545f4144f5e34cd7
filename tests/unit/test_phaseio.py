"""The local mode's phase records, and local mode without Locust."""

from __future__ import annotations

import subprocess
import sys

import pytest

from turnstorm.loadgen.phaseio import (
    GeneratorRow,
    PhaseError,
    PhaseJob,
    PhaseResult,
    decode,
    encode,
)

RECORDS = [
    PhaseJob(phase="fixed", config={"targets": ["turn:127.0.0.2:3478"], "secret": "s"},
             shape="steady", shape_params={"users": 4}, duration=12.5, users=4,
             turn_weight=1, binding_weight=0, cgnat=[2, 64, 120.0], metrics_port=None,
             workers=0, web=8089, priority=-10),
    GeneratorRow(phase="autoscaled", phase_time_s=3.001, users=20, offered_pps=1000.5,
                 rtt_p50_ms=1.5, rtt_p99_ms=None, loss_pct=0.0, jitter_ms=None),
    PhaseResult(duration_s=30.2, media={"sent": 10}, counters={"calls": 3},
                send_lag_ms={"p50": 0.1}),
    PhaseError("LoadRun: no such shape"),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_every_record_survives_its_json_line(record: object) -> None:
    line = encode(record)  # type: ignore[arg-type]
    assert line.endswith("\n") and line.count("\n") == 1
    assert decode(line) == record


@pytest.mark.parametrize(("line", "message"), [
    ("{}", "not a phase record: '{}' ('kind')"),
    ('{"kind": "row", "data": {"phase": "x"}}', "not a phase record: "),
    ("nonsense", "not a phase record: 'nonsense'"),
])
def test_anything_else_is_refused(line: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        decode(line)
    assert str(caught.value).startswith(message)


def test_local_mode_imports_no_locust() -> None:
    modules = ["run", "series", "control", "progress", "report", "scenario"]
    code = ("import sys\n"
            + "".join(f"import turnstorm.localmode.{m}\n" for m in modules)
            + "print(sorted(m for m in ('locust', 'gevent') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"

"""``turnstorm run`` killed with SIGKILL mid-phase, when the autoscaler has started relays
of its own: within 10 s nothing of that run is left (relays, cgroups, nft tables, ports,
directories, any process), nothing it or its children print is a traceback, and the next
run works.

The phase's generator and the echo peer inherit the run's stderr: the test reads both of
the run's pipes to their end, which comes only once every process holding them exited,
so what they print after the kill is checked too."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import require
from tests.integration.leftovers import (
    LEFT_WITHIN,
    TRACEBACK_SIGNS,
    Reader,
    footprint,
    left_of,
    nft_tables,
)
from tests.integration.test_localmode import QUICK, assert_nothing_left, relay_cgroups, start

pytestmark = pytest.mark.integration


@pytest.fixture
def prerequisites(turnserver_bin: str) -> None:
    require(os.geteuid() == 0, "the local mode caps relays with cgroups: run as root")
    require(shutil.which("nft") is not None, "nft not found (apt-get install nftables)")
    pytest.importorskip("matplotlib")


def test_sigkill_mid_phase_leaves_nothing(prerequisites: None, tmp_path: Path) -> None:
    mark = secrets.token_hex(8)
    tables = nft_tables()
    process = start([str(QUICK), "--out", str(tmp_path / "killed"), "--plain",
                     "--phase", "autoscaled"], mark)
    assert process.stdout is not None and process.stderr is not None
    out, err = Reader(process.stdout), Reader(process.stderr, "scaling: started")
    try:
        # mid-phase, once the autoscaler (a thread of the run) has started a relay
        assert err.seen.wait(90), err.text[-3000:]
        time.sleep(1.0)
        before = footprint(mark)
        assert len(before.relays) >= 2 and len(before.cgroups) >= len(before.relays), before
        assert before.ports and len(before.directories) >= len(before.relays) + 1, before
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        process.wait(10)
        while left_of(before, tables, mark) and time.monotonic() - killed < LEFT_WITHIN:
            time.sleep(0.2)
        assert left_of(before, tables, mark) == {}
        for reader in (out, err):
            reader.thread.join(max(0.1, killed + LEFT_WITHIN - time.monotonic()))
            assert not reader.thread.is_alive(), "a process of the run still holds its pipes"
    finally:
        if process.poll() is None:
            process.kill()
    printed = out.text + err.text
    assert not [sign for sign in TRACEBACK_SIGNS if sign in printed], printed[-3000:]
    assert out.text == ""  # the table comes at the end of a run, never after a kill
    next_run(tmp_path)


def next_run(tmp_path: Path) -> None:
    """A short run right after: relays, cgroups and ports are all there to be had."""
    mark = secrets.token_hex(8)
    cgroups_before = set(relay_cgroups())
    out = tmp_path / "next"
    process = start([str(QUICK), "--out", str(out), "--plain", "--phase", "fixed",
                     "--duration", "5", "--no-prometheus"], mark)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "| metric" in stdout
    report = json.loads((out / "report.json").read_text())
    events = report["phases"]["fixed"]["pool_events"]
    assert any(event.startswith("started fixed-relay-0 on 127.0.0.") for event in events)
    assert_nothing_left(mark, cgroups_before)

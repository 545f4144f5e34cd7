"""``turnstorm storm --workers 1`` killed with SIGKILL while its users call a real coturn:
its echo peer and its Locust worker notice and exit within 10 s, quietly, and free
their ports."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.leftovers import (
    LEFT_WITHIN,
    TRACEBACK_SIGNS,
    Reader,
    footprint,
    held_by_run,
)
from tests.integration.test_localmode import marked_processes
from turnstorm.relay.process import LocalRelay

pytestmark = pytest.mark.integration


def test_sigkill_leaves_no_echo_peer_or_worker(relay: LocalRelay, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(relay.secret + "\n")
    mark = secrets.token_hex(8)
    process = subprocess.Popen(
        [sys.executable, "-m", "turnstorm", "storm", "--target",
         f"turn:{relay.host}:{relay.port}", "--secret-file", str(secret_file), "--users", "4",
         "--spawn-rate", "20", "--duration", "60", "--session", "fixed:2", "--max-pps",
         "1500", "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "TURNSTORM_TEST_MARK": mark})
    assert process.stdout is not None and process.stderr is not None
    out, err = Reader(process.stdout), Reader(process.stderr, "s] users    4")
    try:
        assert err.seen.wait(60), err.text[-3000:]
        before = footprint(mark)
        commands = {Path(f"/proc/{pid}/cmdline").read_text().split("\0")[2]
                    for pid in before.pids - {process.pid}}
        assert commands == {"turnstorm.loadgen.echo", "turnstorm.loadgen.worker"}
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        process.wait(10)
        while marked_processes(mark) and time.monotonic() - killed < LEFT_WITHIN:
            time.sleep(0.2)
        assert marked_processes(mark) == []
        assert held_by_run(before.ports, mark) == set()
        for reader in (out, err):
            reader.thread.join(max(0.1, killed + LEFT_WITHIN - time.monotonic()))
            assert not reader.thread.is_alive()
    finally:
        for pid in marked_processes(mark):
            os.kill(pid, signal.SIGKILL)
    printed = out.text + err.text
    assert not [sign for sign in TRACEBACK_SIGNS if sign in printed], printed[-3000:]

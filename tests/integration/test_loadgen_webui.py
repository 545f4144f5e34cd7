"""The Media tab of Locust's web UI, rendered by headless Chromium during a distributed
storm (a master and 2 worker processes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import require
from turnstorm.relay.process import LocalRelay, free_port

pytestmark = pytest.mark.integration
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-quic", "--no-first-run",
                  "--disable-component-update", "--disable-sync"]
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def dump_dom(chromium: str, url: str, wait_ms: int = 0) -> str:
    """The DOM after load (and after ``wait_ms`` of virtual time: the React UI polls
    ``/stats/requests`` every 2 s and renders the rows after the first answer)."""
    budget = [f"--virtual-time-budget={wait_ms}"] if wait_ms else []
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *budget,
             "--dump-dom", url],
            capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr[-1000:]
    return done.stdout


def table_rows(dom: str) -> list[list[str]]:
    body = re.search(r"<tbody.*?</tbody>", dom, re.S)
    if body is None:
        return []
    rows = re.findall(r"<tr.*?</tr>", body.group(0), re.S)
    return [[re.sub(r"<[^>]+>", "", cell).strip()
             for cell in re.findall(r"<td.*?</td>", row, re.S)] for row in rows]


def wait_for_media(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/media.json",
                                        timeout=2) as response:
                rows = json.loads(response.read())
        except OSError:
            continue
        if rows and rows[0]["received"] > 0:
            return
    raise AssertionError(f"no media rows on the web UI within {timeout:g} s")


def test_media_tab_renders_the_live_table(relay: LocalRelay, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    require(chromium is not None, "chromium not found; apt-get install chromium")
    assert chromium is not None
    secret_file = tmp_path / "secret"
    secret_file.write_text(relay.secret)
    port = free_port()
    target = f"turn:{relay.host}:{relay.port}?transport=udp"
    storm = subprocess.Popen(
        [sys.executable, "-m", "turnstorm", "storm", "--target", target, "--secret-file",
         str(secret_file), "--users", "4", "--spawn-rate", "50", "--duration", "14",
         "--session", "fixed:3", "--max-pps", "1000", "--quiet", "--workers", "2",
         "--web", str(port), "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        wait_for_media(port, 12)
        tab = table_rows(dump_dom(chromium, f"http://127.0.0.1:{port}/?tab=media", 4000))
        page = table_rows(dump_dom(chromium, f"http://127.0.0.1:{port}/media"))
        _, err = storm.communicate(timeout=40)
    finally:
        if storm.poll() is None:
            storm.kill()
            storm.wait()
    assert storm.returncode == 0, err[-2000:]
    for rows in (tab, page):
        assert len(rows) == 1, rows
        cells = rows[0]
        assert cells[0] == target
        assert len(cells) == 11
        assert all(NUMBER.match(cell) for cell in cells[1:]), cells
        p50, p95, p99, p999 = (float(c) for c in cells[1:5])
        assert 0 < p50 <= p95 <= p99 <= p999
        assert float(cells[7]) == 0  # loss
        assert int(cells[10]) > 0  # received
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["run"]["workers"] == 2
    assert results["allocations"]["ok"] >= 4
    assert results["allocations"]["failed"] == 0
    assert results["allocations"]["released"] == results["allocations"]["ok"]
    assert results["packets"]["sent"] == results["packets"]["received"] > 0

"""The exporter finds the relay's process by name, as in a pod whose containers share one
process namespace (``shareProcessNamespace``): a private pid namespace made with
``unshare`` holds a real coturn and the exporter, and the relay's CPU seconds come out
and rise under a Binding flood. In the host's namespace, with several relays running,
the name is ambiguous and the CPU is left out with the reason."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from turnstorm import children
from turnstorm.blast import run_binding_blast
from turnstorm.relay.collector import RelayCollector
from turnstorm.relay.process import LocalRelay, free_port, loopback_relay_config
from turnstorm.relay.procfs import ProcessFinder
from turnstorm.signals import scrape_signals

pytestmark = pytest.mark.integration

POD = textwrap.dedent("""
    import os, secrets, subprocess, sys, time
    from turnstorm.relay.process import LocalRelay, free_port, loopback_relay_config
    listen, relay_port, cli_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    password = secrets.token_urlsafe(12)
    config = loopback_relay_config(port=relay_port, cli_port=cli_port, cli_password=password)
    with LocalRelay(config, secrets.token_urlsafe(24)):
        env = dict(os.environ, TURNSTORM_CLI_PASSWORD=password)
        exporter = subprocess.Popen(
            [sys.executable, "-m", "turnstorm", "exporter", "--cli", f"127.0.0.1:{cli_port}",
             "--listen", listen, "--process", "turnserver", "--relay", "pod-0"], env=env)
        print("pid namespace ready", os.getpid(), flush=True)
        try:
            sys.stdin.read()  # until the test closes our stdin
        finally:
            exporter.terminate()
            exporter.wait(10)
""")


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return scrape_signals(response.read().decode())


@pytest.fixture
def pod(turnserver_bin: str) -> Iterator[tuple[str, int]]:
    require(os.geteuid() == 0 and shutil.which("unshare") is not None,
            "a private pid namespace needs root and unshare (util-linux)")
    metrics, relay_port, cli_port = (free_port("127.0.0.1") for _ in range(3))
    child = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", POD,
         f"127.0.0.1:{metrics}", str(relay_port), str(cli_port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.startswith("pid namespace ready 1"), line  # pid 1 of its namespace
        url = f"http://127.0.0.1:{metrics}/metrics"
        deadline = time.monotonic() + 15
        while True:
            try:
                scrape(url)
                break
            except OSError:
                assert time.monotonic() < deadline, "the exporter never served"
                time.sleep(0.2)
        yield url, relay_port
    finally:
        if child.stdin is not None:
            child.stdin.close()
        children.reap(child, 15)


def test_cpu_of_the_relay_found_by_name_in_a_shared_pid_namespace(
        pod: tuple[str, int]) -> None:
    url, relay_port = pod
    before = scrape(url)
    assert "cpu_seconds_total" in before, sorted(before)
    result = run_binding_blast("127.0.0.1", relay_port, duration=1.5, max_rate=20000)
    assert result.received > 1000
    after = scrape(url)
    # a relay answering thousands of Bindings a second burns CPU: the counter rises
    assert after["cpu_seconds_total"] - before["cpu_seconds_total"] >= 0.05, (before, after)
    assert after["allocations"] == 0 and after["up"] == 1


def test_the_name_is_ambiguous_with_several_relays(turnserver_bin: str) -> None:
    relays = [LocalRelay(loopback_relay_config(), secrets.token_urlsafe(24))
              for _ in range(2)]
    try:
        for relay in relays:
            relay.start()
        collector = RelayCollector("r", None, cache_seconds=0.0, process="turnserver")
        snap = collector.snapshot()
        assert snap.cpu_seconds is None
        assert any("processes named 'turnserver'" in e and "--pid" in e
                   for e in snap.errors), snap.errors
    finally:
        for relay in relays:
            relay.stop()


def test_a_restarted_relay_is_found_again(tmp_path: Path) -> None:
    """A process table laid out as /proc is (one directory per pid with its comm): the
    finder keeps its pid while it holds, finds the new one after a restart, and names
    what is wrong when there is none."""
    def process(pid: int, comm: str) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")

    process(1, "pause")
    process(7, "turnserver")
    process(9, "python3")
    finder = ProcessFinder("turnserver", str(tmp_path))
    assert finder.resolve() == 7
    shutil.rmtree(tmp_path / "7")  # the relay container restarts
    process(12, "turnserver")
    assert finder.resolve() == 12
    (tmp_path / "12" / "comm").write_text("sh\n")  # pid reused by another program
    with pytest.raises(Exception, match="no process named 'turnserver'"):
        finder.resolve()

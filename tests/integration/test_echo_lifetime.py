"""The echo peer never outlives the generator that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration

PARENT = """
from turnstorm.loadgen.storm import start_echo_process
import time
process, peer = start_echo_process()
print(process.pid, flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_echo_peer_dies_with_a_killed_generator() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert parent.stdout is not None
    echo_pid = int(parent.stdout.readline())
    assert alive(echo_pid)
    parent.send_signal(signal.SIGKILL)  # no finally, no cleanup: only the kernel can tell
    parent.wait()
    deadline = time.monotonic() + 5
    while alive(echo_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(echo_pid), "the echo peer outlived its generator"

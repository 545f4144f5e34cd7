"""The echo peer as a child process of its own (its CPU does not skew the generator).

Locust-free and gevent-free: the local mode starts one per run, ``turnstorm storm`` one
per storm.
"""

from __future__ import annotations

import subprocess
import sys

from turnstorm.errors import TurnstormError
from turnstorm.loadgen.config import parse_peer
from turnstorm.proto.stun import Address


def start_echo_process() -> tuple[subprocess.Popen[str], Address]:
    """A standalone echo peer (its own process: its CPU does not skew the generator)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "turnstorm.loadgen.echo", "--host", "127.0.0.1"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("echo listening on "):
        process.kill()
        raise TurnstormError(f"the echo peer did not start: {line or 'no output'}")
    return process, parse_peer(line.removeprefix("echo listening on "))

"""The relay container's preStop drain wait (operator/render.py) against a real coturn:
run with the shell and awk of this machine (mawk here; busybox awk and Debian mawk are
what relay images carry), it waits while an allocation holds a relay port and returns
once the allocation is released, or at its deadline."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import time

import pytest

from tests.conftest import require
from tests.integration.helpers import credentials, unique_user
from turnstorm.client import TurnClient
from turnstorm.operator.render import drain_wait_script
from turnstorm.relay.process import LocalRelay, loopback_relay_config

pytestmark = pytest.mark.integration

# a relay port range of this test's own (no other test's relay binds there)
MIN_PORT, MAX_PORT = 23100, 23199


def start(deadline: int) -> subprocess.Popen[bytes]:
    script = drain_wait_script(MIN_PORT, MAX_PORT, deadline)
    return subprocess.Popen(["/bin/sh", "-c", script])


def ended_within(process: subprocess.Popen[bytes], seconds: float) -> float | None:
    """Seconds until the process ended with status 0, or None if it still runs."""
    started = time.monotonic()
    try:
        assert process.wait(seconds) == 0
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic() - started


async def test_the_drain_wait_follows_the_relay_ports(turnserver_bin: str) -> None:
    require(shutil.which("awk") is not None, "awk is missing")
    relay = LocalRelay(loopback_relay_config(min_port=MIN_PORT, max_port=MAX_PORT),
                       secrets.token_urlsafe(16))
    with relay:
        # no allocation: returns at once
        assert ended_within(start(600), 5.0) is not None
        client = await TurnClient.connect(
            (relay.host, relay.port), credentials=credentials(relay, unique_user("dw")))
        try:
            allocation = await client.allocate()
            assert MIN_PORT <= allocation.relayed[1] <= MAX_PORT
            waiting = start(600)
            await asyncio.sleep(3.0)
            assert waiting.poll() is None, "returned with an allocation still up"
            # at its deadline it returns even with the allocation up
            assert ended_within(start(1), 6.0) is not None
            await client.release()
            took = await asyncio.to_thread(ended_within, waiting, 10.0)
            assert took is not None, "still waiting after the allocation was released"
        finally:
            await client.aclose()

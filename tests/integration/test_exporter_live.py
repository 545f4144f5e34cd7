"""The relay exporter against a real coturn under live load: its numbers must match the
server's own view (CLI ``pc``/``pu``), over HTTP as Prometheus scrapes them."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.integration.helpers import credentials, unique_user
from turnstorm.aioecho import start_echo_peer
from turnstorm.client import TurnClient
from turnstorm.relay.collector import Exporter, RelayCollector
from turnstorm.relay.coturncli import CoturnCli, CoturnCliError
from turnstorm.relay.process import LocalRelay, free_port, loopback_relay_config
from turnstorm.signals import scrape_signals

pytestmark = pytest.mark.integration


@pytest.fixture
def cli_relay(turnserver_bin: str) -> Iterator[tuple[LocalRelay, str]]:
    password = secrets.token_urlsafe(12)
    config = loopback_relay_config(cli_port=free_port("127.0.0.1"), cli_password=password)
    with LocalRelay(config, secrets.token_urlsafe(24)) as relay:
        yield relay, password


def cli_for(relay: LocalRelay, password: str) -> CoturnCli:
    assert relay.config.cli_port is not None
    return CoturnCli("127.0.0.1", relay.config.cli_port, password)


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return scrape_signals(response.read().decode())


async def test_exporter_matches_the_servers_view_under_load(
        cli_relay: tuple[LocalRelay, str]) -> None:
    relay, password = cli_relay
    echo_transport, _, echo = await start_echo_peer()
    users = [unique_user("exp") for _ in range(4)]
    clients: list[TurnClient] = []
    try:
        # One REST credential per user: its username carries the expiry second, and coturn's
        # `pu` counts "expiry:user" names, so minting one per allocation could split a user.
        user_creds = [credentials(relay, user) for user in users]
        for index in range(20):  # 5 allocations for each of 4 users
            creds = user_creds[index % 4]
            client = await TurnClient.connect((relay.host, relay.port), "udp",
                                              credentials=creds)
            clients.append(client)
            await client.allocate()
            channel = await client.channel_bind(echo)
            for _ in range(3):
                client.send_channel(channel, b"m" * 160)
        await asyncio.sleep(0.2)
        # coturn 4.6.1 adds relayed traffic to a session's `ps` usage only when the
        # allocation is refreshed (or ends): refresh so the usage is current.
        for client in clients:
            await client.refresh(600)
        await asyncio.sleep(0.2)
        server = cli_for(relay, password)
        collector = RelayCollector("r1", cli_for(relay, password), relay.pid,
                                   cache_seconds=0.0)
        with server, Exporter([collector]) as exporter:
            seen = await asyncio.to_thread(scrape, exporter.url)
            own_allocs = server.total_allocations()
            per_user, own_sessions = server.sessions_per_user()
            assert own_allocs == 20 and own_sessions == 20
            assert sorted(per_user.values()) == [5, 5, 5, 5]
            assert {name.split(":", 1)[1] for name in per_user} == set(users)
            assert seen["up"] == 1.0
            assert seen["allocations"] == own_allocs
            assert seen["sessions"] == own_sessions
            assert seen["users"] == 4
            usage = server.session_usage()
            assert seen["relayed_packets_total"] == usage.received_packets + usage.sent_packets
            assert seen["relayed_bytes_total"] == usage.received_bytes + usage.sent_bytes
            # 3 ChannelData out and 3 echoes back per session, on top of the control packets
            assert usage.received_packets >= 20 * 6
            assert seen["session_usage_truncated"] == 0.0
            assert seen["udp_sockets"] >= 20  # one relayed socket per allocation, at least
            assert seen["cpu_seconds_total"] > 0

            for client in clients[:7]:
                await client.release()
            deadline = time.monotonic() + 5
            while server.total_allocations() != 13:
                assert time.monotonic() < deadline, "coturn did not drop the released 7"
                await asyncio.sleep(0.1)
            seen = await asyncio.to_thread(scrape, exporter.url)
            assert seen["allocations"] == server.total_allocations() == 13
            assert seen["sessions"] == server.sessions_per_user()[1] == 13
    finally:
        for client in clients:
            await client.aclose()
        echo_transport.close()


def test_cache_serves_repeated_scrapes(cli_relay: tuple[LocalRelay, str]) -> None:
    relay, password = cli_relay
    calls = []
    cli = cli_for(relay, password)
    original = cli.command

    def counting(line: str) -> str:
        calls.append(line)
        return original(line)

    cli.command = counting  # type: ignore[method-assign]
    collector = RelayCollector("r1", cli, cache_seconds=30.0)
    first = collector.snapshot()
    assert collector.snapshot() is first
    assert calls == ["pc", "pu", "ps"]
    cli.close()


def test_cli_errors_are_clear(cli_relay: tuple[LocalRelay, str]) -> None:
    relay, _ = cli_relay
    with pytest.raises(CoturnCliError, match="wrong CLI password"):
        cli_for(relay, "not-the-password").connect()
    closed = free_port("127.0.0.1")
    with pytest.raises(CoturnCliError, match="connection refused"):
        CoturnCli("127.0.0.1", closed, "x", timeout=1).connect()


def test_relay_down_reports_up_zero(cli_relay: tuple[LocalRelay, str]) -> None:
    relay, password = cli_relay
    collector = RelayCollector("r1", cli_for(relay, password), cache_seconds=0.0)
    assert collector.snapshot().up
    relay.stop()
    snap = collector.snapshot()
    assert not snap.up and snap.allocations is None
    assert snap.errors and "coturn CLI" in snap.errors[0]


def test_exporter_subcommand_serves_metrics(cli_relay: tuple[LocalRelay, str]) -> None:
    relay, password = cli_relay
    listen = free_port("127.0.0.1")
    env = dict(os.environ, TURNSTORM_CLI_PASSWORD=password)
    process = subprocess.Popen(
        [sys.executable, "-m", "turnstorm", "exporter", "--cli",
         f"127.0.0.1:{relay.config.cli_port}", "--listen", f"127.0.0.1:{listen}",
         "--pid", str(relay.pid), "--relay", "pod-0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                seen = scrape(f"http://127.0.0.1:{listen}/metrics")
                break
            except OSError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert seen["up"] == 1.0 and seen["allocations"] == 0.0
        assert "cpu_seconds_total" in seen and "udp_rcvbuf_errors_total" in seen
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(5) == 0


def test_exporter_subcommand_refuses_wrong_password(cli_relay: tuple[LocalRelay, str]) -> None:
    relay, _ = cli_relay
    env = dict(os.environ, TURNSTORM_CLI_PASSWORD="wrong")
    done = subprocess.run(
        [sys.executable, "-m", "turnstorm", "exporter", "--cli",
         f"127.0.0.1:{relay.config.cli_port}", "--listen", f"127.0.0.1:{free_port()}"],
        env=env, capture_output=True, text=True, timeout=15, check=False)
    assert done.returncode == 1
    assert "wrong CLI password" in done.stderr
    env.pop("TURNSTORM_CLI_PASSWORD")
    done = subprocess.run(
        [sys.executable, "-m", "turnstorm", "exporter", "--cli", "127.0.0.1:1",
         "--listen", f"127.0.0.1:{free_port()}"],
        env=env, capture_output=True, text=True, timeout=15, check=False)
    assert done.returncode == 1 and "TURNSTORM_CLI_PASSWORD" in done.stderr

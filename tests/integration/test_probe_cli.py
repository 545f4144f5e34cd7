"""``python -m turnstorm probe`` as a user runs it, against a live coturn on loopback."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import RelayFactory
from tests.integration.helpers import FORBIDDEN, TRANSPORTS, turn_client, wait_until
from turnstorm.errors import AllocationQuotaReached
from turnstorm.proto.credentials import Credentials
from turnstorm.relay.process import LocalRelay, free_port, loopback_relay_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# Runs the CLI with every socket connect/bind/send refused by an audit hook. uvloop is
# hidden so the stdlib event loop (whose sockets raise audit events) would be used.
NO_NETWORK = """
import sys
sys.modules["uvloop"] = None

def deny(event, args):
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
        raise RuntimeError(f"network use: {event} {args[1]!r}")

sys.addaudithook(deny)
from turnstorm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_probe(*args: str, guard: bool = False) -> subprocess.CompletedProcess[str]:
    command = ["-c", NO_NETWORK] if guard else ["-m", "turnstorm"]
    return subprocess.run(
        [sys.executable, *command, "probe", *args],
        capture_output=True, text=True, timeout=30, cwd=ROOT, check=False,
    )


def uri(relay: LocalRelay, transport: str = "udp") -> str:
    return f"turn:{relay.host}:{relay.port}?transport={transport}"


def assert_fails(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 1 and exactly ``turnstorm probe: <message>`` on stderr, nothing else."""
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", f"turnstorm probe: {message}\n"
    )


@pytest.fixture
def relay(relays: RelayFactory) -> LocalRelay:
    return relays()


@pytest.fixture
def secret_file(relay: LocalRelay, tmp_path: Path) -> str:
    path = tmp_path / "secret.txt"
    path.write_text(relay.secret + "\n")
    return str(path)


@pytest.fixture
def quota_relay(turnserver_bin: str) -> Iterator[LocalRelay]:
    """One allocation per username, on a relay of its own for each test."""
    with LocalRelay(loopback_relay_config(user_quota=1), secrets.token_urlsafe(24)) as running:
        yield running


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_json_result(relay: LocalRelay, secret_file: str, transport: str) -> None:
    result = run_probe(uri(relay, transport), "--secret-file", secret_file, "--json",
                       "--samples", "3")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.count("\n") == 1
    report = json.loads(result.stdout)
    assert isinstance(report, dict)
    for key in ("binding_rtt_ms", "allocate_ms", "relay_rtt_ms"):
        assert isinstance(report[key], float) and 0 < report[key] < 1000
    assert isinstance(report["relay_overhead_ms"], float)
    assert report["relay_overhead_ms"] == pytest.approx(
        report["relay_rtt_ms"] - report["binding_rtt_ms"], abs=0.002
    )
    host, _, port = report["relayed_address"].rpartition(":")
    assert host == "127.0.0.1"
    assert relay.config.min_port <= int(port) <= relay.config.max_port
    assert report["uri"] == uri(relay, transport)
    assert report["samples"] == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_allocation_is_released_on_exit(
    quota_relay: LocalRelay, transport: str, tmp_path: Path
) -> None:
    # Proof by quota (user_quota=1; coturn counts per REST user, ignoring the expiry
    # part, so every probe run is user "turnstorm-probe"). An allocation abandoned over
    # UDP without a release stays counted for its whole 600 s lifetime; the control
    # below shows that. The probe's must be gone within coturn's 1 s release delay.
    # Over TCP closing the connection also frees it, so there this proves no leak
    # rather than the release itself.
    relay = quota_relay
    abandoned = Credentials.ephemeral(relay.secret, "abandoned", time.time())
    async with turn_client(relay, "udp", abandoned) as control:
        await control.allocate()
        control.allocation = None  # aclose() must not release it
    secret = tmp_path / "secret.txt"
    secret.write_text(relay.secret)

    result = await asyncio.to_thread(run_probe, uri(relay, transport),
                                     "--secret-file", str(secret))
    assert (result.returncode, result.stderr) == (0, "")

    async def probe_user_free() -> bool:
        creds = Credentials.ephemeral(relay.secret, "turnstorm-probe", time.time())
        async with turn_client(relay, "udp", creds) as client:
            try:
                await client.allocate()
            except AllocationQuotaReached:
                return False
            return True

    await wait_until(probe_user_free, 3.0, interval=0.2)
    async with turn_client(relay, "udp", abandoned) as client:
        with pytest.raises(AllocationQuotaReached):
            await client.allocate()


# -- errors: exit 1, one line on stderr, no traceback ---------------------------------------


def test_wrong_secret(relay: LocalRelay, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not-the-secret\n")
    assert_fails(run_probe(uri(relay), "--secret-file", str(wrong)),
                 "Allocate failed: 401 Unauthorized (wrong username, password or shared secret)")


def test_missing_secret_file(relay: LocalRelay, tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    assert_fails(run_probe(uri(relay), "--secret-file", str(missing)),
                 f"cannot read secret file {missing}: No such file or directory")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unreachable_port(secret_file: str, transport: str) -> None:
    port = free_port()  # nothing listens: ICMP port unreachable / TCP RST
    result = run_probe(f"turn:127.0.0.1:{port}?transport={transport}",
                       "--secret-file", secret_file, "--timeout", "2")
    assert_fails(result, f"cannot reach {transport.upper()} 127.0.0.1:{port}: "
                         "Connection refused")


def test_bad_uri(secret_file: str) -> None:
    assert_fails(run_probe("turn:nohost", "--secret-file", secret_file),
                 "invalid URI 'turn:nohost': host 'nohost' is not an IP address")


def test_non_loopback_server_is_refused_before_any_network_use(secret_file: str) -> None:
    result = run_probe("turn:192.0.2.1:3478", "--secret-file", secret_file, guard=True)
    assert_fails(result, "target 192.0.2.1 is not on loopback; name it with "
                         "--allow-target 192.0.2.1 if you own it")


def test_network_guard_catches_network_use(relay: LocalRelay, secret_file: str) -> None:
    """The control for the test above: the guard does stop a probe that sends."""
    result = run_probe(uri(relay), "--secret-file", secret_file, guard=True)
    assert result.returncode != 0
    # The first socket operation is binding the built-in echo peer.
    assert "RuntimeError: network use: socket.bind ('127.0.0.1', 0)" in result.stderr


def test_non_loopback_peer_is_refused_before_contacting_the_server(secret_file: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.setblocking(False)
        port = server.getsockname()[1]
        result = run_probe(f"turn:127.0.0.1:{port}", "--secret-file", secret_file,
                           "--peer", "192.0.2.1:9")
        with pytest.raises(BlockingIOError):
            server.recv(2048)
    assert_fails(result, "target 192.0.2.1 is not on loopback; name it with "
                         "--allow-target 192.0.2.1 if you own it")


def test_refused_peer(relay: LocalRelay, secret_file: str) -> None:
    # Allowed on our side, so the request reaches the relay, whose policy denies 10/8.
    result = run_probe(uri(relay), "--secret-file", secret_file,
                       "--peer", "10.0.0.1:9", "--allow-target", "10.0.0.1")
    assert_fails(result, FORBIDDEN.format(method="ChannelBind"))


def test_no_credentials(relay: LocalRelay) -> None:
    assert_fails(run_probe(uri(relay)),
                 "probe needs credentials: --secret-file FILE, or --user and "
                 "--password-file (or --password)")


def test_password_file_errors(relay: LocalRelay, tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    assert_fails(run_probe(uri(relay), "--user", "alice", "--password-file", str(missing)),
                 f"cannot read secret file {missing}: No such file or directory")
    given = tmp_path / "password.txt"
    given.write_text("wonderland\n")
    assert_fails(run_probe(uri(relay), "--user", "alice", "--password-file", str(given),
                           "--password", "wonderland"),
                 "give either --password or --password-file, not both")

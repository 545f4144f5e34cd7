"""The operator's rendered turnserver.conf runs on a real Debian turnserver, started the
way the pod starts it, and its security policy holds on the wire."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from turnstorm.aioecho import start_echo_peer
from turnstorm.client import TurnClient
from turnstorm.errors import Forbidden
from turnstorm.operator.render import CLI_PORT, deployment, turnserver_conf
from turnstorm.proto.credentials import Credentials
from turnstorm.relay.coturncli import CoturnCli
from turnstorm.relay.process import free_port, stun_ready
from turnstorm.spec import turnpool_from_object

pytestmark = pytest.mark.integration


def pool(port: int) -> dict[str, Any]:
    return {"apiVersion": "turnstorm.io/v1alpha1", "kind": "TurnPool",
            "metadata": {"name": "wire", "namespace": "default"},
            "spec": {"realm": "wire.example", "authSecretRef": {"name": "wire-auth"},
                     "listeners": {"udp": port, "tcp": port},
                     "relayPorts": {"min": 61000, "max": 61499},
                     "security": {"allowedPeerCIDRs": ["127.0.0.1/32"], "userQuota": 5},
                     "scaling": {"targets": {"allocationsPerRelay": 100}}}}


def test_rendered_conf_runs_and_denies_private_peers(turnserver_bin: str,
                                                     tmp_path: Path) -> None:
    port = free_port()
    spec = turnpool_from_object(pool(port))
    # Exactly what the pod mounts, except: loopback instead of 0.0.0.0 (traffic stays on
    # this machine) and a private directory instead of the container's /var/lib/coturn.
    conf = turnserver_conf(spec)
    assert "listening-ip=0.0.0.0\n" in conf
    conf = conf.replace("listening-ip=0.0.0.0\n", "listening-ip=127.0.0.1\nrelay-ip=127.0.0.1\n")
    conf = conf.replace("/var/lib/coturn", str(tmp_path))
    (tmp_path / "turnserver.conf").write_text(conf)
    secret, cli_password = secrets.token_urlsafe(24), secrets.token_urlsafe(12)
    container = deployment(spec, 1, "exporter:test")["spec"]["template"]["spec"][
        "containers"][0]
    args = [a.replace("/etc/coturn", str(tmp_path)).replace("$(TURN_SECRET)", secret)
            .replace("$(CLI_PASSWORD)", cli_password) for a in container["args"]]
    process = subprocess.Popen([turnserver_bin, *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not stun_ready("127.0.0.1", port):
            assert process.poll() is None, "turnserver rejected the rendered config"
            assert time.monotonic() < deadline, "turnserver did not answer STUN"
            time.sleep(0.05)
        asyncio.run(_check_policy(port, secret))
        # The CLI password came from the argument, not the file: the exporter can log in.
        # coturn frees a released allocation about a second later.
        with CoturnCli("127.0.0.1", CLI_PORT, cli_password) as cli:
            deadline = time.monotonic() + 5
            while cli.total_allocations() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert cli.total_allocations() == 0
    finally:
        process.terminate()
        process.wait(10)


async def _check_policy(port: int, secret: str) -> None:
    transport, _, peer = await start_echo_peer("127.0.0.1")
    denied_echo_transport, denied_echo, denied_peer = await start_echo_peer("127.0.0.2")
    client = await TurnClient.connect(
        ("127.0.0.1", port), credentials=Credentials.ephemeral(secret, "wire", time.time()))
    try:
        allocation = await client.allocate()
        assert 61000 <= allocation.relayed[1] <= 61499
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        client.on_data = lambda source, data: got.done() or got.set_result(data)
        channel = await client.channel_bind(peer)
        client.send_channel(channel, b"allowed")
        assert await asyncio.wait_for(got, 2) == b"allowed"
        for address in ("127.0.0.2", "10.0.0.1", "169.254.169.254", "192.168.1.1",
                        "100.64.0.1", "172.16.0.1"):
            with pytest.raises(Forbidden) as info:
                await client.create_permission((address, 9))
            assert str(info.value) == ("CreatePermission failed: 403 Forbidden IP (the "
                                       "relay's security policy refused it, e.g. a denied "
                                       "peer address)")
        client.send_indication(denied_peer, b"must not arrive")
        await asyncio.sleep(0.3)
        assert denied_echo.echoed == 0
        await client.release()
    finally:
        client.close()
        transport.close()
        denied_echo_transport.close()


def test_udp_only_readiness_probe_passes_on_a_live_relay_and_fails_on_a_dead_one(
        relay: Any) -> None:
    """The probe a pool without a TCP listener gets, run as the kubelet would (its 2 s
    timeout): exit 0 against a real coturn, no answer (a timeout) where nothing listens."""
    obj = pool(relay.port)
    obj["spec"]["listeners"] = {"udp": relay.port, "tcp": 0}
    pod = deployment(turnpool_from_object(obj), 1, "exporter")["spec"]["template"]["spec"]
    probe = next(c for c in pod["containers"] if c["name"] == "coturn")["readinessProbe"]
    command, timeout = probe["exec"]["command"], probe["timeoutSeconds"]
    live = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    assert live.returncode == 0
    dead = [*command[:2], str(free_port()), *command[3:]]
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(dead, capture_output=True, timeout=timeout, check=False)

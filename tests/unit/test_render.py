"""Renderers: golden files (reviewed by eye when they change) and security invariants."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import pytest
import yaml

from turnstorm.cli import main
from turnstorm.operator.render import ROTATION_LABEL, render_pool, turnserver_conf
from turnstorm.spec import turnpool_from_object

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def example(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "examples" / name).read_text())
    return loaded


@pytest.mark.parametrize(("example_file", "args"), [
    ("turnpool.yaml", []),
    ("turnpool-hostnetwork.yaml", ["--service-monitor"]),
])
def test_render_matches_golden(example_file: str, args: list[str],
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(ROOT / "examples" / example_file), *args]) == 0
    out = capsys.readouterr().out
    golden = GOLDEN / example_file.replace(".yaml", ".rendered.yaml")
    if UPDATE:
        golden.write_text(out)
    assert out == golden.read_text(), "rendered output changed: review, then UPDATE_GOLDEN=1"


def test_config_is_never_an_open_relay() -> None:
    spec = turnpool_from_object(example("turnpool.yaml"))
    conf = turnserver_conf(spec)
    lines = conf.splitlines()
    for required in ("use-auth-secret", "no-multicast-peers", "fingerprint", "no-tcp-relay",
                     "cli-ip=127.0.0.1", "user-quota=10", "total-quota=2000"):
        assert required in lines
    for denied in ("10.0.0.0-10.255.255.255", "100.64.0.0-100.127.255.255",
                   "127.0.0.0-127.255.255.255", "169.254.0.0-169.254.255.255",
                   "172.16.0.0-172.31.255.255", "192.168.0.0-192.168.255.255", "::1",
                   "fc00::-fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                   "fe80::-febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "0.0.0.0-0.255.255.255"):
        assert f"denied-peer-ip={denied}" in lines
    assert not any(line.startswith(("static-auth-secret", "cli-password", "allow-loopback"))
                   for line in lines)


def test_secret_only_flows_from_the_secret() -> None:
    spec = turnpool_from_object(example("turnpool.yaml"))
    objects = render_pool(spec)
    text = yaml.safe_dump_all(objects)
    assert "static-auth-secret=" not in text.replace("--static-auth-secret=$(TURN_SECRET)", "")
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    relay = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in relay["env"]}
    assert env["TURN_SECRET"] == {"name": "voice-relay-auth", "key": "secret"}


def test_client_service_selects_only_relays_in_rotation() -> None:
    spec = turnpool_from_object(example("turnpool.yaml"))
    objects = render_pool(spec, replicas=3)
    service = next(o for o in objects if o["kind"] == "Service"
                   and o["metadata"]["name"] == "voice-relay")
    assert service["spec"]["selector"][ROTATION_LABEL] == "active"
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert ROTATION_LABEL not in deployment["spec"]["selector"]["matchLabels"]


def test_allowed_peers_lift_the_default_denial() -> None:
    obj = example("turnpool.yaml")
    obj["spec"]["security"] = {"allowedPeerCIDRs": ["10.0.0.0/8"]}
    conf = turnserver_conf(turnpool_from_object(obj)).splitlines()
    assert "denied-peer-ip=10.0.0.0-10.255.255.255" not in conf
    assert "allowed-peer-ip=10.0.0.0-10.255.255.255" in conf
    assert "denied-peer-ip=172.16.0.0-172.31.255.255" in conf


def test_readiness_without_a_tcp_listener_asks_stun_over_udp() -> None:
    obj = example("turnpool.yaml")
    probes = []
    for tcp in (3478, 0):
        obj["spec"]["listeners"] = {"udp": 3478, "tcp": tcp}
        deployment = next(o for o in render_pool(turnpool_from_object(obj))
                          if o["kind"] == "Deployment")
        probes.append(deployment["spec"]["template"]["spec"]["containers"][0][
            "readinessProbe"])
    assert probes[0] == {"tcpSocket": {"port": 3478}, "periodSeconds": 5}
    assert probes[1]["exec"] == {"command": ["turnutils_stunclient", "-p", "3478",
                                             "127.0.0.1"]}


def test_denied_peers_add_to_the_default_denial() -> None:
    """Naming a range to deny never lifts a built-in one (only allowedPeerCIDRs does)."""
    obj = example("turnpool.yaml")
    obj["spec"]["security"] = {"deniedPeerCIDRs": ["203.0.113.0/24", "10.0.0.0/8"]}
    conf = turnserver_conf(turnpool_from_object(obj)).splitlines()
    denied = [line for line in conf if line.startswith("denied-peer-ip=")]
    assert "denied-peer-ip=203.0.113.0-203.0.113.255" in denied
    for built_in in ("10.0.0.0-10.255.255.255", "100.64.0.0-100.127.255.255",
                     "169.254.0.0-169.254.255.255", "192.168.0.0-192.168.255.255"):
        assert f"denied-peer-ip={built_in}" in denied
    assert len(denied) == len(set(denied))  # 10/8 once


@pytest.mark.parametrize(("field", "value"), [
    ("realm", "example.org\nallowed-peer-ip=0.0.0.0-255.255.255.255"),
    ("external_ip", "203.0.113.7\ncli-ip=0.0.0.0"),
    ("external_ip", "relay.example.org"),
])
def test_a_value_cannot_add_lines_to_the_relay_config(field: str, value: str) -> None:
    import dataclasses

    from turnstorm.coturnconf import RelayConfigError, render
    from turnstorm.operator.render import relay_config

    config = dataclasses.replace(relay_config(turnpool_from_object(example("turnpool.yaml"))),
                                 **{field: value})
    with pytest.raises(RelayConfigError, match=r"contains whitespace|is not an IP address"):
        render(config)


def test_render_cli_errors_are_one_line(tmp_path: pathlib.Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: turnstorm.io/v1alpha1\nkind: TurnPool\nmetadata: {name: x}\n"
                   "spec: {realm: r, authSecretRef: {name: s}, relayPorts: {min: 40000, "
                   "max: 41000}}\n")
    assert main(["render", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err == ("turnstorm render: spec: Invalid value: spec.relayPorts must not overlap "
                   "the kernel's ephemeral port range 32768-60999 (coturn loops on bind "
                   "errors there)\n")
    assert main(["render", str(tmp_path / "missing.yaml")]) == 1
    assert capsys.readouterr().err == (f"turnstorm render: cannot read {tmp_path}/missing.yaml:"
                                       " No such file or directory\n")

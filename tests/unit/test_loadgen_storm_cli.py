"""`turnstorm storm` refuses unbounded or disallowed runs before sending anything."""

from __future__ import annotations

import os
import socket
from pathlib import Path

# --mix idle imports the keepalive users (Locust): no gevent patching of pytest itself.
os.environ.setdefault("LOCUST_SKIP_MONKEY_PATCH", "1")

import pytest

from turnstorm.cli import main
from turnstorm.loadgen.storm import SHAPE_PARAMS


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["storm", *args])
    return code, capsys.readouterr().err.strip()


def test_non_loopback_target_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "--target", "turn:192.0.2.1:3478", "--mix", "stun")
    assert code == 1
    assert err == ("turnstorm storm: target 192.0.2.1 is not on loopback; name it with "
                   "--allow-target 192.0.2.1 if you own it")


def test_duration_is_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "--target", "turn:127.0.0.1", "--mix", "stun", "--duration", "0")
    assert code == 1
    assert err == "turnstorm storm: --duration must be between 0 and 86400 seconds"


def test_turn_needs_a_secret(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "--target", "turn:127.0.0.1", "--duration", "1")
    assert err == "turnstorm storm: TURN users need --secret-file (or use --mix stun)"
    assert code == 1


def test_bad_shape_param_and_tcp_target(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    code, err = run(capsys, "--target", "turn:127.0.0.1", "--mix", "stun",
                    "--shape-param", "users")
    assert (code, err) == (1, "turnstorm storm: --shape-param 'users': expected KEY=VALUE")
    code, err = run(capsys, "--target", "turn:127.0.0.1?transport=tcp", "--mix", "stun")
    assert err == ("turnstorm storm: target 'turn:127.0.0.1?transport=tcp': the load "
                   "generator speaks UDP only")


def test_raw_idle_crowd_against_a_remote_relay_is_refused_up_front(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "--target", "turn:192.0.2.1:3478", "--allow-target", "192.0.2.1",
                    "--mix", "idle", "--crowd-transport", "raw", "--duration", "1")
    assert err == ("turnstorm storm: --mix idle with 10 users of 1000 subscribers against "
                   "turn:192.0.2.1:3478?transport=udp: the raw keepalive transport needs "
                   "an IPv4 loopback relay (its spoofed 127.x sources must not leave the host)")
    assert code == 1


STUN = ("--target", "turn:127.0.0.1:3478", "--mix", "stun", "--duration", "1")


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--max-pps", "nan", "--max-pps must be a positive number (the bound is never off)"),
    ("--max-pps", "inf", "--max-pps must be a positive number (the bound is never off)"),
    ("--max-pps", "0", "--max-pps must be a positive number (the bound is never off)"),
    ("--spawn-rate", "nan", "--users must be >= 0 and --spawn-rate a positive number"),
    ("--binding-interval", "-5",
     "--binding-interval must be 0 or a positive number of seconds"),
    ("--binding-interval", "nan",
     "--binding-interval must be 0 or a positive number of seconds"),
])
def test_rates_are_finite_and_positive(capsys: pytest.CaptureFixture[str], option: str,
                                       value: str, message: str) -> None:
    code, err = run(capsys, *STUN, option, value)
    assert (code, err) == (1, f"turnstorm storm: {message}")


@pytest.mark.parametrize(("peer", "message"), [
    ("example.com:7", "peer 'example.com:7': 'example.com' is not an IP address (give the "
                      "peer as an IP literal)"),
    (":7", "peer ':7': '' is not an IP address (give the peer as an IP literal)"),
    ("[::1:7", "peer '[::1:7': unbalanced brackets; expected IP:PORT or [IPv6]:PORT"),
    ("127.0.0.1:0", "peer '127.0.0.1:0': expected IP:PORT"),
])
def test_peer_must_be_an_ip_literal(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                    peer: str, message: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    code, err = run(capsys, "--target", "turn:127.0.0.1:3478", "--secret-file", str(secret),
                    "--duration", "1", "--peer", peer)
    assert (code, err) == (1, f"turnstorm storm: {message}")


def test_every_allow_target_entry_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "--target", "turn:192.0.2.1:3478", "--allow-target",
                    "192.0.2.0/24", "--allow-target", "bogus", "--mix", "stun",
                    "--duration", "1")
    assert (code, err) == (1, "turnstorm storm: --allow-target 'bogus' is not an address "
                              "or CIDR network")


def test_a_remote_relay_needs_a_peer_it_can_reach(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    code, err = run(capsys, "--target", "turn:192.0.2.1:3478", "--allow-target", "192.0.2.1",
                    "--secret-file", str(secret), "--duration", "1")
    assert code == 1
    assert err.startswith("turnstorm storm: turn:192.0.2.1:3478?transport=udp is not on "
                          "this host: give --peer IP:PORT")


def test_an_unwritable_out_dir_fails_before_the_run(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = run(capsys, *STUN, "--out", str(blocker / "results"))
    assert (code, err) == (1, f"turnstorm storm: --out {blocker / 'results'}: cannot write "
                              "there: Not a directory")


@pytest.mark.parametrize("option", ["--metrics-port", "--web"])
def test_a_busy_listening_port_fails_before_the_run(capsys: pytest.CaptureFixture[str],
                                                    option: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = run(capsys, *STUN, option, str(port))
    assert (code, err) == (1, f"turnstorm storm: {option} {port}: cannot listen on "
                              f"127.0.0.1:{port}: Address already in use")


@pytest.mark.parametrize(("spec", "reason"), [
    ("4:30000:120", "QUOTA (ports per gateway, from 40000) must be between 1 and 25536"),
    ("4:64:nan", "TIMEOUT (seconds a mapping lives unused) must be a positive number"),
    ("0:64:120", "GATEWAYS must be between 1 and 65536"),
])
def test_cgnat_limits_are_named(capsys: pytest.CaptureFixture[str], spec: str,
                                reason: str) -> None:
    code, err = run(capsys, *STUN, "--cgnat", spec)
    assert (code, err) == (1, f"turnstorm storm: --cgnat {spec!r}: expected "
                              f"GATEWAYS:QUOTA:TIMEOUT, e.g. 4:64:120; {reason}")


def test_the_help_lists_every_shape_parameter() -> None:
    from turnstorm.loadgen.shapes import SHAPES

    assert {name: tuple(cls.params) for name, cls in SHAPES.items()} == SHAPE_PARAMS

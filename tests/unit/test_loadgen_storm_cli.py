"""`turnstorm storm` refuses unbounded or disallowed runs before sending anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from turnstorm.cli import main


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
    assert err == ("turnstorm storm: --mix idle against turn:192.0.2.1:3478?transport=udp: "
                   "the raw keepalive transport needs an IPv4 loopback relay (its spoofed "
                   "127.x sources must not leave the host)")
    assert code == 1

"""Load shapes: tick() on a fake run time."""

from __future__ import annotations

import os

# Importing Locust would monkey-patch this pytest process with gevent; shapes need no I/O.
os.environ.setdefault("LOCUST_SKIP_MONKEY_PATCH", "1")

import pytest

from turnstorm.loadgen.config import ConfigError
from turnstorm.loadgen.shapes import (
    FAST_RATE,
    SHAPES,
    DiurnalShape,
    StormShape,
    amplification,
    make_shape,
    no_backoff,
    send_times,
    sends_within,
)
from turnstorm.proto.transaction import RetransmitPolicy


def ticks(shape: StormShape, times: list[float], monkeypatch: pytest.MonkeyPatch) -> list[
    tuple[int, float] | None
]:
    result = []
    for t in times:
        monkeypatch.setattr(shape, "get_run_time", lambda t=t: t)
        result.append(shape.tick())
    return result


def test_steady(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = make_shape("steady", users=7, spawn_rate=3, duration=10)
    assert ticks(shape, [0, 9.99, 10], monkeypatch) == [(7, 3), (7, 3), None]


def test_ramp(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = make_shape("ramp", start_users=10, end_users=110, ramp_seconds=50, duration=60)
    # slope 2 users/s; spawn rate twice that
    assert ticks(shape, [0, 25, 49, 50, 59, 60], monkeypatch) == [
        (10, 4.0), (60, 4.0), (108, 4.0), (110, FAST_RATE), (110, FAST_RATE), None]


def test_reconnect_storm(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = make_shape("reconnect-storm", users=100, storm_at=20, fraction=0.3, window=6,
                       duration=40)
    # 30 users drop at 20 s for 1 s, then reconnect at 30 / 6 = 5 users/s
    assert ticks(shape, [0, 19.9, 20, 20.9, 21, 39, 40], monkeypatch) == [
        (100, FAST_RATE), (100, FAST_RATE), (70, FAST_RATE), (70, FAST_RATE), (100, 5.0),
        (100, 5.0), None]


def test_flash_crowd(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = make_shape("flash-crowd", base_users=10, peak_users=210, at_seconds=5,
                       rise_seconds=4, hold_seconds=6, duration=30)
    # peak 5 .. 15 s, reached at (210 - 10) / 4 = 50 users/s
    assert ticks(shape, [0, 5, 14.9, 15, 29.9, 30], monkeypatch) == [
        (10, FAST_RATE), (210, 50.0), (210, 50.0), (10, FAST_RATE), (10, FAST_RATE), None]


def test_diurnal(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = make_shape("diurnal", min_users=0, max_users=100, period=100, duration=100)
    rate = 2 * 3.141592653589793 * 100 / 100
    result = ticks(shape, [0, 25, 50, 75, 100], monkeypatch)
    assert result[:4] == [(0, rate), (50, rate), (100, rate), (50, rate)]
    assert result[4] is None


def test_env_overrides_class_defaults_and_keywords_override_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TURNSTORM_SHAPE_MAX_USERS", "40")
    monkeypatch.setenv("TURNSTORM_SHAPE_PERIOD", "10")
    shape = DiurnalShape(period=20)
    assert shape.describe() == {"min_users": 5, "max_users": 40, "period": 20,
                                "duration": 60}


def test_bad_parameters() -> None:
    with pytest.raises(ConfigError) as info:
        make_shape("steady", user=3)
    assert str(info.value) == ("shape steady has no parameter 'user'; it takes users, "
                               "spawn_rate, duration")
    with pytest.raises(ConfigError, match=r"^unknown shape 'tsunami'; choose one of steady, "):
        make_shape("tsunami")
    with pytest.raises(ConfigError, match="fraction must be between 0 and 1"):
        make_shape("reconnect-storm", fraction=2)
    with pytest.raises(ConfigError, match="users must be a number, not 'many'"):
        SHAPES["steady"](users="many")  # type: ignore[arg-type]


def test_retransmit_amplification_wave(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = make_shape("retransmit-amplification", base_users=10, wave_users=90, storm_at=5,
                       window=3, no_backoff_fraction=0.25, duration=20)
    assert ticks(shape, [0, 4.9, 5, 19.9, 20], monkeypatch) == [
        (10, FAST_RATE), (10, FAST_RATE), (100, 30.0), (100, 30.0), None]
    with pytest.raises(ConfigError, match="no_backoff_fraction must be between 0 and 1"):
        make_shape("retransmit-amplification", no_backoff_fraction=1.5)


def test_send_times_follow_rfc8489_with_and_without_backoff() -> None:
    assert send_times(RetransmitPolicy()) == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert send_times(RetransmitPolicy(backoff=False)) == [0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert send_times(RetransmitPolicy(rto=0.1, rc=3)) == pytest.approx([0, 0.1, 0.3])


def test_amplification_factor_during_an_outage() -> None:
    # a 3.5 s outage: compliant clients send 3 times, non-compliant 7 times
    assert sends_within(RetransmitPolicy(), 3.5) == 3
    assert sends_within(RetransmitPolicy(backoff=False), 3.5) == 7
    assert amplification(3.5, 0.0) == 1.0
    assert amplification(3.5, 1.0) == pytest.approx(7 / 3)
    assert amplification(3.5, 0.5) == pytest.approx((3 + 7) / 2 / 3)
    # past the last retransmission both have sent Rc = 7 datagrams
    assert amplification(40, 1.0) == 1.0


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 1 / 3, 0.5, 1.0])
def test_no_backoff_users_are_an_exact_even_share(fraction: float) -> None:
    chosen = [no_backoff(n, fraction) for n in range(300)]
    for n in (1, 7, 10, 100, 300):
        assert sum(chosen[:n]) == int(n * fraction + 1e-9)

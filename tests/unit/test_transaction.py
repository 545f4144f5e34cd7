"""Client transaction timers (RFC 8489 section 6.2.1) on a fake clock."""

from __future__ import annotations

import pytest

from turnstorm.proto.transaction import ClientTransaction, RetransmitPolicy, TransactionTimeout


def _run(tx: ClientTransaction, start: float = 0.0) -> tuple[list[float], TransactionTimeout]:
    """Drive ``tx`` by jumping the clock to each deadline; return send times and the timeout."""
    assert tx.start(start)
    sends = [start]
    for _ in range(1000):
        deadline = tx.deadline
        assert deadline is not None
        assert not tx.on_timer(deadline - 0.001)  # nothing happens early
        try:
            if tx.on_timer(deadline):
                sends.append(deadline)
        except TransactionTimeout as exc:
            assert tx.deadline is None
            return sends, exc
    raise AssertionError("transaction never timed out")


def test_udp_schedule() -> None:
    sends, exc = _run(ClientTransaction("Binding"))
    assert sends == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert str(exc) == "STUN Binding transaction timed out after 7 attempts in 39.5 s"
    assert (exc.attempts, exc.elapsed) == (7, 39.5)


def test_udp_schedule_from_nonzero_start() -> None:
    sends, exc = _run(ClientTransaction("Allocate"), start=1000.0)
    assert [t - 1000.0 for t in sends] == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert str(exc) == "STUN Allocate transaction timed out after 7 attempts in 39.5 s"


def test_tcp_sends_once_and_times_out_at_ti() -> None:
    tx = ClientTransaction("Binding", reliable=True)
    sends, exc = _run(tx)
    assert sends == [0]
    assert str(exc) == "STUN Binding transaction timed out after 1 attempt in 39.5 s"
    assert tx.attempts == 1


def test_response_stops_retransmission() -> None:
    tx = ClientTransaction("Binding")
    assert tx.start(0.0)
    assert tx.on_timer(0.5)
    assert tx.deadline == 1.5
    tx.on_response()
    assert tx.done
    assert tx.deadline is None
    assert not tx.on_timer(1.5)
    assert not tx.on_timer(100.0)  # and never times out
    assert tx.attempts == 2


def test_response_before_first_retransmit() -> None:
    tx = ClientTransaction("Refresh", reliable=True)
    tx.start(5.0)
    tx.on_response()
    assert not tx.on_timer(44.5)


def test_without_backoff_retransmits_every_rto() -> None:
    sends, exc = _run(ClientTransaction("Binding", policy=RetransmitPolicy(backoff=False)))
    assert sends == [0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert str(exc) == "STUN Binding transaction timed out after 7 attempts in 11 s"


def test_custom_policy() -> None:
    policy = RetransmitPolicy(rto=0.25, rc=3, rm=4)
    sends, exc = _run(ClientTransaction("ChannelBind", policy=policy))
    assert sends == [0, 0.25, 0.75]
    assert str(exc) == "STUN ChannelBind transaction timed out after 3 attempts in 1.75 s"


def test_single_attempt_policy() -> None:
    sends, exc = _run(ClientTransaction("Binding", policy=RetransmitPolicy(rc=1)))
    assert sends == [0]
    assert str(exc) == "STUN Binding transaction timed out after 1 attempt in 8 s"


def test_late_timer_still_counts_from_schedule() -> None:
    tx = ClientTransaction("Binding")
    tx.start(0.0)
    assert tx.on_timer(0.7)  # woke up late: next deadline stays on the schedule
    assert tx.deadline == 1.5


def test_default_method_name() -> None:
    _, exc = _run(ClientTransaction(reliable=True))
    assert str(exc) == "STUN request transaction timed out after 1 attempt in 39.5 s"


@pytest.mark.parametrize(
    "kwargs", [{"rto": 0}, {"rto": -0.5}, {"rc": 0}, {"rm": 0}, {"ti": 0}, {"ti": -1}]
)
def test_invalid_policy(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError) as exc:
        RetransmitPolicy(**kwargs)  # type: ignore[arg-type]
    assert str(exc.value) == "retransmission policy needs rto > 0, rc >= 1, rm >= 1, ti > 0"

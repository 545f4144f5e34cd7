"""Retransmission amplification: users that do not back off flood a silent relay."""

from __future__ import annotations

import os

os.environ.setdefault("LOCUST_SKIP_MONKEY_PATCH", "1")

import socket
from collections import Counter

import pytest

from turnstorm.loadgen.config import LoadgenConfig
from turnstorm.loadgen.runner import run_locust, transactions
from turnstorm.loadgen.shapes import make_shape
from turnstorm.loadgen.users import StunBindingUser
from turnstorm.proto.transaction import RetransmitPolicy
from turnstorm.uri import parse_uri

pytestmark = pytest.mark.integration


def test_no_backoff_clients_send_more_to_a_silent_relay() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a relay that never answers
    silent.bind(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    try:
        # RTO 50 ms, 7 sends, give up 200 ms after the last one. Compliant: sends at
        # 0, .05, .15, .35, .75, 1.55, 3.15 s; non-compliant: every 50 ms, a new transaction
        # every 0.5 s.
        config = LoadgenConfig(targets=[parse_uri(f"turn:127.0.0.1:{port}")], max_pps=5000,
                               policy=RetransmitPolicy(rto=0.05, rc=7, rm=4))
        shape = make_shape("retransmit-amplification", base_users=2, wave_users=2, storm_at=1,
                           window=0.1, no_backoff_fraction=0.5, duration=3)
        config.no_backoff_fraction = shape.no_backoff_fraction
        result = run_locust(config, [StunBindingUser], duration=3.0, shape=shape)
        counters = result.state.counters
        silent.setblocking(False)
        senders: Counter[int] = Counter()
        while True:
            try:
                _, (_, source) = silent.recvfrom(2048)
            except BlockingIOError:
                break
            senders[source] += 1
    finally:
        silent.close()
    row = transactions(result.environment)["STUN Binding"]
    assert row["count"] == row["failures"] > 0  # every transaction timed out
    assert len(senders) == 4
    # two users of each kind; each non-compliant user retransmits ~12/s, a compliant one
    # at most 6 times in the whole run
    assert counters["retransmits_backoff"] <= 2 * 6
    assert counters["retransmits_no_backoff"] >= 3 * counters["retransmits_backoff"]
    # what the relay received is what the users counted, plus at most the first send of
    # each user's transaction cut short by the end of the run
    counted = row["count"] + counters["retransmits_backoff"] + counters["retransmits_no_backoff"]
    assert counted <= sum(senders.values()) <= counted + 4

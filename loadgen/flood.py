"""The Binding flood hot path of :class:`~turnstorm.loadgen.users.StunBindingUser`.

With ``flood_window`` > 0 a flooding user keeps that many Binding requests in flight on
one socket, the way :mod:`turnstorm.blast`'s fastest loop does: requests built from one
template by :class:`~turnstorm.blast.BindingPipeline`, a batch of responses read, then
answered with one UDP GSO ``sendmsg``. The socket is blocking with a kernel receive
timeout of ``RECV_BLOCK`` (1 ms): waiting in the kernel instead of an epoll round trip
through the gevent hub per burst is what makes ~125k transactions per core reachable, at
the price that an idle flood holds the process for at most 1 ms at a time. The flood
yields to the other greenlets every ``FLUSH_NS`` (20 ms). Give floods a generator
process of their own (``--workers``) when paced media shares the process.

Per-transaction request events would cost more than the transactions: the flood instead
adds each batch to Locust's statistics in bulk (:func:`log_bulk`: the same fields
``StatsEntry.log`` updates, with Locust's own response-time rounding), so the web UI, CSV
and distributed aggregation still see every transaction. Exact RTTs go into the target's
``binding_rtt`` histogram. Unanswered requests (after the policy's RTO x Rm) are failures,
one ``STUN``/``Binding`` request event each.
"""

from __future__ import annotations

import _socket
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any, cast

import gevent
from locust.stats import bucket_response_time

from turnstorm.blast import BindingPipeline, Sender, receive_batch
from turnstorm.loadgen.metrics import EXACT_LIMIT, SUB_BUCKETS, Histogram, bucket_bounds
from turnstorm.proto.transaction import TransactionTimeout

FLUSH_NS = 20_000_000
"""Statistics are updated (and other greenlets get the CPU) at least every 20 ms."""
BATCH = 32
"""Responses read before the window is refilled (and requests per GSO send)."""
RECV_BLOCK = 0.001
"""Longest a flood's receive blocks the process when no response is queued (seconds)."""
_LOCUST_KEYS: dict[int, int] = {}
"""Histogram bucket index -> Locust's rounded response time (ms) of its middle."""


def log_bulk(stats: Any, method: str, name: str, rtt_buckets: Mapping[int, int],
             total_us: int, min_us: int, max_us: int, now: float) -> None:
    """Add samples to Locust's statistics for ``(method, name)`` and the total, as that many
    ``StatsEntry.log`` calls would. ``rtt_buckets`` maps a
    :class:`~turnstorm.loadgen.metrics.Histogram` bucket index to a count; each bucket's
    samples are logged at its middle (within 0.05 %, far below Locust's own rounding)."""
    count = sum(rtt_buckets.values())
    if not count:
        return
    buckets: dict[int, int] = {}
    keys = _LOCUST_KEYS
    for index, n in rtt_buckets.items():
        key = keys.get(index)
        if key is None:
            low, high = bucket_bounds(index)
            key = keys[index] = bucket_response_time((low + high) / 2000)
        buckets[key] = buckets.get(key, 0) + n
    second = int(now)
    for entry in (stats.get(name, method), stats.total):
        entry.num_requests += count
        entry.num_reqs_per_sec[second] += count
        entry.last_request_timestamp = now
        entry.total_response_time += total_us / 1000
        entry.min_response_time = (min_us / 1000 if entry.min_response_time is None
                                   else min(entry.min_response_time, min_us / 1000))
        entry.max_response_time = max(entry.max_response_time, max_us / 1000)
        for key, n in buckets.items():
            entry.response_times[key] += n


def flood(user: Any) -> None:
    """Run the flood of ``user`` (a StunBindingUser) until its greenlet is killed."""
    state = user.state
    config = state.config
    policy = user.policy
    timeout = policy.rto * policy.rm
    window = config.flood_window
    pipeline = BindingPipeline(window=window, batch=min(BATCH, window), timeout=timeout)
    family = socket.AF_INET6 if ":" in user.target.host else socket.AF_INET
    raw = _socket.socket(family, socket.SOCK_DGRAM)
    try:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
        # a kernel receive timeout: an empty socket blocks this greenlet (and the hub) for
        # at most RECV_BLOCK, without an epoll round trip per burst of responses
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                       struct.pack("@ll", 0, int(RECV_BLOCK * 1e6)))
        raw.connect(user.target.address)
        _pump(user, pipeline, raw, Sender(cast(socket.socket, raw), True))
    finally:
        raw.close()


def _pump(user: Any, pipeline: BindingPipeline, raw: Any, sender: Sender) -> None:
    state = user.state
    environment = user.environment
    histogram = state.media_for(user.target).binding_rtt
    limiter = state.limiter
    clock = time.perf_counter_ns
    recv = raw.recv
    rtts = pipeline.rtts
    outstanding = pipeline.outstanding
    batch = pipeline.batch
    last_flush = clock()
    try:
        while True:
            # like turnstorm.blast's fastest loop: read a batch of responses (blocking at
            # most RECV_BLOCK when none is queued), answer it with one GSO batch
            receive_batch(pipeline, recv, min(batch, len(outstanding)), clock)
            now = clock()
            if now - last_flush >= FLUSH_NS:
                _flush(environment, histogram, rtts)
                last_flush = now
                gevent.sleep(0)  # the other greenlets of the process get their turn
            for _ in range(pipeline.expire(now)):
                user.fire("STUN", "Binding", pipeline.timeout_ns / 1e9,
                          exception=TransactionTimeout("Binding", 1, pipeline.timeout_ns / 1e9))
            room = pipeline.room()
            while room > 0:
                limiter.acquire(room)
                sender.send(pipeline.requests(room, clock()))
                room = pipeline.room()
    finally:
        _flush(environment, histogram, rtts)


def _flush(environment: Any, histogram: Histogram, rtts: Any) -> None:
    """Move the RTTs (ns) measured since the last flush into the exact histogram and
    Locust's statistics."""
    if not rtts:
        return
    counts: dict[int, int] = {}
    total = 0
    low = high = (rtts[0] + 500) // 1000
    for ns in rtts:
        us = (ns + 500) // 1000
        total += us
        if us < low:
            low = us
        elif us > high:
            high = us
        if us < EXACT_LIMIT:
            index = us
        else:
            shift = us.bit_length() - 11
            index = shift * SUB_BUCKETS + (us >> shift)
        counts[index] = counts.get(index, 0) + 1
    del rtts[:]
    histogram.add_counts(counts, total, low, high)
    log_bulk(environment.stats, "STUN", "Binding", counts, total, low, high, time.time())

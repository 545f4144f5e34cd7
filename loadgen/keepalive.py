"""Tens of thousands of idle subscribers in one process, each keeping its NAT binding alive.

A :class:`KeepaliveCrowd` holds ``count`` UDP sockets (spread over several 127.x source
addresses: one address has only ~28k ephemeral ports), each connected to the relay, and
sends one Binding per subscriber per ``interval`` (phases spread evenly, so the relay sees
a steady ``count / interval`` requests/s). No greenlet per subscriber: one scheduler
greenlet sends what is due every ``TICK`` (one ``os.write`` per request on the socket's
descriptor), and every socket has a libev read watcher whose callback reads the response
in the hub itself (no greenlet switch). A request's transaction id carries the
subscriber number and the round, so matching is an index lookup.

:class:`IdleSubscribersUser` is the Locust face: one user holds ``crowd_size``
subscribers (``LoadgenConfig.crowd_size``) with keepalives every ``binding_interval``
seconds (default 20) and logs the keepalives in bulk as ``STUN``/``Keepalive``.
"""

from __future__ import annotations

import _socket
import contextlib
import os
import resource
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

import gevent
from locust import task

from turnstorm.loadgen.flood import log_bulk
from turnstorm.loadgen.metrics import EXACT_LIMIT, SUB_BUCKETS, Histogram
from turnstorm.loadgen.users import _RelayUser
from turnstorm.proto import stun

TICK = 0.01
"""Seconds between the scheduler's sends."""
SOURCES_BASE = (127, 64, 0, 1)
"""Subscribers bind to 127.64.0.1, .2, ... (PORTS_PER_SOURCE each)."""
PORTS_PER_SOURCE = 20000
DEFAULT_INTERVAL = 20.0
_REQUEST = struct.Struct("!HHI4sII")
"""Binding request header: type, length, cookie, then the 12-byte transaction id as
salt (4), round (4), subscriber (4)."""
_SUCCESS = b"\x01\x01"


@dataclass
class CrowdStats:
    sent: int = 0
    answered: int = 0
    late: int = 0
    """Responses to an earlier round (or duplicates)."""
    unanswered: int = 0
    """Requests still unanswered when the subscriber's next one went out."""
    errors: int = 0


def raise_fd_limit(needed: int) -> int:
    """Raise the soft (and, when allowed, hard) open-file limit to at least ``needed``;
    returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    if hard < needed:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    return min(needed, hard)


class KeepaliveCrowd:
    """``count`` idle subscribers keeping alive against ``server`` (see the module doc)."""

    def __init__(self, server: tuple[str, int], count: int, interval: float) -> None:
        if count < 1 or interval <= 0:
            raise ValueError("a crowd needs count >= 1 and a positive interval")
        limit = raise_fd_limit(count + 1024)
        if limit < count + 64:
            raise OSError(f"{count} subscribers need {count + 64} open files; the limit "
                          f"is {limit}")
        self.server = server
        self.count = count
        self.interval = interval
        self.stats = CrowdStats()
        self.rtt = Histogram()
        self.salt = os.urandom(4)
        self.round = [0] * count
        self.sent_at = [0.0] * count
        self.waiting = bytearray(count)
        self.socks: list[Any] = []
        self.watchers: list[Any] = []
        self.pending_rtts: dict[int, int] = {}
        self.pending_total = 0
        self.pending_low = 0
        self.pending_high = 0
        loop = gevent.get_hub().loop
        try:
            for index in range(count):
                source = SOURCES_BASE[:3] + (SOURCES_BASE[3] + index // PORTS_PER_SOURCE,)
                sock = _socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.socks.append(sock)
                sock.setblocking(False)
                sock.bind((".".join(map(str, source)), 0))
                sock.connect(server)
                watcher = loop.io(sock.fileno(), 1)
                watcher.start(self._readable, index)
                self.watchers.append(watcher)
        except BaseException:
            self.close()
            raise

    def _readable(self, index: int) -> None:
        sock = self.socks[index]
        while True:
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                return
            except OSError:
                self.stats.errors += 1
                return
            now = time.perf_counter()
            if data[:2] != _SUCCESS or data[8:12] != self.salt:
                self.stats.errors += 1
                continue
            round_number, subscriber = struct.unpack_from("!II", data, 12)
            if (subscriber != index or round_number != self.round[index]
                    or not self.waiting[index]):
                self.stats.late += 1
                continue
            self.waiting[index] = 0
            self.stats.answered += 1
            us = round((now - self.sent_at[index]) * 1e6)
            index_h = us if us < EXACT_LIMIT else (
                (us.bit_length() - 11) * SUB_BUCKETS + (us >> (us.bit_length() - 11)))
            pending = self.pending_rtts
            if not pending:
                self.pending_low = self.pending_high = us
            pending[index_h] = pending.get(index_h, 0) + 1
            self.pending_total += us
            self.pending_low = min(self.pending_low, us)
            self.pending_high = max(self.pending_high, us)

    def take_rtts(self) -> tuple[dict[int, int], int, int, int]:
        """RTT buckets since the last call (index -> count), total, min, max (us)."""
        taken = (self.pending_rtts, self.pending_total, self.pending_low, self.pending_high)
        self.rtt.add_counts(*taken)
        self.pending_rtts, self.pending_total = {}, 0
        return taken

    def run(self, duration: float | None = None, on_tick: Any = None) -> None:
        """Send keepalives until ``duration`` passes (or forever); ``on_tick()`` is called
        about every 100 ms (statistics flushing)."""
        started = time.perf_counter()
        step = self.interval / self.count
        next_index = 0
        rounds = 0
        next_flush = started + 0.1
        request = bytearray(20)
        pack = _REQUEST.pack_into
        write = os.write
        fds = [sock.fileno() for sock in self.socks]
        while True:
            now = time.perf_counter()
            if duration is not None and now - started >= duration:
                return
            due = int((now - started) / step) + 1 - (rounds * self.count + next_index)
            while due > 0:
                batch = min(due, self.count - next_index)
                for index in range(next_index, next_index + batch):
                    if self.waiting[index]:
                        self.stats.unanswered += 1
                    number = self.round[index] = self.round[index] + 1
                    pack(request, 0, 0x0001, 0, stun.COOKIE, self.salt, number, index)
                    self.sent_at[index] = time.perf_counter()
                    self.waiting[index] = 1
                    try:
                        write(fds[index], request)
                    except OSError:
                        self.stats.errors += 1
                self.stats.sent += batch
                due -= batch
                next_index += batch
                if next_index == self.count:
                    next_index = 0
                    rounds += 1
            if on_tick is not None and now >= next_flush:
                on_tick()
                next_flush = now + 0.1
            gevent.sleep(TICK)

    def outstanding(self) -> int:
        return sum(self.waiting)

    def close(self) -> None:
        for watcher in self.watchers:
            watcher.stop()
            watcher.close()
        for sock in self.socks:
            sock.close()
        self.watchers.clear()
        self.socks.clear()


class IdleSubscribersUser(_RelayUser):
    """``crowd_size`` idle subscribers behind one Locust user, keepalives every
    ``binding_interval`` seconds (20 when it is 0)."""

    def on_start(self) -> None:
        config = self.state.config
        interval = config.binding_interval or DEFAULT_INTERVAL
        self.crowd = KeepaliveCrowd(self.target.address, config.crowd_size, interval)

    @task
    def hold(self) -> None:
        try:
            self.crowd.run(on_tick=self._flush)
        finally:
            self._flush()

    def _flush(self) -> None:
        buckets, total, low, high = self.crowd.take_rtts()
        log_bulk(self.environment.stats, "STUN", "Keepalive", buckets, total, low, high,
                 time.time())
        self.state.media_for(self.target).binding_rtt.add_counts(buckets, total, low, high)

    def on_stop(self) -> None:
        self.crowd.close()

"""Tens of thousands of idle subscribers in one process, each keeping its NAT binding alive.

A :class:`KeepaliveCrowd` sends one Binding per subscriber per ``interval`` (phases spread
evenly, so the relay sees a steady ``count / interval`` requests/s) from ``count``
distinct source 5-tuples. No greenlet per subscriber: one scheduler greenlet sends what is
due every ``TICK``, and libev read watchers handle the responses in the hub itself (no
greenlet switch). A request's transaction id carries the subscriber number and the round,
so matching is an index lookup. Two transports:

``sockets``
    One UDP socket per subscriber (spread over 127.64.0.x source addresses: one address
    has only ~28k ephemeral ports), each connected to the relay; one ``os.write`` per
    request. Works unprivileged, against any relay, but needs one open file per
    subscriber.
``raw``
    What a CGNAT gateway's public side looks like: subscriber ``i`` is port
    ``RAW_PORT_BASE + i % RAW_PORTS`` of gateway address ``127.65.P.G`` (``P`` from the
    process id, ``G`` per ``RAW_PORTS`` subscribers). Requests leave through one
    ``IPPROTO_RAW`` socket with those source 5-tuples written into the IP/UDP headers;
    responses are read by one raw UDP socket bound to each gateway address, and a
    response counts only when it came back to the subscriber's own port. The open-file
    limit no longer caps the crowd. Needs ``CAP_NET_RAW`` and an IPv4 loopback relay
    (spoofed 127.x sources must never leave the host). The kernel would answer each
    response with an ICMP port-unreachable to the relay; a table of our own
    (``nft``, needs ``CAP_NET_ADMIN``) drops those while the crowd lives, and is removed
    with it.

``auto`` (the default) takes ``sockets`` when the open-file limit allows, else ``raw``.

:class:`IdleSubscribersUser` is the Locust face: one user holds ``crowd_size``
subscribers (``LoadgenConfig.crowd_size``) with keepalives every ``binding_interval``
seconds (default 20) and logs the keepalives in bulk as ``STUN``/``Keepalive``.
"""

from __future__ import annotations

import _socket
import contextlib
import ipaddress
import logging
import os
import resource
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
import locust.exception
from locust import task

from turnstorm.loadgen.flood import log_bulk
from turnstorm.loadgen.metrics import EXACT_LIMIT, SUB_BUCKETS, Histogram
from turnstorm.loadgen.users import _RelayUser
from turnstorm.proto import stun

logger = logging.getLogger(__name__)
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
RAW_PORT_BASE = 20000
RAW_PORTS = 40000
"""Subscribers per gateway address in the raw transport (ports 20000-59999)."""
RAW_BUFFER = 16 * 1024 * 1024
_RAW_HEADERS = struct.Struct("!BBHHHBBH4s4sHHHH")
"""IPv4 header (20 bytes, no options) + UDP header (8 bytes)."""
_RAW_SIZE = _RAW_HEADERS.size + _REQUEST.size
_CAP_NET_RAW = 13
RAW_GATEWAYS = "127.65.0.0/16"
"""Where raw-transport gateway addresses come from."""


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

    def __init__(self, server: tuple[str, int], count: int, interval: float,
                 transport: str = "auto") -> None:
        if count < 1 or interval <= 0:
            raise ValueError("a crowd needs count >= 1 and a positive interval")
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
        self.notes: list[str] = []
        """What the transport could not do as asked (shown by the bench and the CLI)."""
        self._nft_table: str | None = None
        self.transport = choose_transport(server, count, transport)
        try:
            if self.transport == "raw":
                self._open_raw()
            else:
                self._open_sockets()
        except BaseException:
            self.close()
            raise

    def _open_sockets(self) -> None:
        count = self.count
        loop = gevent.get_hub().loop
        for index in range(count):
            source = SOURCES_BASE[:3] + (SOURCES_BASE[3] + index // PORTS_PER_SOURCE,)
            sock = _socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.socks.append(sock)
            sock.setblocking(False)
            sock.bind((".".join(map(str, source)), 0))
            sock.connect(self.server)
            watcher = loop.io(sock.fileno(), 1)
            watcher.start(self._readable, index)
            self.watchers.append(watcher)
        fds = [sock.fileno() for sock in self.socks]
        write = os.write

        def send(index: int, request: bytearray) -> None:
            write(fds[index], request)

        self._send: Callable[[int, bytearray], None] = send

    def _open_raw(self) -> None:
        self.gateways = self._claim_gateways(-(-self.count // RAW_PORTS))
        self._drop_port_unreachables()
        sender = _socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.socks.append(sender)
        sender.setblocking(False)
        with contextlib.suppress(OSError):
            sender.setsockopt(socket.SOL_SOCKET, 32, RAW_BUFFER)  # SO_SNDBUFFORCE
        loop = gevent.get_hub().loop
        for gateway in self.gateways:
            receiver = _socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
            self.socks.append(receiver)
            receiver.setblocking(False)
            with contextlib.suppress(OSError):
                receiver.setsockopt(socket.SOL_SOCKET, 33, RAW_BUFFER)  # SO_RCVBUFFORCE
            receiver.bind((gateway, 0))
            watcher = loop.io(receiver.fileno(), 1)
            watcher.start(self._raw_readable, receiver, gateway)
            self.watchers.append(watcher)
        server_ip = socket.inet_aton(self.server[0])
        server_port = self.server[1]
        sources = [socket.inet_aton(gateway) for gateway in self.gateways]
        packet = bytearray(_RAW_SIZE)
        pack = _RAW_HEADERS.pack_into
        sendto = sender.sendto
        destination = (self.server[0], 0)

        def send(index: int, request: bytearray) -> None:
            # IPv4: version/IHL, TOS, length and checksum filled by the kernel, id 0 (the
            # kernel picks one), TTL 64, UDP; UDP checksum 0 (none, allowed over IPv4)
            pack(packet, 0, 0x45, 0, _RAW_SIZE, 0, 0, 64, socket.IPPROTO_UDP, 0,
                 sources[index // RAW_PORTS], server_ip,
                 RAW_PORT_BASE + index % RAW_PORTS, server_port, 8 + _REQUEST.size, 0)
            packet[_RAW_HEADERS.size:] = request
            sendto(packet, destination)

        self._send = send

    def _claim_gateways(self, needed: int) -> list[str]:
        """``needed`` gateway addresses no other crowd holds (see the module doc); the
        claiming sockets stay open (in ``socks``) as long as the crowd."""
        claimed: list[str] = []
        for address in ipaddress.ip_network(RAW_GATEWAYS).hosts():
            if len(claimed) == needed:
                return claimed
            claim = _socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                claim.bind((str(address), RAW_PORT_BASE - 1))
            except OSError:
                claim.close()
                continue
            self.socks.append(claim)
            claimed.append(str(address))
        if len(claimed) < needed:
            raise OSError(f"only {len(claimed)} of {needed} raw gateway addresses are free "
                          f"in {RAW_GATEWAYS}")
        return claimed

    def _drop_port_unreachables(self) -> None:
        """No socket owns the gateway ports, so the kernel answers each response with an
        ICMP port-unreachable to the relay: drop those in a table of our own."""
        nft = shutil.which("nft")
        table = f"turnstorm_crowd_{os.getpid()}"
        rules = (f"table ip {table} {{\n chain out {{\n  type filter hook output priority 0;\n"
                 f"  ip saddr {RAW_GATEWAYS} icmp type destination-unreachable drop\n }}\n}}\n")
        if nft is None:
            self.notes.append("nft not found: the relay receives the kernel's ICMP "
                              "port-unreachables (rate-limited to 1000/s)")
            return
        done = subprocess.run([nft, "-f", "-"], input=rules, text=True, capture_output=True,
                              check=False)
        if done.returncode != 0:
            self.notes.append(f"could not add the ICMP drop table ({done.stderr.strip()}): "
                              "the relay receives the kernel's port-unreachables")
            return
        self._nft_table = table

    def _raw_readable(self, receiver: Any, gateway: str) -> None:
        """Responses to one gateway's subscribers (IP header first: raw sockets)."""
        recv = receiver.recv
        server_port = self.server[1]
        gateway_base = self.gateways.index(gateway) * RAW_PORTS
        while True:
            try:
                data = recv(2048)
            except BlockingIOError:
                return
            except OSError:
                self.stats.errors += 1
                return
            now = time.perf_counter()
            header = (data[0] & 0x0F) * 4
            source_port, port = struct.unpack_from("!HH", data, header)
            if source_port != server_port:
                continue  # other UDP to this address (not from the relay)
            stun_at = header + 8
            if data[stun_at:stun_at + 2] != _SUCCESS or \
                    data[stun_at + 8:stun_at + 12] != self.salt:
                self.stats.errors += 1
                continue
            round_number, subscriber = struct.unpack_from("!II", data, stun_at + 12)
            if subscriber != gateway_base + port - RAW_PORT_BASE:
                self.stats.errors += 1  # answered to another subscriber's 5-tuple
                continue
            self._answered(subscriber, round_number, now)

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
            if subscriber != index:
                self.stats.late += 1
                continue
            self._answered(index, round_number, now)

    def _answered(self, index: int, round_number: int, now: float) -> None:
        if round_number != self.round[index] or not self.waiting[index]:
            self.stats.late += 1
            return
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

    def run(self, duration: float | None = None, on_tick: Any = None,
            pace: Callable[[int], None] | None = None) -> None:
        """Send keepalives until ``duration`` passes (or forever); ``on_tick()`` is called
        about every 100 ms (statistics flushing). ``pace(1)`` is charged before each request
        (the process's ``--max-pps`` limiter; it may sleep)."""
        started = time.perf_counter()
        step = self.interval / self.count
        next_index = 0
        rounds = 0
        next_flush = started + 0.1
        request = bytearray(20)
        pack = _REQUEST.pack_into
        send = self._send
        while True:
            now = time.perf_counter()
            if duration is not None and now - started >= duration:
                return
            due = int((now - started) / step) + 1 - (rounds * self.count + next_index)
            while due > 0:
                batch = min(due, self.count - next_index)
                for index in range(next_index, next_index + batch):
                    if pace is not None:
                        pace(1)  # per packet: a whole round must not leave as one burst
                    if self.waiting[index]:
                        self.stats.unanswered += 1
                    number = self.round[index] = self.round[index] + 1
                    pack(request, 0, 0x0001, 0, stun.COOKIE, self.salt, number, index)
                    self.sent_at[index] = time.perf_counter()
                    self.waiting[index] = 1
                    try:
                        send(index, request)
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
        if self._nft_table is not None:
            subprocess.run(["nft", "delete", "table", "ip", self._nft_table],
                           capture_output=True, check=False)
            self._nft_table = None


def choose_transport(server: tuple[str, int], count: int, transport: str) -> str:
    """The transport ``count`` subscribers of ``server`` get here (``auto`` resolved);
    raises OSError with a one-line reason when the one asked for cannot work (the
    ``sockets`` transport raises the open-file limit as far as it can first)."""
    if transport not in ("auto", "sockets", "raw"):
        raise ValueError(f"unknown keepalive transport {transport!r} (auto, sockets or raw)")
    if transport != "raw":
        limit = raise_fd_limit(count + 1024)
        if limit >= count + 64:
            return "sockets"
        if transport == "sockets":
            raise OSError(f"{count} subscribers need {count + 64} open files; the limit "
                          f"is {limit}")
        if why := raw_unavailable(server):
            raise OSError(f"{count} subscribers need {count + 64} open files (the limit "
                          f"is {limit}) or the raw transport, which {why}")
        return "raw"
    if why := raw_unavailable(server):
        raise OSError(f"the raw keepalive transport {why}")
    return "raw"


def raw_unavailable(server: tuple[str, int]) -> str | None:
    """Why the raw transport cannot serve ``server`` here (None when it can)."""
    try:
        address = ipaddress.ip_address(server[0])
    except ValueError:
        return f"needs the relay as an IPv4 address, not {server[0]!r}"
    if address.version != 4 or not address.is_loopback:
        return ("needs an IPv4 loopback relay (its spoofed 127.x sources must not leave "
                "the host)")
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("CapEff:"):
                if not int(line.split()[1], 16) >> _CAP_NET_RAW & 1:
                    return "needs CAP_NET_RAW (run as root)"
                break
    return None


class IdleSubscribersUser(_RelayUser):
    """``crowd_size`` idle subscribers behind one Locust user, keepalives every
    ``binding_interval`` seconds (20 when it is 0)."""

    def on_start(self) -> None:
        config = self.state.config
        interval = config.binding_interval or DEFAULT_INTERVAL
        try:
            self.crowd = KeepaliveCrowd(self.target.address, config.crowd_size, interval,
                                        config.crowd_transport)
        except OSError as exc:  # e.g. out of open files: one line, not a traceback
            logger.error("idle subscribers of user %d: cannot open the crowd: %s",
                         self.number, exc.strerror or exc)
            self.fire("STUN", "Keepalive", 0.0, exception=exc)
            raise locust.exception.StopUser() from None
        for note in self.crowd.notes:
            logger.warning("idle subscribers: %s", note)

    @task
    def hold(self) -> None:
        try:
            self.crowd.run(on_tick=self._flush, pace=self.state.limiter.acquire)
        finally:
            self._flush()

    def _flush(self) -> None:
        buckets, total, low, high = self.crowd.take_rtts()
        log_bulk(self.environment.stats, "STUN", "Keepalive", buckets, total, low, high,
                 time.time())
        self.state.media_for(self.target).binding_rtt.add_counts(buckets, total, low, high)

    def on_stop(self) -> None:
        crowd: KeepaliveCrowd | None = getattr(self, "crowd", None)
        if crowd is not None:  # None when on_start could not open it
            crowd.close()

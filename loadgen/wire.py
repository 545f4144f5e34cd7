"""A gevent-friendly synchronous STUN/TURN client over UDP.

The asyncio client (:mod:`turnstorm.client`) cannot run inside Locust's gevent hub; this
one reuses the same pure parts (the codec and :class:`ClientTransaction`) on a
non-blocking UDP socket. No greenlet per client: a libev read watcher calls
:meth:`UdpClient._readable` in the hub itself when datagrams are queued, which drains them
and dispatches: responses to the waiting request (a gevent ``AsyncResult``) by transaction
id, ChannelData to a callback by channel number (no greenlet switch per media packet).
While a call's media flows, the :class:`~turnstorm.loadgen.media.MediaPump` takes the
reading over (:meth:`UdpClient.detach_reader`) and calls :meth:`UdpClient.read_one` itself.
Requests block only the calling greenlet. Callbacks therefore run in the hub and must not
block.
"""

from __future__ import annotations

import _socket
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.event import AsyncResult

from turnstorm.errors import TurnstormError, error_for
from turnstorm.proto import stun
from turnstorm.proto.auth import LongTermAuth
from turnstorm.proto.credentials import Credentials
from turnstorm.proto.stun import Address, Class, Message, Method
from turnstorm.proto.transaction import ClientTransaction, RetransmitPolicy

ChannelHandler = Callable[[int, bytes, float], None]
"""Called with ``(channel, payload, received_at)`` for every ChannelData datagram."""
EchoHandler = Callable[[int, float, float, int], None]
"""Called with ``(seq, sent, received_at, size)`` for every echoed media frame: its
sequence number, send time (the :func:`clock`) and payload size."""
DataHandler = Callable[[Address, bytes, float], None]
"""Called with ``(peer, data, received_at)`` for every Data indication."""

METHOD_NAMES = {
    Method.BINDING: "Binding",
    Method.ALLOCATE: "Allocate",
    Method.REFRESH: "Refresh",
    Method.CREATE_PERMISSION: "CreatePermission",
    Method.CHANNEL_BIND: "ChannelBind",
}
RECV_SIZE = 65535
_CHANNEL_HEADER = struct.Struct("!HH")
MEDIA_HEADER = struct.Struct("!Id")
"""Media payload header: sequence number and send time (the generator's clock)."""
CHANNEL_HEADER = struct.Struct("!HHId")
"""ChannelData header (channel, length) followed by the media header: one pack or unpack
per frame."""
SO_TIMESTAMPNS = 35
"""Linux ``SO_TIMESTAMPNS`` (its control message type has the same value); the socket
module does not export it."""
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY_SIZE = 64
_ECHO_UNPACK = CHANNEL_HEADER.unpack_from
_ECHO_SIZE = CHANNEL_HEADER.size
_MEDIA_SIZE = MEDIA_HEADER.size
clock = time.perf_counter
"""The one clock of this module: request RTTs, retransmission deadlines, media stamps."""


class WireError(TurnstormError):
    """The socket failed: the server is unreachable or the client is closed."""


@dataclass
class Allocation:
    relayed: Address
    mapped: Address
    lifetime: int


class UdpClient:
    """One UDP socket connected to one STUN/TURN server, with long-term authentication.

    ``local`` binds the socket first (the CGNAT emulation uses it to pick the 5-tuple the
    relay sees). Handles the 401 -> REALM/NONCE -> authenticated retry and one 438
    stale-nonce retry per request.
    """

    def __init__(
        self,
        server: Address,
        *,
        credentials: Credentials | None = None,
        local: Address | None = None,
        policy: RetransmitPolicy | None = None,
    ) -> None:
        self.server = server
        self.policy = policy or RetransmitPolicy()
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.sock: Any = _socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            with contextlib.suppress(OSError):  # without it, arrival = when the hub reads
                self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            if local is not None:
                self.sock.bind(local)
            self.sock.connect(server)
        except OSError as exc:
            self.sock.close()
            raise WireError(f"cannot open UDP {_fmt(local or ('*', 0))} -> {_fmt(server)}: "
                            f"{exc.strerror or exc}") from None
        self.auth = LongTermAuth(credentials)
        self.allocation: Allocation | None = None
        self.channels: dict[int, Address] = {}
        self.on_channel_data: ChannelHandler | None = None
        self.on_echo: EchoHandler | None = None
        """When set, takes ChannelData over from ``on_channel_data``: each echoed media
        frame (payload starting with :data:`MEDIA_HEADER`) is unpacked in one go and
        handed over, with no copy of the payload; shorter ChannelData is dropped."""
        self.on_data: DataHandler | None = None
        self.retransmits = 0
        """Requests sent again by the retransmission timer (amplification measure)."""
        self.pace: Callable[[int], None] | None = None
        """Charged one packet before each retransmission (the process's ``--max-pps``
        limiter; it may sleep), so retransmissions stay inside the rate bound."""
        self.parse_errors = 0
        self.last_rtt = 0.0
        """RTT of the last completed transaction, seconds."""
        self._pending: dict[bytes, AsyncResult] = {}
        self._next_channel = stun.CHANNEL_MIN
        self._closed = False
        self._watcher = gevent.get_hub().loop.io(self.sock.fileno(), 1)
        self._watcher.start(self._readable)

    @property
    def local_address(self) -> Address:
        host, port = self.sock.getsockname()[:2]
        return host, port

    # -- wire ------------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        if self._closed:
            raise WireError("the client is closed")
        try:
            self.sock.send(data)
        except BlockingIOError:
            raise WireError(f"cannot send to {_fmt(self.server)}: the send buffer is "
                            "full") from None
        except OSError as exc:
            raise WireError(f"cannot send to {_fmt(self.server)}: {exc.strerror or exc}") from None

    def _readable(self) -> None:
        """Drain the socket (called in the hub by the read watcher)."""
        offset = time.time() - clock()
        read_one = self.read_one
        while read_one(offset):
            pass

    def read_one(self, offset: float) -> bool:
        """Receive and dispatch one datagram; False when none is queued (or closed).

        ``offset`` is ``time.time() - clock()``. Each datagram is stamped with its kernel
        arrival time (``SO_TIMESTAMPNS``), so an RTT does not include how long the reader
        took to get here: the media echo and the direct Binding that the relay overhead
        subtracts are measured the same exact way. The :class:`MediaPump` calls this
        itself for the sockets of its flows (see :meth:`detach_reader`)."""
        if self._closed:
            return False
        try:
            data, ancillary, _, _ = self.sock.recvmsg(RECV_SIZE, _ANCILLARY_SIZE)
        except BlockingIOError:
            return False
        except OSError as exc:
            self.unreachable(exc)
            return True
        if ancillary:
            seconds, nanoseconds = _TIMESPEC.unpack(ancillary[0][2])
            now = seconds - offset + nanoseconds * 1e-9
        else:
            now = clock()
        self.dispatch(data, now)
        return True

    def unreachable(self, exc: OSError) -> None:
        """A receive failed (ICMP port unreachable on a connected socket): fail what is
        waiting."""
        self._fail_all(WireError(f"cannot reach UDP {_fmt(self.server)}: "
                                 f"{exc.strerror or exc}"))

    def dispatch(self, data: bytes, now: float) -> None:
        """Hand one received datagram (arrived at ``now``, :func:`clock`) to its
        consumer: ChannelData to ``on_echo`` or ``on_channel_data``, responses to their
        transactions, Data indications to ``on_data``."""
        if len(data) >= 4 and 0x40 <= data[0] <= 0x4F:
            on_echo = self.on_echo
            if on_echo is not None:
                if len(data) >= _ECHO_SIZE:
                    _, length, seq, sent = _ECHO_UNPACK(data)
                    if _MEDIA_SIZE <= length <= len(data) - 4:
                        on_echo(seq, sent, now, length)
                return
            channel, length = _CHANNEL_HEADER.unpack_from(data)
            handler = self.on_channel_data
            if handler is not None and length <= len(data) - 4:
                handler(channel, data[4:4 + length], now)
            return
        try:
            message = stun.parse(data)
        except stun.StunParseError:
            self.parse_errors += 1
            return
        if message.message_class in (Class.RESPONSE, Class.ERROR):
            waiter = self._pending.get(message.transaction_id)
            if waiter is not None and not waiter.ready():
                waiter.set((message, now))
        elif message.method == Method.DATA and self.on_data is not None:
            peer = message.attributes.get("XOR-PEER-ADDRESS")
            payload = message.attributes.get("DATA")
            if peer is not None and payload is not None:
                self.on_data(peer, payload, now)

    def detach_reader(self) -> None:
        """Stop the hub's read watcher: somebody else calls :meth:`read_one` now."""
        if not self._closed:
            self._watcher.stop()

    def attach_reader(self) -> None:
        """Give reading back to the hub's read watcher (it fires for anything queued)."""
        if not self._closed:
            self._watcher.start(self._readable)

    def _fail_all(self, exc: Exception) -> None:
        for waiter in self._pending.values():
            if not waiter.ready():
                waiter.set_exception(exc)

    # -- transactions ----------------------------------------------------------------------

    def transact(self, request: Message, data: bytes) -> tuple[Message, float]:
        """Send ``data`` (the encoded ``request``) with retransmissions per the policy.

        Returns the response and the RTT in seconds measured from the last send.
        Raises :class:`TransactionTimeout` when the schedule runs out.
        """
        name = METHOD_NAMES.get(Method(request.method), "request")
        transaction = ClientTransaction(name, policy=self.policy)
        waiter = AsyncResult()
        tid = request.transaction_id
        self._pending[tid] = waiter
        try:
            sent_at = clock()
            transaction.start(sent_at)
            self.send_raw(data)
            while True:
                deadline = transaction.deadline
                assert deadline is not None
                waiter.wait(max(0.0, deadline - clock()))
                if waiter.ready():
                    message, received_at = waiter.get()
                    transaction.on_response()
                    self.last_rtt = received_at - sent_at
                    return message, self.last_rtt
                if transaction.on_timer(clock()):
                    self.retransmits += 1
                    if self.pace is not None:
                        self.pace(1)
                    sent_at = clock()
                    self.send_raw(data)
        finally:
            self._pending.pop(tid, None)

    def request(self, request: Message, key: bytes | None = None) -> tuple[Message, float]:
        """An unauthenticated request; error responses raise their specific error."""
        response, rtt = self.transact(request, request.encode(key, fingerprint=True))
        if response.message_class == Class.ERROR:
            raise _error(request, response)
        return response, rtt

    def binding(self) -> tuple[Address, float]:
        """One Binding transaction: the server-reflexive address and the RTT in seconds."""
        response, rtt = self.request(Message(Method.BINDING, Class.REQUEST))
        mapped = response.attributes.get("XOR-MAPPED-ADDRESS") or response.attributes.get(
            "MAPPED-ADDRESS")
        if mapped is None:
            raise TurnstormError("Binding response has no XOR-MAPPED-ADDRESS")
        return mapped, rtt

    def auth_request(self, request: Message) -> tuple[Message, float]:
        """Send ``request`` with long-term credentials, learning REALM/NONCE as needed.

        The RTT returned is the one of the final (successful) transaction.
        """
        method = METHOD_NAMES.get(Method(request.method), "request")
        attempt = self.auth.attempt(method)
        while True:
            key = self.auth.sign(request)
            response, rtt = self.transact(request, request.encode(key, fingerprint=True))
            if response.message_class != Class.ERROR:
                return response, rtt
            request = attempt.retry(request, response, signed=key is not None)

    # -- TURN operations --------------------------------------------------------------------

    def allocate(self, lifetime: int | None = None) -> tuple[Allocation, float]:
        attributes: dict[str, Any] = {"REQUESTED-TRANSPORT": stun.UDP_TRANSPORT}
        if lifetime is not None:
            attributes["LIFETIME"] = lifetime
        response, rtt = self.auth_request(Message(Method.ALLOCATE, Class.REQUEST,
                                                  attributes=attributes))
        for name in ("XOR-RELAYED-ADDRESS", "XOR-MAPPED-ADDRESS", "LIFETIME"):
            if name not in response.attributes:
                raise TurnstormError(f"Allocate response has no {name}")
        self.allocation = Allocation(
            relayed=response.attributes["XOR-RELAYED-ADDRESS"],
            mapped=response.attributes["XOR-MAPPED-ADDRESS"],
            lifetime=response.attributes["LIFETIME"],
        )
        return self.allocation, rtt

    def refresh(self, lifetime: int | None = None) -> tuple[int, float]:
        """Refresh the allocation; ``lifetime=0`` releases it. Returns (granted, rtt)."""
        attributes: dict[str, Any] = {}
        if lifetime is not None:
            attributes["LIFETIME"] = lifetime
        response, rtt = self.auth_request(Message(Method.REFRESH, Class.REQUEST,
                                                  attributes=attributes))
        granted: int = response.attributes.get("LIFETIME", 0 if lifetime == 0 else -1)
        if self.allocation is not None:
            self.allocation.lifetime = granted
        if lifetime == 0:
            self.allocation = None
        return granted, rtt

    def create_permission(self, peer: Address) -> float:
        _, rtt = self.auth_request(Message(Method.CREATE_PERMISSION, Class.REQUEST,
                                           attributes={"XOR-PEER-ADDRESS": peer}))
        return rtt

    def channel_bind(self, peer: Address, channel: int | None = None) -> tuple[int, float]:
        """Bind (or refresh, with the same ``channel``) a channel to ``peer``."""
        if channel is None:
            if self._next_channel > stun.CHANNEL_MAX:
                raise TurnstormError("all 4096 channel numbers are in use")
            channel = self._next_channel
            self._next_channel += 1
        _, rtt = self.auth_request(Message(Method.CHANNEL_BIND, Class.REQUEST, attributes={
            "CHANNEL-NUMBER": channel, "XOR-PEER-ADDRESS": peer,
        }))
        self.channels[channel] = peer
        return channel, rtt

    def send_channel(self, channel: int, payload: bytes) -> None:
        """One ChannelData datagram (no validation: the hot path of media)."""
        self.send_raw(_CHANNEL_HEADER.pack(channel, len(payload)) + payload)

    def send_indication(self, peer: Address, data: bytes) -> None:
        self.send_raw(Message(Method.SEND, Class.INDICATION, attributes={
            "XOR-PEER-ADDRESS": peer, "DATA": data}).encode())

    def close(self) -> None:
        """Close without releasing (see :meth:`release_and_close`)."""
        if self._closed:
            return
        self._closed = True
        self._fail_all(WireError("the client is closed"))
        self._watcher.stop()
        self._watcher.close()
        self.sock.close()

    def release_and_close(self, timeout: float = 5.0) -> None:
        """Release the allocation if there is one (best effort), then close."""
        if self.allocation is not None:
            with contextlib.suppress(Exception), gevent.Timeout(timeout, False):
                self.refresh(0)
        self.close()

    def __enter__(self) -> UdpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _error(request: Message, response: Message) -> Exception:
    code, reason = response.attributes.get("ERROR-CODE", (0, "no ERROR-CODE"))
    return error_for(METHOD_NAMES.get(Method(request.method), "request"), code, reason)


def _fmt(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

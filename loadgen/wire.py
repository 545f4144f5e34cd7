"""A gevent-friendly synchronous STUN/TURN client over UDP.

The asyncio client (:mod:`turnstorm.client`) cannot run inside Locust's gevent hub; this
one drives the same sans-I/O :class:`~turnstorm.proto.session.TurnSession` (requests,
authentication, retransmission, allocation, channels) on a non-blocking UDP socket. No
greenlet per client: a libev read watcher calls :meth:`UdpClient._readable` in the hub
itself when datagrams are queued, which drains them and dispatches: responses to the
session (which completes the waiting request, a gevent ``AsyncResult``), ChannelData to a
callback by channel number (no greenlet switch per media packet, and no session: this is
the media hot path). While a call's media flows, the
:class:`~turnstorm.loadgen.media.MediaPump` takes the reading over
(:meth:`UdpClient.detach_reader`) and calls :meth:`UdpClient.read_one` itself. Requests
block only the calling greenlet. Callbacks therefore run in the hub and must not block.
"""

from __future__ import annotations

import _socket
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import AsyncResult

from turnstorm.errors import TurnstormError
from turnstorm.proto.auth import LongTermAuth
from turnstorm.proto.credentials import Credentials
from turnstorm.proto.session import Allocation, PeerData, Request, TurnSession, Unparsable
from turnstorm.proto.stun import Address, Message
from turnstorm.proto.transaction import RetransmitPolicy

ChannelHandler = Callable[[int, bytes, float], None]
"""Called with ``(channel, payload, received_at)`` for every ChannelData datagram."""
EchoHandler = Callable[[int, float, float, int], None]
"""Called with ``(seq, sent, received_at, size)`` for every echoed media frame: its
sequence number, send time (the :func:`clock`) and payload size."""
DataHandler = Callable[[Address, bytes, float], None]
"""Called with ``(peer, data, received_at)`` for every Data indication."""

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
        self.session = TurnSession(credentials, policy=self.policy)
        self.on_channel_data: ChannelHandler | None = None
        self.on_echo: EchoHandler | None = None
        """When set, takes ChannelData over from ``on_channel_data``: each echoed media
        frame (payload starting with :data:`MEDIA_HEADER`) is unpacked in one go and
        handed over, with no copy of the payload; shorter ChannelData is dropped."""
        self.on_data: DataHandler | None = None
        self.pace: Callable[[int], None] | None = None
        """Charged one packet before each retransmission (the process's ``--max-pps``
        limiter; it may sleep), so retransmissions stay inside the rate bound."""
        self.parse_errors = 0
        self.last_rtt = 0.0
        """RTT of the last completed transaction, seconds."""
        self._closed = False
        self._watcher = gevent.get_hub().loop.io(self.sock.fileno(), 1)
        self._watcher.start(self._readable)

    @property
    def local_address(self) -> Address:
        host, port = self.sock.getsockname()[:2]
        return host, port

    @property
    def auth(self) -> LongTermAuth:
        return self.session.auth

    @property
    def allocation(self) -> Allocation | None:
        return self.session.allocation

    @property
    def channels(self) -> dict[int, Address]:
        return self.session.channels

    @property
    def retransmits(self) -> int:
        """Requests sent again by the retransmission timer (amplification measure)."""
        return self.session.retransmits

    @retransmits.setter
    def retransmits(self, count: int) -> None:
        self.session.retransmits = count

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
        event = self.session.receive(data, now)
        if isinstance(event, PeerData):
            if self.on_data is not None:
                self.on_data(event.peer, event.data, now)
        elif isinstance(event, Unparsable):
            self.parse_errors += 1
        elif event is None:  # a response: an authenticated retry may be queued
            try:
                self._send_queued()
            except WireError as exc:
                self._fail_all(exc)

    def detach_reader(self) -> None:
        """Stop the hub's read watcher: somebody else calls :meth:`read_one` now."""
        if not self._closed:
            self._watcher.stop()

    def attach_reader(self) -> None:
        """Give reading back to the hub's read watcher (it fires for anything queued)."""
        if not self._closed:
            self._watcher.start(self._readable)

    def _fail_all(self, exc: Exception) -> None:
        self.session.fail_all(exc)

    def _send_queued(self) -> None:
        for data in self.session.send(clock()):
            self.send_raw(data)

    # -- transactions ----------------------------------------------------------------------

    def complete(self, request: Request) -> Request:
        """Send ``request`` (just started on the session), retransmitting per the policy,
        and block this greenlet until it completes; its error is raised. Its ``rtt`` is
        measured from the last send, and kept in :attr:`last_rtt`."""
        waiter = AsyncResult()
        request.on_done = waiter.set
        session = self.session
        try:
            self._send_queued()
            while not waiter.ready():
                deadline = session.deadline
                assert deadline is not None
                if waiter.wait(max(0.0, deadline - clock())) is not None:
                    break
                again = session.timer(clock())
                if again and self.pace is not None:
                    self.pace(again)
                self._send_queued()
        finally:
            if not request.done:
                session.abandon(request)
        request.result()
        self.last_rtt = request.rtt
        return request

    def request(self, request: Message, key: bytes | None = None) -> tuple[Message, float]:
        """An unauthenticated request; error responses raise their specific error."""
        done = self.complete(self.session.start(request, authenticate=False, key=key))
        return done.result(), done.rtt

    def binding(self) -> tuple[Address, float]:
        """One Binding transaction: the server-reflexive address and the RTT in seconds."""
        done = self.complete(self.session.binding())
        assert done.mapped is not None
        return done.mapped, done.rtt

    def auth_request(self, request: Message) -> tuple[Message, float]:
        """Send ``request`` with long-term credentials, learning REALM/NONCE as needed.

        The RTT returned is the one of the final (successful) transaction.
        """
        done = self.complete(self.session.start(request))
        return done.result(), done.rtt

    # -- TURN operations --------------------------------------------------------------------

    def allocate(self, lifetime: int | None = None) -> tuple[Allocation, float]:
        done = self.complete(self.session.allocate(lifetime))
        assert self.session.allocation is not None
        return self.session.allocation, done.rtt

    def refresh(self, lifetime: int | None = None) -> tuple[int, float]:
        """Refresh the allocation; ``lifetime=0`` releases it. Returns (granted, rtt)."""
        done = self.complete(self.session.refresh(lifetime))
        assert done.lifetime is not None
        return done.lifetime, done.rtt

    def create_permission(self, peer: Address) -> float:
        return self.complete(self.session.create_permission(peer)).rtt

    def channel_bind(self, peer: Address, channel: int | None = None) -> tuple[int, float]:
        """Bind (or refresh, with the same ``channel``) a channel to ``peer``."""
        done = self.complete(self.session.channel_bind(peer, channel))
        assert done.channel is not None
        return done.channel, done.rtt

    def send_channel(self, channel: int, payload: bytes) -> None:
        """One ChannelData datagram (no validation: the hot path of media)."""
        self.send_raw(_CHANNEL_HEADER.pack(channel, len(payload)) + payload)

    def send_indication(self, peer: Address, data: bytes) -> None:
        self.send_raw(self.session.send_indication(peer, data))

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


def _fmt(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""asyncio STUN/TURN client sessions over UDP and TCP.

A thin I/O shell around :class:`turnstorm.proto.session.TurnSession`, which builds the
requests, decides when to retransmit and authenticate and reads the responses: this
module only moves bytes and arms one timer on the loop clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

from turnstorm.errors import StunErrorResponse, TurnstormError
from turnstorm.proto import stun
from turnstorm.proto.auth import LongTermAuth
from turnstorm.proto.credentials import Credentials
from turnstorm.proto.session import (
    Allocation,
    Indication,
    PeerData,
    Request,
    TurnSession,
    Unparsable,
)
from turnstorm.proto.stun import Address, Message
from turnstorm.proto.transaction import RetransmitPolicy, TransactionTimeout
from turnstorm.uri import parse_host_port  # noqa: F401 - imported from here by tests/node

DataHandler = Callable[[Address, bytes], None]


class ConnectError(TurnstormError):
    """The server cannot be reached at all."""


class _Protocol(asyncio.Protocol, asyncio.DatagramProtocol):
    """Feeds received frames (datagrams or stream-delimited) to the client."""

    def __init__(self, client: StunClient) -> None:
        self.client = client
        self.buffer = b""

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.client._frame_received(data)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            while (size := stun.stream_frame_length(self.buffer)) is not None:
                frame, self.buffer = self.buffer[:size], self.buffer[size:]
                self.client._frame_received(frame)
        except stun.StunParseError as exc:
            self.client._fail_all(ConnectError(f"TCP stream from the server is corrupt: {exc}"))

    def error_received(self, exc: Exception) -> None:
        self.client._socket_error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        client = self.client
        client.closed_reason = client.closed_reason or "connection to the server was closed"
        client._fail_all(ConnectError(client.closed_reason))


class StunClient:
    """One local socket (UDP or TCP) talking to one STUN/TURN server: the asyncio shell
    of a :class:`~turnstorm.proto.session.TurnSession` (timers on the loop clock)."""

    def __init__(self, server: Address, transport: str, policy: RetransmitPolicy | None) -> None:
        self.server = server
        self.transport_name = transport
        self.reliable = transport == "tcp"
        self.policy = policy or RetransmitPolicy()
        self.session = TurnSession(reliable=self.reliable, policy=self.policy)
        self._transport: asyncio.BaseTransport | None = None
        self._pending: dict[bytes, asyncio.Future[Request]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.on_data: DataHandler | None = None
        self.on_indication: Callable[[Message], None] | None = None
        self.received_errors: list[Exception] = []
        self.closed_reason: str | None = None
        """Why requests can no longer be sent: closed by us, or by the server."""

    @classmethod
    async def connect(
        cls,
        server: Address,
        transport: str = "udp",
        *,
        local: Address | None = None,
        policy: RetransmitPolicy | None = None,
        timeout: float = 5.0,
    ) -> Any:
        self = cls(server, transport, policy)
        loop = self._loop
        host, port = server
        try:
            if transport == "udp":
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                self._transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Protocol(self), local_addr=local,
                    remote_addr=server, family=family,
                )
            elif transport == "tcp":
                self._transport, _ = await asyncio.wait_for(
                    loop.create_connection(lambda: _Protocol(self), host, port,
                                           local_addr=local),
                    timeout,
                )
            else:
                raise ConnectError(f"unsupported transport {transport!r} (use udp or tcp)")
        except (OSError, TimeoutError) as exc:
            raise ConnectError(
                f"cannot reach {transport.upper()} {host}:{port}: "
                f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else 'timed out'}"
            ) from None
        return self

    @property
    def local_address(self) -> Address:
        assert self._transport is not None
        sockname = self._transport.get_extra_info("sockname")
        return sockname[0], sockname[1]

    @property
    def software(self) -> str | None:
        return self.session.software

    @property
    def auth(self) -> LongTermAuth:
        return self.session.auth

    # -- wire ------------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectError(self.closed_reason or "the client is closed")
        if self.reliable:
            transport.write(data)  # type: ignore[attr-defined]
        else:
            transport.sendto(data)  # type: ignore[attr-defined]

    def _frame_received(self, data: bytes) -> None:
        event = self.session.receive(data, self._loop.time())
        if isinstance(event, PeerData):
            if self.on_data is not None:
                self.on_data(event.peer, event.data)
        elif isinstance(event, Indication):
            if self.on_indication is not None:
                self.on_indication(event.message)
        elif isinstance(event, Unparsable):
            self.received_errors.append(event.error)
        else:  # a response: its request completed, or an authenticated retry is queued
            self._flush()

    def _flush(self) -> None:
        """Send what the session queued (retries, retransmissions) and re-arm its timer."""
        try:
            for data in self.session.send(self._loop.time()):
                self.send_raw(data)
        except ConnectError as exc:
            self.session.fail_all(exc)
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.session.deadline
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.session.timer(self._loop.time())
        self._flush()

    def _socket_error(self, exc: Exception) -> None:
        # ICMP port unreachable on a connected UDP socket: nobody listens there.
        self._fail_all(ConnectError(
            f"cannot reach {self.transport_name.upper()} {self.server[0]}:{self.server[1]}: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ))

    def _fail_all(self, exc: Exception) -> None:
        self.session.fail_all(exc)
        self._arm()

    # -- transactions ----------------------------------------------------------------------

    async def complete(self, request: Request) -> Message:
        """Send ``request`` (just started on the session) and wait for its outcome."""
        future: asyncio.Future[Request] = self._loop.create_future()
        tid = request.message.transaction_id
        self._pending[tid] = future
        request.on_done = lambda done: None if future.done() else future.set_result(done)
        try:
            for data in self.session.send(self._loop.time()):
                self.send_raw(data)
            self._arm()
            return (await future).result()
        finally:
            self._pending.pop(tid, None)
            if not request.done:
                self.session.abandon(request)
                self._arm()

    async def request(
        self, request: Message, key: bytes | None = None, *, fingerprint: bool = True
    ) -> Message:
        """An unauthenticated request; an error response raises its specific error."""
        return await self.complete(self.session.start(
            request, authenticate=False, key=key, fingerprint=fingerprint))

    async def binding(self) -> tuple[Address, float]:
        """One Binding transaction: the server-reflexive address and the RTT in seconds."""
        start = time.perf_counter()
        request = self.session.binding()
        await self.complete(request)
        rtt = time.perf_counter() - start
        assert request.mapped is not None
        return request.mapped, rtt

    def close(self) -> None:
        self.closed_reason = self.closed_reason or "the client is closed"
        if self._transport is not None:
            self._transport.close()
        self._fail_all(ConnectError("the client is closed"))

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class TurnClient(StunClient):
    """A TURN client (RFC 8656) with long-term authentication.

    Handles the 401 -> REALM/NONCE -> authenticated retry and one 438 stale-nonce retry
    per request. Peer data (Data indications and ChannelData) goes to ``on_data``.
    """

    @classmethod
    async def connect(  # type: ignore[override]
        cls,
        server: Address,
        transport: str = "udp",
        *,
        credentials: Credentials,
        local: Address | None = None,
        policy: RetransmitPolicy | None = None,
        timeout: float = 5.0,
    ) -> TurnClient:
        self: TurnClient = await super().connect(
            server, transport, local=local, policy=policy, timeout=timeout
        )
        self.auth.credentials = credentials
        return self

    @property
    def allocation(self) -> Allocation | None:
        return self.session.allocation

    @allocation.setter
    def allocation(self, allocation: Allocation | None) -> None:
        self.session.allocation = allocation

    @property
    def channels(self) -> dict[int, Address]:
        return self.session.channels

    @property
    def peer_channels(self) -> dict[Address, int]:
        return self.session.peer_channels

    async def auth_request(self, request: Message) -> Message:
        """Send ``request`` with long-term credentials, learning REALM/NONCE as needed."""
        return await self.complete(self.session.start(request))

    # -- TURN operations --------------------------------------------------------------------

    async def allocate(
        self,
        lifetime: int | None = None,
        *,
        even_port: bool | None = None,
        dont_fragment: bool = False,
        family: int | None = None,
        reservation_token: bytes | None = None,
    ) -> Allocation:
        await self.complete(self.session.allocate(
            lifetime, even_port=even_port, dont_fragment=dont_fragment, family=family,
            reservation_token=reservation_token))
        assert self.session.allocation is not None
        return self.session.allocation

    async def refresh(self, lifetime: int | None = None) -> int:
        """Refresh the allocation; ``lifetime=0`` releases it. Returns the granted lifetime."""
        request = self.session.refresh(lifetime)
        await self.complete(request)
        assert request.lifetime is not None
        return request.lifetime

    async def release(self) -> None:
        """Delete the allocation (Refresh with LIFETIME 0)."""
        await self.refresh(0)

    async def create_permission(self, peer: Address) -> None:
        await self.complete(self.session.create_permission(peer))

    async def channel_bind(self, peer: Address, channel: int | None = None) -> int:
        """Bind (or refresh) a channel to ``peer``; also installs a permission."""
        request = self.session.channel_bind(peer, channel)
        await self.complete(request)
        assert request.channel is not None
        return request.channel

    def send_indication(self, peer: Address, data: bytes) -> None:
        """Send ``data`` to ``peer`` through the relay in a Send indication."""
        self.send_raw(self.session.send_indication(peer, data))

    def send_channel(self, channel: int, data: bytes) -> None:
        self.send_raw(self.session.channel_data(channel, data))

    def send_to(self, peer: Address, data: bytes) -> None:
        """ChannelData when a channel is bound to ``peer``, else a Send indication."""
        self.send_raw(self.session.data_to(peer, data))

    async def aclose(self) -> None:
        """Release the allocation if there is one (best effort), then close."""
        if self.allocation is not None:
            with contextlib.suppress(StunErrorResponse, TransactionTimeout, TurnstormError):
                await asyncio.wait_for(self.release(), 5.0)
        self.close()

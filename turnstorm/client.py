"""asyncio STUN/TURN client sessions over UDP and TCP.

A thin I/O shell around :mod:`turnstorm.proto`: the codec builds and parses messages, a
:class:`~turnstorm.proto.transaction.ClientTransaction` per request decides when to
retransmit, and this module only moves bytes and arms timers on the loop clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from turnstorm.errors import StunErrorResponse, TurnstormError, error_for
from turnstorm.proto import stun
from turnstorm.proto.auth import LongTermAuth
from turnstorm.proto.credentials import Credentials
from turnstorm.proto.stun import Address, Class, Message, Method
from turnstorm.proto.transaction import ClientTransaction, RetransmitPolicy, TransactionTimeout

DataHandler = Callable[[Address, bytes], None]

METHOD_NAMES = {
    Method.BINDING: "Binding",
    Method.ALLOCATE: "Allocate",
    Method.REFRESH: "Refresh",
    Method.CREATE_PERMISSION: "CreatePermission",
    Method.CHANNEL_BIND: "ChannelBind",
}


class ConnectError(TurnstormError):
    """The server cannot be reached at all."""


@dataclass
class _Pending:
    transaction: ClientTransaction
    data: bytes
    future: asyncio.Future[Message]
    timer: asyncio.TimerHandle | None = None


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
    """One local socket (UDP or TCP) talking to one STUN/TURN server."""

    def __init__(self, server: Address, transport: str, policy: RetransmitPolicy | None) -> None:
        self.server = server
        self.transport_name = transport
        self.reliable = transport == "tcp"
        self.policy = policy or RetransmitPolicy()
        self.software: str | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._pending: dict[bytes, _Pending] = {}
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
        if stun.is_channel_data(data):
            self._channel_data_received(data)
            return
        try:
            message = stun.parse(data)
        except stun.StunParseError as exc:
            self.received_errors.append(exc)
            return
        if message.message_class in (Class.RESPONSE, Class.ERROR):
            pending = self._pending.pop(message.transaction_id, None)
            if pending is not None:
                pending.transaction.on_response()
                if pending.timer is not None:
                    pending.timer.cancel()
                if not pending.future.done():
                    pending.future.set_result(message)
        elif message.message_class == Class.INDICATION:
            self._indication_received(message)

    def _channel_data_received(self, data: bytes) -> None:
        """Overridden by TURN clients."""

    def _indication_received(self, message: Message) -> None:
        if self.on_indication is not None:
            self.on_indication(message)

    def _socket_error(self, exc: Exception) -> None:
        # ICMP port unreachable on a connected UDP socket: nobody listens there.
        self._fail_all(ConnectError(
            f"cannot reach {self.transport_name.upper()} {self.server[0]}:{self.server[1]}: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ))

    def _fail_all(self, exc: Exception) -> None:
        for pending in list(self._pending.values()):
            if pending.timer is not None:
                pending.timer.cancel()
            if not pending.future.done():
                pending.future.set_exception(exc)
        self._pending.clear()

    # -- transactions ----------------------------------------------------------------------

    async def transact(self, request: Message, data: bytes) -> Message:
        """Send ``data`` (the encoded ``request``) with retransmissions; return the response."""
        name = METHOD_NAMES.get(Method(request.method), "request")
        transaction = ClientTransaction(name, reliable=self.reliable, policy=self.policy)
        future: asyncio.Future[Message] = self._loop.create_future()
        pending = _Pending(transaction, data, future)
        self._pending[request.transaction_id] = pending
        transaction.start(self._loop.time())
        try:
            self.send_raw(data)
            self._arm(request.transaction_id, pending)
            return await future
        finally:
            self._pending.pop(request.transaction_id, None)
            if pending.timer is not None:
                pending.timer.cancel()

    def _arm(self, tid: bytes, pending: _Pending) -> None:
        deadline = pending.transaction.deadline
        if deadline is not None:
            pending.timer = self._loop.call_at(deadline, self._on_timer, tid, pending)

    def _on_timer(self, tid: bytes, pending: _Pending) -> None:
        try:
            resend = pending.transaction.on_timer(self._loop.time())
        except TransactionTimeout as exc:
            if not pending.future.done():
                pending.future.set_exception(exc)
            return
        if resend:
            try:
                self.send_raw(pending.data)
            except ConnectError as exc:
                pending.future.set_exception(exc)
                return
        self._arm(tid, pending)

    async def request(
        self, request: Message, key: bytes | None = None, *, fingerprint: bool = True
    ) -> Message:
        response = await self.transact(request, request.encode(key, fingerprint=fingerprint))
        if response.message_class == Class.ERROR:
            code, reason = response.attributes.get("ERROR-CODE", (0, "no ERROR-CODE"))
            raise error_for(METHOD_NAMES.get(Method(request.method), "request"), code, reason)
        return response

    async def binding(self) -> tuple[Address, float]:
        """One Binding transaction: the server-reflexive address and the RTT in seconds."""
        start = time.perf_counter()
        response = await self.request(Message(Method.BINDING, Class.REQUEST))
        rtt = time.perf_counter() - start
        self.software = response.attributes.get("SOFTWARE", self.software)
        mapped = response.attributes.get("XOR-MAPPED-ADDRESS") or response.attributes.get(
            "MAPPED-ADDRESS"
        )
        if mapped is None:
            raise TurnstormError("Binding response has no XOR-MAPPED-ADDRESS")
        return mapped, rtt

    def close(self) -> None:
        self.closed_reason = self.closed_reason or "the client is closed"
        if self._transport is not None:
            self._transport.close()
        self._fail_all(ConnectError("the client is closed"))

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Allocation:
    relayed: Address
    mapped: Address
    lifetime: int


class TurnClient(StunClient):
    """A TURN client (RFC 8656) with long-term authentication.

    Handles the 401 -> REALM/NONCE -> authenticated retry and one 438 stale-nonce retry
    per request. Peer data (Data indications and ChannelData) goes to ``on_data``.
    """

    def __init__(self, server: Address, transport: str, policy: RetransmitPolicy | None) -> None:
        super().__init__(server, transport, policy)
        self.auth = LongTermAuth(None)
        self.allocation: Allocation | None = None
        self.channels: dict[int, Address] = {}
        self.peer_channels: dict[Address, int] = {}
        self._next_channel = stun.CHANNEL_MIN

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

    # -- authenticated requests -------------------------------------------------------------

    async def auth_request(self, request: Message) -> Message:
        """Send ``request`` with long-term credentials, learning REALM/NONCE as needed."""
        method = METHOD_NAMES.get(Method(request.method), "request")
        attempt = self.auth.attempt(method)
        while True:
            key = self.auth.sign(request)
            response = await self.transact(request, request.encode(key, fingerprint=True))
            if response.message_class != Class.ERROR:
                return response
            request = attempt.retry(request, response, signed=key is not None)

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
        attributes: dict[str, Any] = {"REQUESTED-TRANSPORT": stun.UDP_TRANSPORT}
        if lifetime is not None:
            attributes["LIFETIME"] = lifetime
        if even_port is not None:
            attributes["EVEN-PORT"] = even_port
        if dont_fragment:
            attributes["DONT-FRAGMENT"] = None
        if family is not None:
            attributes["REQUESTED-ADDRESS-FAMILY"] = family
        if reservation_token is not None:
            attributes["RESERVATION-TOKEN"] = reservation_token
        response = await self.auth_request(Message(Method.ALLOCATE, Class.REQUEST,
                                                   attributes=attributes))
        for name in ("XOR-RELAYED-ADDRESS", "XOR-MAPPED-ADDRESS", "LIFETIME"):
            if name not in response.attributes:
                raise TurnstormError(f"Allocate response has no {name}")
        self.software = response.attributes.get("SOFTWARE", self.software)
        self.allocation = Allocation(
            relayed=response.attributes["XOR-RELAYED-ADDRESS"],
            mapped=response.attributes["XOR-MAPPED-ADDRESS"],
            lifetime=response.attributes["LIFETIME"],
        )
        return self.allocation

    async def refresh(self, lifetime: int | None = None) -> int:
        """Refresh the allocation; ``lifetime=0`` releases it. Returns the granted lifetime."""
        attributes: dict[str, Any] = {}
        if lifetime is not None:
            attributes["LIFETIME"] = lifetime
        response = await self.auth_request(Message(Method.REFRESH, Class.REQUEST,
                                                   attributes=attributes))
        granted: int = response.attributes.get("LIFETIME", 0 if lifetime == 0 else -1)
        if self.allocation is not None:
            self.allocation.lifetime = granted
        return granted

    async def release(self) -> None:
        """Delete the allocation (Refresh with LIFETIME 0)."""
        await self.refresh(0)
        self.allocation = None

    async def create_permission(self, peer: Address) -> None:
        await self.auth_request(Message(Method.CREATE_PERMISSION, Class.REQUEST,
                                        attributes={"XOR-PEER-ADDRESS": peer}))

    async def channel_bind(self, peer: Address, channel: int | None = None) -> int:
        """Bind (or refresh) a channel to ``peer``; also installs a permission."""
        if channel is None:
            channel = self.peer_channels.get(peer) or self._allocate_channel_number()
        await self.auth_request(Message(Method.CHANNEL_BIND, Class.REQUEST, attributes={
            "CHANNEL-NUMBER": channel, "XOR-PEER-ADDRESS": peer,
        }))
        self.channels[channel] = peer
        self.peer_channels[peer] = channel
        return channel

    def _allocate_channel_number(self) -> int:
        if self._next_channel > stun.CHANNEL_MAX:
            raise TurnstormError("all 4096 channel numbers are in use")
        channel = self._next_channel
        self._next_channel += 1
        return channel

    def send_indication(self, peer: Address, data: bytes) -> None:
        """Send ``data`` to ``peer`` through the relay in a Send indication."""
        message = Message(Method.SEND, Class.INDICATION,
                          attributes={"XOR-PEER-ADDRESS": peer, "DATA": data})
        self.send_raw(message.encode())

    def send_channel(self, channel: int, data: bytes) -> None:
        self.send_raw(stun.encode_channel_data(channel, data, stream=self.reliable))

    def send_to(self, peer: Address, data: bytes) -> None:
        """ChannelData when a channel is bound to ``peer``, else a Send indication."""
        channel = self.peer_channels.get(peer)
        if channel is None:
            self.send_indication(peer, data)
        else:
            self.send_channel(channel, data)

    def _channel_data_received(self, data: bytes) -> None:
        try:
            channel, payload = stun.parse_channel_data(data)
        except stun.StunParseError as exc:
            self.received_errors.append(exc)
            return
        peer = self.channels.get(channel)
        if peer is not None and self.on_data is not None:
            self.on_data(peer, payload)

    def _indication_received(self, message: Message) -> None:
        if message.method == Method.DATA and self.on_data is not None:
            peer = message.attributes.get("XOR-PEER-ADDRESS")
            data = message.attributes.get("DATA")
            if peer is not None and data is not None:
                self.on_data(peer, data)
            return
        super()._indication_received(message)

    async def aclose(self) -> None:
        """Release the allocation if there is one (best effort), then close."""
        if self.allocation is not None:
            with contextlib.suppress(StunErrorResponse, TransactionTimeout, TurnstormError):
                await asyncio.wait_for(self.release(), 5.0)
        self.close()


def parse_host_port(text: str, default_port: int | None = None) -> Address:
    """``HOST:PORT``, ``[V6]:PORT`` or (with a default port) a bare host."""
    host, sep, port_text = text.rpartition(":")
    if text.startswith("[") and "]" in text:
        inside, _, rest = text[1:].partition("]")
        host, port_text, sep = inside, rest.removeprefix(":"), ":" if rest else ""
    elif not sep or ":" in host:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r} needs a port, as HOST:PORT")
        port_text = str(default_port)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: port must be 1-65535")
    return host, int(port_text)

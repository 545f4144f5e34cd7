"""One STUN/TURN client session (RFC 8489, RFC 8656), sans-I/O.

In the manner of aioquic's connection: the session never touches a socket or a clock. A
shell starts requests (:meth:`TurnSession.allocate`, ``refresh``, ``create_permission``,
``channel_bind``, ``binding`` or any :meth:`TurnSession.start`), sends what
:meth:`TurnSession.send` hands it (with the time it sends them), feeds it every datagram
or stream frame that arrives (:meth:`TurnSession.receive` with the arrival time) and
wakes it at :attr:`TurnSession.deadline` (:meth:`TurnSession.timer`, which queues the
retransmissions for the next ``send``). Each request is a :class:`Request` handle that
completes, through the long-term authentication dance (a first 401 teaches REALM and
NONCE, one 438 renews the nonce), with its response or its specific error, and calls
``on_done``.

The asyncio client (:mod:`turnstorm.client`) and the gevent one (``loadgen/wire.py``)
are thin shells around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from turnstorm.errors import TurnstormError, error_for
from turnstorm.proto import stun
from turnstorm.proto.auth import AuthAttempt, LongTermAuth
from turnstorm.proto.credentials import Credentials
from turnstorm.proto.stun import Address, Class, Message, Method
from turnstorm.proto.transaction import ClientTransaction, RetransmitPolicy, TransactionTimeout

METHOD_NAMES = {
    Method.BINDING: "Binding",
    Method.ALLOCATE: "Allocate",
    Method.REFRESH: "Refresh",
    Method.CREATE_PERMISSION: "CreatePermission",
    Method.CHANNEL_BIND: "ChannelBind",
}
"""The name a method's errors and timeouts give it."""


def method_name(method: int) -> str:
    return METHOD_NAMES.get(Method(method), "request")


@dataclass
class Allocation:
    relayed: Address
    mapped: Address
    lifetime: int


@dataclass
class Request:
    """One request through its authentication retries, as the shell sees it."""

    name: str
    message: Message
    """The request as last sent (a retry after 401/438 is a new transaction)."""
    data: bytes
    """``message`` encoded: what to send, and send again on a retransmission."""
    transaction: ClientTransaction
    attempt: AuthAttempt | None
    """The retry decisions of an authenticated request; None for a plain one."""
    signed: bool
    sent_at: float = 0.0
    """When ``data`` was last sent (the ``now`` of :meth:`TurnSession.send`)."""
    on_done: Callable[[Request], None] | None = None
    done: bool = False
    response: Message | None = None
    error: BaseException | None = None
    rtt: float = 0.0
    """Seconds from the last send of the final transaction to its response."""
    lifetime: int | None = None
    """Allocate and Refresh: the lifetime the server granted."""
    channel: int | None = None
    """ChannelBind: the channel number."""
    mapped: Address | None = None
    """Binding: the server-reflexive address."""
    _check: Callable[[Request, Message], None] | None = field(default=None, repr=False)

    def result(self) -> Message:
        """The success response; raises the request's error."""
        if self.error is not None:
            raise self.error
        if self.response is None:
            raise TurnstormError(f"{self.name} has not completed")
        return self.response


@dataclass(frozen=True)
class PeerData:
    """Data from a peer: a Data indication (``channel`` None) or ChannelData."""

    peer: Address
    data: bytes
    channel: int | None


@dataclass(frozen=True)
class Indication:
    """A STUN indication other than Data."""

    message: Message


@dataclass(frozen=True)
class Unparsable:
    """A datagram or frame that is neither STUN nor valid ChannelData."""

    error: stun.StunParseError


Event = PeerData | Indication | Unparsable


class TurnSession:
    """The protocol state of one client: auth, transactions, allocation and channels."""

    def __init__(self, credentials: Credentials | None = None, *, reliable: bool = False,
                 policy: RetransmitPolicy | None = None) -> None:
        self.auth = LongTermAuth(credentials)
        self.reliable = reliable
        """A stream transport (TCP): no retransmissions, ChannelData padded to 4 bytes."""
        self.policy = policy or RetransmitPolicy()
        self.allocation: Allocation | None = None
        self.channels: dict[int, Address] = {}
        self.peer_channels: dict[Address, int] = {}
        self.software: str | None = None
        self.retransmits = 0
        """Requests sent again by the retransmission timer."""
        self.on_response: Callable[[Message], None] | None = None
        """Called with every response a transaction gets, 401s and 438s included."""
        self._requests: dict[bytes, Request] = {}
        self._outbox: list[tuple[Request, bool]] = []
        """What :meth:`send` sends next: (request, first send of its transaction)."""
        self._next_channel = stun.CHANNEL_MIN

    # -- the shell's side ------------------------------------------------------------------

    def send(self, now: float) -> list[bytes]:
        """What to send at ``now``, in order: new requests, authenticated retries and
        retransmissions. A new transaction's retransmission schedule starts at ``now``,
        and every request's RTT is measured from the ``now`` it was last sent at."""
        out, self._outbox = self._outbox, []
        for request, fresh in out:
            if fresh:
                request.transaction.start(now)
            request.sent_at = now
        return [request.data for request, _ in out]

    @property
    def deadline(self) -> float | None:
        """When :meth:`timer` must run next; None with nothing pending."""
        deadlines = [d for r in self._requests.values()
                     if (d := r.transaction.deadline) is not None]
        return min(deadlines, default=None)

    def timer(self, now: float) -> int:
        """Retransmit or time out what is due at ``now``; how many retransmissions
        :meth:`send` now has (each also counted in :attr:`retransmits`)."""
        again = 0
        for request in list(self._requests.values()):
            deadline = request.transaction.deadline
            if deadline is None or now < deadline:
                continue
            try:
                resend = request.transaction.on_timer(now)
            except TransactionTimeout as exc:
                self._finish(request, error=exc)
                continue
            if resend:
                self.retransmits += 1
                self._outbox.append((request, False))
                again += 1
        return again

    def receive(self, data: bytes, now: float) -> Event | None:
        """One datagram or stream frame that arrived at ``now``: responses complete their
        requests (or start the authenticated retry); peer data and other indications
        are returned for the shell to hand on."""
        if stun.is_channel_data(data):
            try:
                channel, payload = stun.parse_channel_data(data)
            except stun.StunParseError as exc:
                return Unparsable(exc)
            peer = self.channels.get(channel)
            return PeerData(peer, payload, channel) if peer is not None else None
        try:
            message = stun.parse(data)
        except stun.StunParseError as exc:
            return Unparsable(exc)
        if message.message_class in (Class.RESPONSE, Class.ERROR):
            request = self._requests.pop(message.transaction_id, None)
            if request is not None:
                self._response(request, message, now)
            return None
        if message.message_class != Class.INDICATION:
            return None
        if message.method == Method.DATA:
            peer = message.attributes.get("XOR-PEER-ADDRESS")
            carried = message.attributes.get("DATA")
            if peer is None or carried is None:
                return None
            return PeerData(peer, carried, None)
        return Indication(message)

    def fail_all(self, error: BaseException) -> None:
        """Complete every pending request with ``error`` (the transport is gone)."""
        for request in list(self._requests.values()):
            self._finish(request, error=error)

    def abandon(self, request: Request) -> None:
        """Forget ``request`` without completing it (its sender gave up on it)."""
        self._requests.pop(request.message.transaction_id, None)
        self._outbox = [entry for entry in self._outbox if entry[0] is not request]

    # -- requests --------------------------------------------------------------------------

    def start(self, message: Message, *, authenticate: bool = True,
              key: bytes | None = None, fingerprint: bool = True,
              check: Callable[[Request, Message], None] | None = None) -> Request:
        """Queue ``message``; with ``authenticate`` it is signed once a nonce is known and
        retried after 401/438, otherwise signed with ``key`` (if any) and an error
        response is its error. ``check`` reads a success response into the request."""
        name = method_name(message.method)
        attempt = self.auth.attempt(name) if authenticate else None
        if authenticate:
            key = self.auth.sign(message)
        request = Request(name, message, message.encode(key, fingerprint=fingerprint),
                          self._transaction(name), attempt, key is not None, _check=check)
        self._submit(request)
        return request

    def binding(self) -> Request:
        return self.start(Message(Method.BINDING, Class.REQUEST), authenticate=False,
                          check=self._binding_done)

    def allocate(self, lifetime: int | None = None, *,
                 even_port: bool | None = None, dont_fragment: bool = False,
                 family: int | None = None, reservation_token: bytes | None = None) -> Request:
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
        return self.start(Message(Method.ALLOCATE, Class.REQUEST, attributes=attributes),
                          check=self._allocated)

    def refresh(self, lifetime: int | None = None) -> Request:
        """Refresh the allocation; ``lifetime=0`` releases it."""
        attributes: dict[str, Any] = {}
        if lifetime is not None:
            attributes["LIFETIME"] = lifetime
        return self.start(Message(Method.REFRESH, Class.REQUEST, attributes=attributes),
                          check=self._refreshed)

    def create_permission(self, peer: Address) -> Request:
        return self.start(Message(Method.CREATE_PERMISSION, Class.REQUEST,
                                  attributes={"XOR-PEER-ADDRESS": peer}))

    def channel_bind(self, peer: Address, channel: int | None = None) -> Request:
        """Bind (or refresh) a channel to ``peer``: the peer's own, or the next free one,
        when ``channel`` is None. Also installs a permission."""
        if channel is None:
            channel = self.peer_channels.get(peer) or self._allocate_channel_number()
        request = self.start(Message(Method.CHANNEL_BIND, Class.REQUEST, attributes={
            "CHANNEL-NUMBER": channel, "XOR-PEER-ADDRESS": peer}), check=self._bound)
        request.channel = channel
        return request

    # -- data ------------------------------------------------------------------------------

    def channel_data(self, channel: int, data: bytes) -> bytes:
        return stun.encode_channel_data(channel, data, stream=self.reliable)

    def send_indication(self, peer: Address, data: bytes) -> bytes:
        return Message(Method.SEND, Class.INDICATION,
                       attributes={"XOR-PEER-ADDRESS": peer, "DATA": data}).encode()

    def data_to(self, peer: Address, data: bytes) -> bytes:
        """ChannelData when a channel is bound to ``peer``, else a Send indication."""
        channel = self.peer_channels.get(peer)
        if channel is None:
            return self.send_indication(peer, data)
        return self.channel_data(channel, data)

    # -- internals -------------------------------------------------------------------------

    def _transaction(self, name: str) -> ClientTransaction:
        return ClientTransaction(name, reliable=self.reliable, policy=self.policy)

    def _submit(self, request: Request) -> None:
        self._requests[request.message.transaction_id] = request
        self._outbox.append((request, True))

    def _response(self, request: Request, response: Message, now: float) -> None:
        request.transaction.on_response()
        request.rtt = now - request.sent_at
        if self.on_response is not None:
            self.on_response(response)
        if response.message_class == Class.ERROR:
            if request.attempt is None:
                code, reason = response.attributes.get("ERROR-CODE", (0, "no ERROR-CODE"))
                self._finish(request, error=error_for(request.name, code, reason))
                return
            try:
                retry = request.attempt.retry(request.message, response, signed=request.signed)
            except TurnstormError as exc:
                self._finish(request, error=exc)
                return
            key = self.auth.sign(retry)
            request.message, request.signed = retry, key is not None
            request.data = retry.encode(key, fingerprint=True)
            request.transaction = self._transaction(request.name)
            self._submit(request)
            return
        try:
            if request._check is not None:
                request._check(request, response)
        except TurnstormError as exc:
            self._finish(request, error=exc)
            return
        self._finish(request, response=response)

    def _finish(self, request: Request, *, response: Message | None = None,
                error: BaseException | None = None) -> None:
        self._requests.pop(request.message.transaction_id, None)
        request.transaction.on_response()
        request.done, request.response, request.error = True, response, error
        if request.on_done is not None:
            request.on_done(request)

    def _binding_done(self, request: Request, response: Message) -> None:
        self.software = response.attributes.get("SOFTWARE", self.software)
        mapped = response.attributes.get("XOR-MAPPED-ADDRESS") or response.attributes.get(
            "MAPPED-ADDRESS")
        if mapped is None:
            raise TurnstormError("Binding response has no XOR-MAPPED-ADDRESS")
        request.mapped = mapped

    def _allocated(self, request: Request, response: Message) -> None:
        for name in ("XOR-RELAYED-ADDRESS", "XOR-MAPPED-ADDRESS", "LIFETIME"):
            if name not in response.attributes:
                raise TurnstormError(f"Allocate response has no {name}")
        self.software = response.attributes.get("SOFTWARE", self.software)
        self.allocation = Allocation(
            relayed=response.attributes["XOR-RELAYED-ADDRESS"],
            mapped=response.attributes["XOR-MAPPED-ADDRESS"],
            lifetime=response.attributes["LIFETIME"],
        )
        request.lifetime = self.allocation.lifetime

    def _refreshed(self, request: Request, response: Message) -> None:
        asked = request.message.attributes.get("LIFETIME")
        granted: int = response.attributes.get("LIFETIME", 0 if asked == 0 else -1)
        request.lifetime = granted
        if self.allocation is not None:
            self.allocation.lifetime = granted
        if asked == 0:
            self.allocation = None

    def _bound(self, request: Request, response: Message) -> None:
        assert request.channel is not None
        peer = request.message.attributes["XOR-PEER-ADDRESS"]
        self.channels[request.channel] = peer
        self.peer_channels[peer] = request.channel

    def _allocate_channel_number(self) -> int:
        if self._next_channel > stun.CHANNEL_MAX:
            raise TurnstormError("all 4096 channel numbers are in use")
        channel = self._next_channel
        self._next_channel += 1
        return channel

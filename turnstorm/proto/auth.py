"""Long-term credential state for a client (RFC 8489 section 9.2), sans-I/O.

One :class:`LongTermAuth` per client holds what the server taught it (REALM, NONCE and
the derived key) and signs requests; an :class:`AuthAttempt` per request decides, from
each error response, whether to retry with a fresh nonce (a first 401, one 438 stale
nonce) or to fail with the specific error. The asyncio and gevent clients share it.
"""

from __future__ import annotations

from dataclasses import dataclass

from turnstorm.errors import StunErrorResponse, TurnstormError, Unauthorized, error_for
from turnstorm.proto.credentials import Credentials
from turnstorm.proto.stun import Class, Message

_AUTH_ATTRIBUTES = ("USERNAME", "REALM", "NONCE")


@dataclass
class LongTermAuth:
    credentials: Credentials | None
    realm: str | None = None
    nonce: bytes | None = None
    key: bytes | None = None

    def sign(self, request: Message) -> bytes | None:
        """Add USERNAME/REALM/NONCE once a nonce is known; the key to sign with, or None."""
        if self.key is None or self.credentials is None:
            return None
        request.attributes["USERNAME"] = self.credentials.username
        request.attributes["REALM"] = self.realm
        request.attributes["NONCE"] = self.nonce
        return self.key

    def learn(self, response: Message) -> None:
        """Take REALM and NONCE from a 401 or 438 response."""
        if self.credentials is None:
            raise TurnstormError("the server requires credentials and none were given")
        self.nonce = response.attributes["NONCE"]
        realm = response.attributes.get("REALM", self.realm)
        if realm is None:
            raise TurnstormError("the server's 401 response has no REALM")
        self.realm = realm
        self.key = self.credentials.key(realm)

    def attempt(self, method: str) -> AuthAttempt:
        return AuthAttempt(self, method)


class AuthAttempt:
    """The retry decisions of one request."""

    def __init__(self, auth: LongTermAuth, method: str) -> None:
        self.auth = auth
        self.method = method
        self.challenged = False
        self.stale = False

    def retry(self, request: Message, response: Message, *, signed: bool) -> Message:
        """The request to send again after the error ``response``, or raise the error."""
        code, reason = response.attributes.get("ERROR-CODE", (0, "no ERROR-CODE"))
        if code not in (401, 438) or "NONCE" not in response.attributes:
            raise error_for(self.method, code, reason)
        if code == 401 and (self.challenged or signed):
            raise Unauthorized(self.method, code, reason.strip())
        if code == 438 and self.stale:
            raise error_for(self.method, code, reason)
        self.challenged = self.challenged or code == 401
        self.stale = self.stale or code == 438
        self.auth.learn(response)
        return Message(request.method, Class.REQUEST, attributes={
            k: v for k, v in request.attributes.items() if k not in _AUTH_ATTRIBUTES})


__all__ = ["AuthAttempt", "LongTermAuth", "StunErrorResponse"]

"""Long-term credentials (RFC 8489 section 9.2) and TURN REST API ephemeral credentials.

The REST scheme is coturn's ``use-auth-secret``: the username is ``expiry:user`` (a UNIX
time after which the server refuses it) and the password is the base64 HMAC-SHA1 of the
username under the shared secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """The MD5 key of RFC 8489 section 9.2.2 (SASLprep is the identity for ASCII)."""
    return hashlib.md5(  # noqa: S324 - the algorithm the RFC mandates for this key
        f"{username}:{realm}:{password}".encode()
    ).digest()


def rest_password(secret: str, username: str) -> str:
    mac = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode("ascii")


@dataclass(frozen=True)
class Credentials:
    """A username and password for long-term authentication."""

    username: str
    password: str

    @classmethod
    def ephemeral(cls, secret: str, user: str, now: float, ttl: float = 86400.0) -> Credentials:
        """TURN REST credentials valid until ``now + ttl`` (``now`` is UNIX time)."""
        if ttl <= 0:
            raise ValueError("credential lifetime must be positive")
        username = f"{int(now + ttl)}:{user}"
        return cls(username, rest_password(secret, username))

    def key(self, realm: str) -> bytes:
        return long_term_key(self.username, realm, self.password)

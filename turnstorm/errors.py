"""Errors a user sees: each has one exact, human message."""

from __future__ import annotations


class TurnstormError(Exception):
    """Base class: the CLI prints ``str(error)`` on one line and exits non-zero."""


class StunErrorResponse(TurnstormError):
    """The server answered a request with an error response."""

    code = 0
    explanation = "the server refused the request"

    def __init__(self, method: str, code: int, reason: str) -> None:
        self.method = method
        self.code = code
        self.reason = reason
        phrase = reason or _PHRASES.get(code, "error")
        super().__init__(f"{method} failed: {code} {phrase} ({self.explanation})")


class BadRequest(StunErrorResponse):
    explanation = "the server could not parse the request"


class Unauthorized(StunErrorResponse):
    explanation = "wrong username, password or shared secret"


class Forbidden(StunErrorResponse):
    explanation = "the relay's security policy refused it, e.g. a denied peer address"


class AllocationMismatch(StunErrorResponse):
    explanation = "no allocation for this 5-tuple, or one already exists"


class StaleNonce(StunErrorResponse):
    explanation = "the nonce expired and the retry with a fresh one failed too"


class WrongCredentials(StunErrorResponse):
    explanation = "the credentials differ from the ones that created the allocation"


class UnsupportedTransport(StunErrorResponse):
    explanation = "the relay does not support the requested transport"


class AllocationQuotaReached(StunErrorResponse):
    explanation = "the relay's per-user or total allocation quota is exhausted"


class InsufficientCapacity(StunErrorResponse):
    explanation = "the relay has no free relay ports or bandwidth"


class UnknownAttribute(StunErrorResponse):
    explanation = "the server does not understand a required attribute"


class ServerError(StunErrorResponse):
    explanation = "the server failed to process the request"


_PHRASES = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    486: "Allocation Quota Reached",
    500: "Server Error",
    508: "Insufficient Capacity",
}

ERRORS_BY_CODE: dict[int, type[StunErrorResponse]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    420: UnknownAttribute,
    437: AllocationMismatch,
    438: StaleNonce,
    441: WrongCredentials,
    442: UnsupportedTransport,
    486: AllocationQuotaReached,
    500: ServerError,
    508: InsufficientCapacity,
}


def error_for(method: str, code: int, reason: str) -> StunErrorResponse:
    cls = ERRORS_BY_CODE.get(code, StunErrorResponse)
    return cls(method, code, reason.strip(" \t\r\n\x00"))

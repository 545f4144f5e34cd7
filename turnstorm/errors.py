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


_CODES: dict[int, tuple[str, type[StunErrorResponse]]] = {
    300: ("Try Alternate", StunErrorResponse),
    400: ("Bad Request", BadRequest),
    401: ("Unauthorized", Unauthorized),
    403: ("Forbidden", Forbidden),
    420: ("Unknown Attribute", UnknownAttribute),
    437: ("Allocation Mismatch", AllocationMismatch),
    438: ("Stale Nonce", StaleNonce),
    440: ("Address Family not Supported", StunErrorResponse),
    441: ("Wrong Credentials", WrongCredentials),
    442: ("Unsupported Transport Protocol", UnsupportedTransport),
    443: ("Peer Address Family Mismatch", StunErrorResponse),
    486: ("Allocation Quota Reached", AllocationQuotaReached),
    500: ("Server Error", ServerError),
    508: ("Insufficient Capacity", InsufficientCapacity),
}
"""Per error code: its RFC reason phrase (when the server sends none) and its error."""

_PHRASES = {code: phrase for code, (phrase, _) in _CODES.items()}
ERRORS_BY_CODE: dict[int, type[StunErrorResponse]] = {
    code: cls for code, (_, cls) in _CODES.items() if cls is not StunErrorResponse}


def error_for(method: str, code: int, reason: str) -> StunErrorResponse:
    cls = ERRORS_BY_CODE.get(code, StunErrorResponse)
    return cls(method, code, reason.strip(" \t\r\n\x00"))

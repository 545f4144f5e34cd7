"""Client transactions with RFC 8489 section 6.2.1 retransmission, driven by an explicit clock.

Over UDP a request is sent at 0, RTO, 3 RTO, 7 RTO ... (the interval doubles), Rc times
in all, and the transaction fails Rm * RTO after the last send. With the defaults
(RTO 500 ms, Rc 7, Rm 16): sends at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s, timeout at
39.5 s. Over TCP there is no retransmission and the timeout is Ti = 39.5 s.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_RTO = 0.5
DEFAULT_RC = 7
DEFAULT_RM = 16
DEFAULT_TI = 39.5


class TransactionTimeout(Exception):
    """No response arrived within the retransmission schedule."""

    def __init__(self, method: str, attempts: int, elapsed: float) -> None:
        super().__init__(
            f"STUN {method} transaction timed out after {attempts} attempt"
            f"{'s' if attempts != 1 else ''} in {elapsed:g} s"
        )
        self.attempts = attempts
        self.elapsed = elapsed


@dataclass
class RetransmitPolicy:
    """How a client retransmits one request."""

    rto: float = DEFAULT_RTO
    """Initial retransmission timeout, seconds (RFC 8489: 500 ms recommended)."""
    rc: int = DEFAULT_RC
    """Total sends over UDP, the first included."""
    rm: int = DEFAULT_RM
    """After the last send, wait ``rm * rto`` before giving up."""
    ti: float = DEFAULT_TI
    """Timeout over reliable transports, seconds."""
    backoff: bool = True
    """Double the interval after each send. False models a non-compliant client that
    retransmits every RTO (used by the retransmission-amplification storm)."""

    def __post_init__(self) -> None:
        if self.rto <= 0 or self.rc < 1 or self.rm < 1 or self.ti <= 0:
            raise ValueError("retransmission policy needs rto > 0, rc >= 1, rm >= 1, ti > 0")


class ClientTransaction:
    """The timer side of one request: when to (re)send and when to give up.

    ``start(now)`` returns True (send now). Then call ``deadline`` for the next wake-up
    and ``on_timer(now)``, which returns True when the request must be sent again and
    raises :class:`TransactionTimeout` when the transaction has failed.
    """

    def __init__(
        self,
        method: str = "request",
        *,
        reliable: bool = False,
        policy: RetransmitPolicy | None = None,
    ) -> None:
        self.method = method
        self.reliable = reliable
        self.policy = policy or RetransmitPolicy()
        self.attempts = 0
        self.started_at = 0.0
        self.done = False
        self._interval = self.policy.rto
        self._deadline: float | None = None

    @property
    def deadline(self) -> float | None:
        return None if self.done else self._deadline

    def start(self, now: float) -> bool:
        self.started_at = now
        self.attempts = 1
        if self.reliable:
            self._deadline = now + self.policy.ti
        elif self.policy.rc == 1:
            self._deadline = now + self.policy.rm * self.policy.rto
        else:
            self._deadline = now + self._interval
        return True

    def on_timer(self, now: float) -> bool:
        if self.done or self._deadline is None or now < self._deadline:
            return False
        policy = self.policy
        if self.reliable or self.attempts >= policy.rc:
            self.done = True
            raise TransactionTimeout(self.method, self.attempts, round(now - self.started_at, 6))
        self.attempts += 1
        if policy.backoff:
            self._interval *= 2
        if self.attempts >= policy.rc:
            self._deadline = self._deadline + policy.rm * policy.rto
        else:
            self._deadline = self._deadline + self._interval
        return True

    def on_response(self) -> None:
        self.done = True

"""A blocking client for coturn's telnet admin CLI and parsers of what it prints.

``pc`` gives ``total-current-allocs``, ``pu`` the sessions per user, ``ps`` the usage of
each listed session (at most ``cli-max-output-sessions``, 256 by default).
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from turnstorm.errors import TurnstormError

PROMPT = b"> "
PASSWORD_PROMPT = b"Enter password:"


class CoturnCliError(TurnstormError):
    """The coturn CLI cannot be reached, refused the password or answered nonsense."""



@dataclass
class SessionUsage:
    """Usage of the sessions ``ps`` listed."""

    listed: int = 0
    """Sessions in the listing."""
    total: int = 0
    """``Total sessions`` line (all sessions, listed or not)."""
    received_packets: int = 0
    received_bytes: int = 0
    sent_packets: int = 0
    sent_bytes: int = 0
    per_session: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    """session id -> (rp, rb, sp, sb)."""

    @property
    def truncated(self) -> bool:
        """``ps`` stops at ``cli-max-output-sessions`` (256 by default)."""
        return self.listed < self.total


_ALLOCS = re.compile(r"^\s*total-current-allocs:\s*(\d+)\s*$", re.M)
_USER = re.compile(r"^\s*user:\s*<(.*)>,\s*(\d+)\s+sessions?\s*$", re.M)
_TOTAL_SESSIONS = re.compile(r"^\s*Total sessions:\s*(\d+)\s*$", re.M)
_SESSION = re.compile(r"^\s*\d+\)\s*id=(\S+?),", re.M)
_USAGE = re.compile(r"^\s*usage:\s*rp=(\d+),\s*rb=(\d+),\s*sp=(\d+),\s*sb=(\d+)", re.M)


def parse_total_allocations(text: str) -> int:
    """``total-current-allocs`` from ``pc`` output."""
    match = _ALLOCS.search(text)
    if match is None:
        raise CoturnCliError("coturn CLI 'pc' output has no total-current-allocs line")
    return int(match.group(1))


def parse_users(text: str) -> tuple[dict[str, int], int]:
    """(sessions per username, total sessions) from ``pu`` output."""
    users: dict[str, int] = {}
    for name, count in _USER.findall(text):
        users[name] = users.get(name, 0) + int(count)
    total = _TOTAL_SESSIONS.search(text)
    if total is None:
        raise CoturnCliError("coturn CLI 'pu' output has no 'Total sessions' line")
    return users, int(total.group(1))


def parse_sessions(text: str) -> SessionUsage:
    """Per-session usage from ``ps`` output (blocks of ``N) id=...`` and ``usage:``)."""
    total = _TOTAL_SESSIONS.search(text)
    if total is None:
        raise CoturnCliError("coturn CLI 'ps' output has no 'Total sessions' line")
    usage = SessionUsage(total=int(total.group(1)))
    starts = list(_SESSION.finditer(text))
    for index, start in enumerate(starts):
        end = starts[index + 1].start() if index + 1 < len(starts) else len(text)
        block = text[start.end():end]
        usage.listed += 1
        found = _USAGE.search(block)
        if found is None:
            continue
        rp, rb, sp, sb = (int(v) for v in found.groups())
        usage.per_session[start.group(1)] = (rp, rb, sp, sb)
        usage.received_packets += rp
        usage.received_bytes += rb
        usage.sent_packets += sp
        usage.sent_bytes += sb
    return usage


class CoturnCli:
    """A blocking client for coturn's telnet admin CLI (one connection, reused).

    ``command()`` reconnects once when the connection was lost between calls. Not
    thread-safe: callers serialize (the collector holds a lock).
    """

    def __init__(self, host: str, port: int, password: str, timeout: float = 3.0) -> None:
        self.host = host
        self.port = port
        self.password = password
        self.timeout = timeout
        self._sock: socket.socket | None = None

    @property
    def where(self) -> str:
        return f"coturn CLI {self.host}:{self.port}"

    def _read_until(self, sock: socket.socket, done: Callable[[bytes], bool],
                    what: str) -> bytes:
        buffer = b""
        deadline = time.monotonic() + self.timeout
        while not done(buffer):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CoturnCliError(f"{self.where}: no {what} within {self.timeout:g} s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise CoturnCliError(
                    f"{self.where}: no {what} within {self.timeout:g} s") from None
            except OSError as exc:
                raise CoturnCliError(f"{self.where}: {exc.strerror or exc}") from None
            if not chunk:
                raise CoturnCliError(f"{self.where}: connection closed while waiting for "
                                     f"{what}")
            buffer += chunk
        return buffer

    @staticmethod
    def _at_prompt(buffer: bytes) -> bool:
        return buffer == PROMPT or buffer.endswith(b"\n" + PROMPT)

    def connect(self) -> None:
        self.close()
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except ConnectionRefusedError:
            raise CoturnCliError(f"{self.where}: connection refused (is coturn running "
                                 f"with cli-port={self.port} and without no-cli?)") from None
        except OSError as exc:
            raise CoturnCliError(f"{self.where}: {exc.strerror or exc}") from None
        try:
            greeting = self._read_until(
                sock, lambda b: PASSWORD_PROMPT in b or self._at_prompt(b), "greeting")
            if PASSWORD_PROMPT in greeting:
                sock.sendall(self.password.encode() + b"\r\n")
                answer = self._read_until(
                    sock, lambda b: PASSWORD_PROMPT in b or self._at_prompt(b),
                    "answer to the password")
                if PASSWORD_PROMPT in answer:
                    raise CoturnCliError(f"{self.where}: wrong CLI password")
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def command(self, line: str) -> str:
        """Run one CLI command; its output without the trailing prompt."""
        if "\n" in line or "\r" in line:
            raise ValueError("a CLI command is one line")
        for attempt in (1, 2):
            if self._sock is None:
                self.connect()
            assert self._sock is not None
            try:
                self._sock.sendall(line.encode() + b"\r\n")
                out = self._read_until(self._sock, self._at_prompt, f"answer to {line!r}")
            except (CoturnCliError, OSError):
                self.close()
                if attempt == 2:
                    raise
                continue
            return out[: -len(PROMPT)].decode("utf8", errors="replace").replace("\r\n", "\n")
        raise AssertionError("unreachable")  # pragma: no cover

    def total_allocations(self) -> int:
        return parse_total_allocations(self.command("pc"))

    def sessions_per_user(self) -> tuple[dict[str, int], int]:
        """(sessions per username, total sessions), from ``pu``."""
        return parse_users(self.command("pu"))

    def session_usage(self) -> SessionUsage:
        """Summed usage over ``ps`` (at most cli-max-output-sessions sessions)."""
        return parse_sessions(self.command("ps"))

    def add_alternate_server(self, address: str) -> None:
        """``aas``: new Allocate requests get 300 Try Alternate to ``address``."""
        self.command(f"aas {address}")

    def delete_alternate_server(self, address: str) -> None:
        self.command(f"das {address}")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def __enter__(self) -> CoturnCli:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

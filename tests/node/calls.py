"""Calls that count what happens to them: each allocates through one address (a
Service, a NodePort, a pod IP), sends a ChannelData frame every ``frame_interval`` to the
echo peer and counts the echoes, and refreshes its allocation every ``refresh_every``
seconds, recording each answer (a 437 is an allocation its relay no longer holds).

They run on an asyncio loop in a thread of their own, so a test can change the cluster
(relabel, delete, kill) while they run, and read per-call figures afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from turnstorm.client import TurnClient, parse_host_port
from turnstorm.errors import StunErrorResponse, TurnstormError
from turnstorm.proto.credentials import Credentials
from turnstorm.proto.stun import Address
from turnstorm.proto.transaction import TransactionTimeout


@dataclass
class CallRecord:
    """One call's figures."""

    index: int
    relayed: str = ""
    """The relayed address: its IP is the relay pod's."""
    sent: int = 0
    echoed: int = 0
    echoed_after: dict[str, int] = field(default_factory=dict)
    """Echoes counted since each mark (``Calls.mark``)."""
    sent_after: dict[str, int] = field(default_factory=dict)
    refreshes: list[int | str] = field(default_factory=list)
    """0 for a refresh that succeeded, else the error code (or ``timeout``)."""
    released: bool = False
    error: str = ""

    @property
    def relay_ip(self) -> str:
        return self.relayed.rsplit(":", 1)[0]

    def lost_after(self, mark: str) -> int:
        return self.sent_after.get(mark, 0) - self.echoed_after.get(mark, 0)

    @property
    def cut(self) -> bool:
        """Its relay lost it: a refresh failed, or it could not be released."""
        return any(r != 0 for r in self.refreshes) or not self.released


class Calls:
    """``count`` calls to ``server`` through a TURN relay, to ``peer``."""

    def __init__(self, server: str, secret_file: Path, peer: str, count: int, *,
                 frame_interval: float = 0.05, refresh_every: float = 2.0) -> None:
        self.server = parse_host_port(server)
        self.secret = secret_file.read_text().strip()
        self.peer: Address = parse_host_port(peer)
        self.records = [CallRecord(i) for i in range(count)]
        self.frame_interval = frame_interval
        self.refresh_every = refresh_every
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ended: dict[int, asyncio.Event] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = threading.Event()
        self._marks: list[str] = []

    # -- control from the test's thread ------------------------------------------------
    def start(self, timeout: float = 30.0) -> Calls:
        self._thread.start()
        if not self._started.wait(timeout):
            raise AssertionError("the calls did not all allocate within "
                                 f"{timeout:g} s: {[r.error for r in self.records]}")
        failed = [r for r in self.records if r.error]
        if failed:
            raise AssertionError(f"calls failed to start: {[r.error for r in failed]}")
        return self

    def mark(self, name: str) -> None:
        """Count sends and echoes from now on under ``name``."""
        self._loop.call_soon_threadsafe(self._marks.append, name)
        time.sleep(0.05)

    def end(self, indexes: list[int]) -> None:
        """Release these calls (a normal hang-up)."""
        for index in indexes:
            self._loop.call_soon_threadsafe(self._ended[index].set)

    def wait_ended(self, timeout: float = 30.0) -> None:
        """Until every call has hung up (after ``end`` of all of them)."""
        self._thread.join(timeout)

    def stop(self, timeout: float = 30.0) -> list[CallRecord]:
        if self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile: every call ended
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        return self.records

    def on_relay(self, ip: str) -> list[CallRecord]:
        return [r for r in self.records if r.relay_ip == ip]

    # -- the loop ----------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._ended = {r.index: asyncio.Event() for r in self.records}
        clients = await asyncio.gather(*(self._open(r) for r in self.records))
        self._started.set()
        await asyncio.gather(*(self._call(r, c) for r, c in zip(self.records, clients,
                                                                 strict=True) if c))

    async def _open(self, record: CallRecord) -> TurnClient | None:
        credentials = Credentials.ephemeral(self.secret, f"call-{record.index}", time.time())
        try:
            client = await TurnClient.connect(self.server, "udp", credentials=credentials)
            allocation = await client.allocate(600)
            await client.channel_bind(self.peer)
        except (TurnstormError, TransactionTimeout, OSError) as exc:
            record.error = str(exc)
            return None
        record.relayed = f"{allocation.relayed[0]}:{allocation.relayed[1]}"

        def echoed(_peer: Address, _data: bytes) -> None:
            record.echoed += 1
            for mark in self._marks:
                record.echoed_after[mark] = record.echoed_after.get(mark, 0) + 1

        client.on_data = echoed
        return client

    async def _call(self, record: CallRecord, client: TurnClient) -> None:
        assert self._stop is not None
        ended = self._ended[record.index]
        next_refresh = time.monotonic() + self.refresh_every
        try:
            while not (self._stop.is_set() or ended.is_set()):
                client.send_to(self.peer, b"frame %d" % record.sent)
                record.sent += 1
                for mark in self._marks:
                    record.sent_after[mark] = record.sent_after.get(mark, 0) + 1
                if time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + self.refresh_every
                    record.refreshes.append(await self._refresh(client))
                await asyncio.sleep(self.frame_interval)
            await asyncio.sleep(0.3)  # the last echoes
            await asyncio.wait_for(client.release(), 5)
            record.released = True
        except (StunErrorResponse, TransactionTimeout, TurnstormError, OSError,
                TimeoutError) as exc:
            record.error = record.error or str(exc)
        finally:
            client.close()

    @staticmethod
    async def _refresh(client: TurnClient) -> int | str:
        try:
            await asyncio.wait_for(client.refresh(600), 5)
        except StunErrorResponse as exc:
            return exc.code
        except (TransactionTimeout, TimeoutError):
            return "timeout"
        return 0


@contextlib.contextmanager
def running_calls(server: str, secret_file: Path, peer: str, count: int,
                  **options: float) -> Iterator[Calls]:
    calls = Calls(server, secret_file, peer, count, **options).start()
    try:
        yield calls
    finally:
        calls.stop()

"""Paced media for many calls from one greenlet: a timer wheel, not a greenlet per packet.

Every call of a process registers its connected UDP socket and channel with the process's
:class:`MediaPump`. Frames are due on a grid of ``TICK``-wide slots (2 ms). The pump
wakes ``LEAD`` (0.2 ms) before the next slot with frames is due, sends every frame due
before ``now + LEAD`` with one ``os.write`` per datagram on the socket's descriptor (no
greenlet switch, no gevent wrapper), and schedules the frame after it on a wheel of
``tick``-wide slots. A frame's send-timing error ``|sent - scheduled|`` (up to ``LEAD``
early, or late by the wake-up latency plus its place in the batch) is recorded in the
``send_lag`` histogram. The process-wide ``--max-pps`` limiter is charged once per batch.

The hub's timers cannot wake the pump that precisely: libev (and libuv) wait in
``epoll_wait``, whose timeout is whole milliseconds, so a 0.4 ms sleep returns about
0.7 ms late. The pump therefore waits through the hub only for the part of a wait beyond
``COARSE`` (2 ms); after yielding once to the hub (its ready greenlets and I/O run) it
waits out the rest (under ``COARSE``) in a real ``select()``, which takes a microsecond
timeout. Other greenlets of the process are held back by at most that rest.

A frame is ``seq (4 bytes) + send time (8 bytes, the generator's clock)`` padded to
``frame_bytes``. While a flow lasts, the pump also reads its socket (when given the
client, ``receiver``): after each wake-up's sends it polls one epoll set of every flow's
socket and reads one datagram from each ready one, checking for frames falling due
every few sockets. An echo then costs no hub wake-up or watcher callback of its own, and
reading never holds a frame back by more than a few datagrams. Each datagram keeps its
kernel arrival stamp, so the RTT does not depend on when it is read. Control responses on
those sockets (refreshes during the call) are dispatched by the same read. A client
with an ``on_echo`` consumer gets each echoed frame unpacked in one go (see
:class:`~turnstorm.loadgen.wire.UdpClient`).
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gevent
from gevent import monkey
from gevent.event import Event

from turnstorm.loadgen.metrics import Histogram
from turnstorm.loadgen.wire import CHANNEL_HEADER, clock

TICK = 0.002
"""Seconds between the slots frames are scheduled on (one pump wake-up per slot; it
divides the 20 ms frame interval). Coarser slots mean larger batches: fewer wake-ups of
the pump, and of the relay's threads by each batch, against a longer batch to send."""
LEAD = 0.0002
"""The pump wakes this long before a slot is due, and sends the frames due less than this
far ahead (seconds): the wake-up latency then centres the timing error on zero."""
COARSE = 0.002
"""Waits longer than this (seconds) go through the hub's timers, in whole milliseconds,
until this much is left; the rest is a precise ``select()`` timeout."""
_select = monkey.get_original("select", "select")
READS_BETWEEN_SENDS = 8
"""Sockets read between two checks for frames falling due."""
MAX_CATCH_UP = 10
"""A call more than this many frames behind (overload) skips ahead instead of bursting."""


@dataclass(eq=False)
class MediaFlow:
    """One call's outgoing stream."""

    fd: int
    channel: int
    interval: float
    frame_bytes: int
    next_due: float
    sent: int = 0
    send_errors: int = 0
    """Frames the kernel refused (a full send buffer: generator-induced loss)."""
    frame: bytearray = field(init=False, default_factory=bytearray)
    """The datagram, rewritten in place for each frame (ChannelData header + payload)."""
    receiver: Any = None
    """The client whose socket the pump reads while the flow lasts (or None)."""

    def __post_init__(self) -> None:
        self.frame = bytearray(4 + self.frame_bytes)


class MediaPump:
    """The process-wide sender of paced media (start it with :meth:`start`)."""

    def __init__(self, state: Any, tick: float = TICK) -> None:
        self.state = state
        """Where ``send_lag`` (a :class:`Histogram`, replaced on each worker report) and
        ``limiter`` (or None) are found."""
        self.tick = tick
        self.wheel: dict[int, list[MediaFlow]] = {}
        self.flows = 0
        self._added = 0
        self.sent = 0
        self.send_errors = 0
        self._greenlet: Any = None
        self._current = 0
        """The next wheel slot to send."""
        self._readers: dict[int, Callable[[float], bool]] = {}
        self._planned: int | None = None
        """The slot the pump is waiting for (None while it works)."""
        self._wake = Event()
        self._owners: dict[int, MediaFlow] = {}
        """fd -> the flow whose reader it is (a later flow on the socket takes it over)."""
        self._poll: Any = _epoll()

    def add(self, sock: Any, channel: int, interval: float, frame_bytes: int,
            receiver: Any = None) -> MediaFlow:
        """Start sending on ``sock`` (connected to the relay) through ``channel``.

        With ``receiver`` (the :class:`~turnstorm.loadgen.wire.UdpClient` owning ``sock``)
        the pump also reads the socket while the flow lasts, between its sends, instead
        of the hub's read watcher: echoes cost no wake-up of their own and never delay a
        send by more than one batch of reads."""
        # spread the flows' phases over the interval: even batches, not one burst
        phases = max(1, round(interval / self.tick))
        # never a slot the running pump has passed already (it sends up to LEAD ahead)
        slot = max(int(clock() / self.tick) + 1, self._current) + self._added % phases
        self._added += 1
        flow = MediaFlow(sock.fileno(), channel, interval, frame_bytes, slot * self.tick)
        if receiver is not None and self._poll is not None:
            try:
                self._poll.register(flow.fd, select.EPOLLIN)
            except FileExistsError:  # a flow on this socket was never removed: take it over
                self._poll.modify(flow.fd, select.EPOLLIN)
            receiver.detach_reader()
            flow.receiver = receiver
            self._readers[flow.fd] = receiver.read_one
            self._owners[flow.fd] = flow
        self.wheel.setdefault(slot, []).append(flow)
        self.flows += 1
        if self._planned is not None and slot < self._planned:
            self._wake.set()  # the pump sleeps past this flow's first frame: wake it
        if self._greenlet is None or self._greenlet.dead:
            self._greenlet = gevent.spawn(self._run)
        return flow

    def remove(self, flow: MediaFlow) -> None:
        """Stop the flow (it is dropped from the wheel at its next slot)."""
        if flow.fd >= 0:
            if flow.receiver is not None:
                if self._owners.get(flow.fd) is flow:
                    del self._readers[flow.fd]
                    del self._owners[flow.fd]
                    # closed meanwhile: the kernel dropped it already
                    with contextlib.suppress(OSError, ValueError):
                        self._poll.unregister(flow.fd)
                flow.receiver.attach_reader()
                flow.receiver = None
            flow.fd = -1
            self.flows -= 1

    def _run(self) -> None:
        wheel = self.wheel
        self._current = min(wheel) if wheel else int(clock() / self.tick)
        while self.flows > 0:
            self._send_due()
            if self._readers:
                self._read()
            # wake up LEAD before the next slot with frames is due (sooner when a flow
            # added meanwhile is due before it: see add)
            upcoming = max(min(wheel), self._current) if wheel else self._current
            self._planned = upcoming
            self._wait(upcoming * self.tick - LEAD)
            self._planned = None
        self._greenlet = None

    def _wait(self, deadline: float) -> None:
        """Until ``deadline`` (:func:`clock`): through the hub down to ``COARSE`` before
        it (cut short by :meth:`add`), then in a real ``select()`` (see the module
        docstring)."""
        remaining = deadline - clock()
        if remaining > COARSE:
            self._wake.clear()
            if self._wake.wait(remaining - COARSE):
                return  # a new flow is due before the deadline
        else:
            gevent.sleep(0)  # the hub runs what is ready
        remaining = deadline - clock()
        if remaining > 0:
            _select([], [], [], remaining)

    def _send_due(self) -> None:
        """Send every slot due before now + LEAD (the wake-up latency then centres the
        timing error on zero)."""
        last = int((clock() + LEAD) / self.tick)
        wheel = self.wheel
        while self._current <= last:
            current = self._current
            self._current = current + 1
            batch = wheel.pop(current, None)
            if batch:
                self._send(batch, current)

    def _read(self) -> None:
        """Read one datagram from each flow socket that has one queued (epoll is
        level-triggered: the next wake-up reads the rest, with its arrival stamps, and no
        read ends in a failed ``recvmsg``), sending the frames that fall due meanwhile."""
        readers = self._readers
        offset = time.time() - clock()
        for number, (fd, _) in enumerate(self._poll.poll(0), 1):
            read_one = readers.get(fd)
            if read_one is not None:
                read_one(offset)
            if number % READS_BETWEEN_SENDS == 0:
                self._send_due()

    def _send(self, batch: list[MediaFlow], slot: int) -> None:
        limiter = getattr(self.state, "limiter", None)
        if limiter is not None:
            limiter.acquire(len(batch))  # may sleep: flows may be removed meanwhile
        live = [flow for flow in batch if flow.fd >= 0]
        if not live:
            return
        pack = CHANNEL_HEADER.pack_into
        lag: Histogram = self.state.send_lag
        record = lag.record_us
        write = os.write
        tick = self.tick
        wheel = self.wheel
        for flow in live:
            sent_at = clock()
            record(abs(sent_at - flow.next_due) * 1e6)
            frame = flow.frame
            pack(frame, 0, flow.channel, flow.frame_bytes, flow.sent, sent_at)
            try:
                write(flow.fd, frame)
            except BlockingIOError:
                flow.send_errors += 1
                self.send_errors += 1
            except OSError:
                pass  # ICMP unreachable or a closed socket: the echo is simply missing
            flow.sent += 1
            due = flow.next_due + flow.interval
            if due < sent_at - MAX_CATCH_UP * flow.interval:
                due = sent_at + flow.interval
            flow.next_due = due
            key = max(round(due / tick), slot + 1)
            later = wheel.get(key)
            if later is None:
                wheel[key] = [flow]
            else:
                later.append(flow)
        self.sent += len(live)


def media_pump(state: Any) -> MediaPump:
    """The pump of the process whose aggregates are ``state`` (created on first use)."""
    pump: MediaPump | None = getattr(state, "pump", None)
    if pump is None:
        pump = MediaPump(state)
        state.pump = pump
    return pump


def _epoll() -> Any:
    """An epoll object the pump polls itself (not the hub's: gevent's patching hides
    ``select.epoll``), or None where there is none."""
    factory = monkey.get_original("select", "epoll") if hasattr(select, "EPOLLIN") else None
    return factory() if factory is not None else None


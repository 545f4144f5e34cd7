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

**The native engine.** Where the ``turnstorm._mediapump`` extension is built (it is, by
``pip install``, wherever a C compiler and the Python headers are), :func:`media_pump`
returns a :class:`NativeMediaPump` instead: the same interface, but frames are sent and
echoes read and measured by one OS thread of the extension, outside the interpreter and
without the GIL (``turnstorm/_mediapump.c``). Each echo updates the call's statistics
exactly as :meth:`StreamStats.on_echo` does; a greenlet of the process hands the numbers
to the :class:`StreamStats` objects every ``COLLECT_INTERVAL`` and at the end of each
flow, and dispatches everything that is not a media echo (refresh responses, ICMP
errors) to the flow's client at once. The ``--max-pps`` bound is one budget shared by
the thread and the Python code (:func:`native_bucket`). ``TURNSTORM_MEDIA_PUMP=python``
selects the pure-Python pump.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import gevent
import gevent.select
from gevent import monkey
from gevent.event import Event

from turnstorm.loadgen.metrics import Histogram, StreamStats
from turnstorm.loadgen.wire import CHANNEL_HEADER, clock

_native: ModuleType | None
try:
    from turnstorm import _mediapump as _native
except ImportError:  # not built (no C compiler or Python headers): the pure-Python pump
    _native = None

logger = logging.getLogger(__name__)
PUMP_ENV = "TURNSTORM_MEDIA_PUMP"
"""``python`` selects the pure-Python :class:`MediaPump` even where the native engine is
built."""
COLLECT_INTERVAL = 0.25
"""Seconds between two hand-overs of the native engine's statistics to Python."""
NATIVE_TICK = 0.001
"""The native engine's slot width (seconds): its wake-ups cost little, so its batches
are smaller and their frames closer to their schedule."""

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
    stream: StreamStats | None = None
    """Where the native engine's measurements of this flow's echoes go (or None)."""
    native_id: int = 0
    """The flow's number in the native engine (0: not there)."""

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
            receiver: Any = None, stream: StreamStats | None = None) -> MediaFlow:
        """Start sending on ``sock`` (connected to the relay) through ``channel``.

        With ``receiver`` (the :class:`~turnstorm.loadgen.wire.UdpClient` owning ``sock``)
        the pump also reads the socket while the flow lasts, between its sends, instead
        of the hub's read watcher: echoes cost no wake-up of their own and never delay a
        send by more than one batch of reads."""
        # never a slot the running pump has passed already (it sends up to LEAD ahead)
        slot = first_slot(self.tick, interval, self._added, self._current)
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

    def sync(self, flow: MediaFlow | None = None) -> None:
        """Nothing to do: this pump's echoes update their streams as they are read."""

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


def first_slot(tick: float, interval: float, added: int, current: int = 0) -> int:
    """The first ``tick``-wide slot of the ``added``-th flow: the next slot (never before
    ``current``), plus a phase that spreads the flows over the interval, so batches are
    even instead of one burst."""
    phases = max(1, round(interval / tick))
    return max(int(clock() / tick) + 1, current) + added % phases


def native_available() -> bool:
    """True when :func:`media_pump` hands out the native engine."""
    return _native is not None and os.environ.get(PUMP_ENV, "") != "python"


def wake_lateness(seconds: float, interval: float) -> Histogram | None:
    """How late this thread wakes from a timer armed every ``interval`` s, for
    ``seconds`` (None without the native engine): the floor under any sender's send
    timing on this machine, the engine's included."""
    if _native is None:
        return None
    histogram = Histogram()
    _add_samples(histogram, _native.wake_lateness(seconds, interval))
    return histogram


def native_bucket(rate: float, burst: float) -> Any:
    """A packets/s budget the native engine's thread can charge too (None without it)."""
    if _native is None or not native_available():
        return None
    return _native.RateBucket(rate, burst)


def media_pump(state: Any) -> MediaPump | NativeMediaPump:
    """The pump of the process whose aggregates are ``state`` (created on first use):
    the native engine where it is built and the process's rate bound (``limiter``) can
    be shared with it, else the pure-Python pump."""
    pump: MediaPump | NativeMediaPump | None = getattr(state, "pump", None)
    if pump is None:
        limiter = getattr(state, "limiter", None)
        if native_available() and (limiter is None
                                   or getattr(limiter, "bucket", None) is not None):
            pump = NativeMediaPump(state)
        else:
            pump = MediaPump(state)
        state.pump = pump
    return pump


def _epoll() -> Any:
    """An epoll object the pump polls itself (not the hub's: gevent's patching hides
    ``select.epoll``), or None where there is none."""
    factory = monkey.get_original("select", "epoll") if hasattr(select, "EPOLLIN") else None
    return factory() if factory is not None else None



def stream_state(stream: StreamStats) -> tuple[Any, ...]:
    """A stream's running measurements in the native engine's order."""
    seq, delay, jitter = stream.sequence, stream.delay, stream.jitter
    return (seq.first, seq.highest, seq._window, seq.received, seq.reordered,
            seq.duplicates, delay.count, delay.mean, delay.m2, jitter.value,
            jitter.samples, jitter._last_transit, stream.received_bytes)


def load_stream(stream: StreamStats, numbers: tuple[Any, ...],
                rtt: tuple[bytes, int, int, int]) -> None:
    """Take over the native engine's running numbers of a stream and add its new RTT
    samples."""
    seq, delay, jitter = stream.sequence, stream.delay, stream.jitter
    (seq.first, seq.highest, seq._window, seq.received, seq.reordered, seq.duplicates,
     delay.count, delay.mean, delay.m2, jitter.value, jitter.samples,
     jitter._last_transit, stream.received_bytes) = numbers
    _add_samples(stream.rtt, rtt)


def _add_samples(histogram: Histogram, samples: tuple[bytes, int, int, int]) -> None:
    """Add the native engine's samples (bucket indices with their sum, min and max)."""
    indices, total, low, high = samples
    if indices:
        buckets = array("I")
        buckets.frombytes(indices)
        histogram.add_counts(Counter(buckets), total, low, high)


class NativeMediaPump:
    """:class:`MediaPump`'s interface on the native engine (see the module docstring)."""

    def __init__(self, state: Any, tick: float = NATIVE_TICK) -> None:
        self.state = state
        self.tick = tick
        if _native is None:
            raise RuntimeError("the native media engine (turnstorm._mediapump) is not built")
        limiter = getattr(state, "limiter", None)
        self._limiter = limiter
        self._engine = _native.Engine(lead=LEAD, bucket=getattr(limiter, "bucket", None))
        self._flows: dict[int, MediaFlow] = {}
        self._added = 0
        self._waited = 0.0
        self.sent = 0
        self.send_errors = 0
        self._greenlet: Any = None

    @property
    def flows(self) -> int:
        return len(self._flows)

    def add(self, sock: Any, channel: int, interval: float, frame_bytes: int,
            receiver: Any = None, stream: StreamStats | None = None) -> MediaFlow:
        """Start sending on ``sock`` through ``channel``; with ``receiver`` the engine
        reads the socket while the flow lasts, measuring the echoes into ``stream`` (when
        given) and handing everything else to ``receiver.dispatch``."""
        slot = first_slot(self.tick, interval, self._added)
        self._added += 1
        flow = MediaFlow(sock.fileno(), channel, interval, frame_bytes, slot * self.tick)
        measured = receiver is not None and stream is not None
        self._engine.start()  # first: a flow is never left registered by a failed start
        flow.native_id = self._engine.add(
            flow.fd, channel, interval, flow.next_due, frame_bytes, receiver is not None,
            stream_state(stream) if measured and stream is not None else None)
        if receiver is not None:
            receiver.detach_reader()
            flow.receiver = receiver
            flow.stream = stream if measured else None
        self._flows[flow.native_id] = flow
        if self._greenlet is None or self._greenlet.dead:
            self._greenlet = gevent.spawn(self._run)
        return flow

    def remove(self, flow: MediaFlow) -> None:
        """Stop the flow: its last numbers reach its stream and, once this returns, the
        engine no longer touches its socket."""
        if flow.fd < 0:
            return
        final = self._engine.remove(flow.native_id)
        try:
            self._dispatch()  # what arrived for it (and others) before it left the engine
        finally:
            if final is not None:
                self._apply(flow, final)
            self._flows.pop(flow.native_id, None)
            flow.fd = -1
            if flow.receiver is not None:
                flow.receiver.attach_reader()
                flow.receiver = None
            self._take_lag()

    def sync(self, flow: MediaFlow | None = None) -> None:
        """Bring ``flow``'s stream and ``sent`` up to date, or every flow's and the
        ``send_lag`` histogram."""
        if flow is not None:
            item = self._engine.collect_flow(flow.native_id) if flow.fd >= 0 else None
            if item is not None:
                self._apply(flow, item)
            return
        for item in self._engine.collect():
            flow = self._flows.get(item[0])
            if flow is not None:
                self._apply(flow, item)
        self._take_lag()

    def close(self) -> None:
        """Stop the engine's thread (flows still registered stop sending)."""
        self._engine.stop()

    def _run(self) -> None:
        notify = self._engine.notify_fd
        wait = gevent.select.select
        next_sync = clock() + COLLECT_INTERVAL
        while self._flows:
            wait([notify], [], [], max(0.0, next_sync - clock()))
            self._dispatch()
            if clock() >= next_sync:
                self.sync()
                next_sync = clock() + COLLECT_INTERVAL
        self._greenlet = None

    def _dispatch(self) -> None:
        for number, data, arrival, error in self._engine.take_control():
            flow = self._flows.get(number)
            receiver = flow.receiver if flow is not None else None
            if receiver is None:
                continue
            try:
                if error:
                    receiver.unreachable(OSError(error, os.strerror(error)))
                else:
                    receiver.dispatch(data, arrival)
            except Exception:  # one client's fault must not stop every call's reader
                logger.exception("media pump: dispatching a datagram failed")

    def _apply(self, flow: MediaFlow, item: tuple[Any, ...]) -> None:
        _, flow.sent, flow.send_errors, numbers, rtt = item
        if flow.stream is not None:
            load_stream(flow.stream, numbers, rtt)

    def _take_lag(self) -> None:
        lag, self.sent, self.send_errors, waited = self._engine.take_lag()
        _add_samples(self.state.send_lag, lag)
        if self._limiter is not None and waited > self._waited:
            self._limiter.waited += waited - self._waited
            self._waited = waited

"""Locust users that speak STUN/TURN over UDP.

- :class:`StunBindingUser`: Binding floods (``binding_interval`` 0) or the keepalive
  background of idle subscribers (``binding_interval`` 15-30 s). One ``STUN``/``Binding``
  request event per transaction, except with ``flood_window`` > 0: then a pipelined,
  batched flood (:mod:`turnstorm.loadgen.flood`) logs to Locust's statistics in bulk.
- :class:`TurnSessionUser`: whole calls. REST credentials, a direct Binding (the relay
  overhead baseline), Allocate, CreatePermission, ChannelBind to an echo peer, paced media
  with a ``seq + timestamp`` header (sent for every call of the process by one
  :class:`~turnstorm.loadgen.media.MediaPump`), refreshes on RFC 8656 timers, release at
  the end.
  One ``TURN`` event per operation; media is aggregated in
  :mod:`turnstorm.loadgen.metrics` and summarized by one ``MEDIA``/``echo`` event per user
  per ``summary_interval`` (mean RTT of that interval), never one event per packet.

Settings come from ``environment.turnstorm`` (a :class:`LoadgenState`, installed by
``turnstorm storm`` or lazily from Locust's parsed ``--turn-*`` options). Workers ship
their media aggregates to the master in Locust's ``report_to_master`` messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import gevent
import locust
from gevent import GreenletExit
from locust import User, events, task

from turnstorm.errors import AllocationMismatch, TurnstormError
from turnstorm.loadgen.cgnat import Mapping, PortQuotaExhausted
from turnstorm.loadgen.config import LoadgenConfig, config_from_options
from turnstorm.loadgen.flood import flood
from turnstorm.loadgen.media import MediaFlow, media_pump, native_bucket
from turnstorm.loadgen.metrics import Histogram, MediaStats, StreamStats, merge_by_target
from turnstorm.loadgen.shapes import no_backoff
from turnstorm.loadgen.wire import UdpClient, WireError, clock
from turnstorm.proto.credentials import Credentials
from turnstorm.proto.transaction import TransactionTimeout
from turnstorm.uri import ServerUri

T = TypeVar("T")
BURST_SECONDS = 0.05
"""Send credit the rate limiter lets accumulate (50 ms worth of --max-pps)."""
RELEASE_TIMEOUT = 2.0
REPORT_KEY = "turnstorm"
FINAL_KEY = "turnstorm_final"
"""Marks a worker's last report (sent when the master stops the test)."""
COUNTERS = ("allocations_ok", "allocations_failed", "released", "release_failed",
            "cgnat_remaps", "cgnat_exhausted", "calls", "retransmits_backoff",
            "retransmits_no_backoff", "ice_connected", "ice_failed")
"""Per-process event counts kept next to Locust's own request statistics."""
_user_numbers = itertools.count()
_REQUEST_ERRORS = (TurnstormError, TransactionTimeout, OSError)


class MediaTimeout(TurnstormError):
    """Media was sent for a whole summary interval and no echo came back."""


class MediaLoss(TurnstormError):
    """Media packets of a call never came back from the echo peer."""


class OperationFailed(Exception):
    """Internal: a TURN operation failed and its request event was already fired."""


class RateLimiter:
    """Process-wide bound on packets per second (all users share it)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1 / rate
        self.burst = BURST_SECONDS
        self._next = 0.0
        self.waited = 0.0
        self.bucket: Any = native_bucket(rate, self.burst)
        """The bound's state when the native media engine shares it (it charges every
        frame its thread sends to the same budget), else None."""

    def acquire(self, packets: int = 1) -> None:
        now = clock()
        if self.bucket is not None:
            slot = self.bucket.reserve(packets, now)
        else:
            slot = max(self._next, now - self.burst)
            self._next = slot + packets * self.interval
        if slot > now:
            self.waited += slot - now
            gevent.sleep(slot - now)


@dataclass
class LoadgenState:
    """Per-process aggregates the users feed and ``turnstorm storm`` reports."""

    config: LoadgenConfig
    media: dict[str, MediaStats] = field(default_factory=dict)
    """Per target URI."""
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    send_lag: Histogram = field(default_factory=Histogram)
    """How late each media packet left compared with its schedule."""
    cgnat: Any = None
    """A :class:`turnstorm.loadgen.cgnat.Population` when subscribers sit behind CGNAT."""
    live: dict[int, tuple[str, StreamStats]] = field(default_factory=dict)
    """Streams of calls in progress, by user number (folded into :attr:`media` at the end
    of the call; shown live by :meth:`cumulative`)."""
    finished_workers: set[str] = field(default_factory=set)
    """Master only: workers whose final report arrived."""
    pump: Any = None
    """The process's :class:`~turnstorm.loadgen.media.MediaPump` (created on first call)."""
    shipped: LoadgenState | None = None
    """What :meth:`take_report` already handed to the master (workers only)."""
    limiter: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.limiter = RateLimiter(self.config.max_pps)

    def media_for(self, target: ServerUri) -> MediaStats:
        key = str(target)
        stats = self.media.get(key)
        if stats is None:
            stats = self.media[key] = MediaStats()
        return stats

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def take_report(self) -> dict[str, Any]:
        """What a worker ships to the master: everything since the last report.

        What was shipped is also kept in :attr:`shipped`, so the process's own cumulative
        view (:meth:`cumulative`, the Prometheus endpoint) survives the reset.
        """
        report = {"media": {k: v.to_dict() for k, v in self.media.items()},
                  "counters": dict(self.counters), "send_lag": self.send_lag.to_dict()}
        if self.shipped is None:
            self.shipped = LoadgenState(self.config)
        self.shipped.merge_report(report)
        self.media = {}
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.send_lag = Histogram()
        return report

    def cumulative(self, live: bool = True) -> LoadgenState:
        """Everything this process measured since it started (shipped or not), and with
        ``live`` the calls still in progress (their loss counts what has not come back
        yet, packets in flight included)."""
        view = LoadgenState(self.config)
        for part in (self.shipped, self):
            if part is not None:
                view.merge_report({"media": {k: v.to_dict() for k, v in part.media.items()},
                                   "counters": part.counters,
                                   "send_lag": part.send_lag.to_dict()})
        if live:
            for key, stream in list(self.live.values()):
                view.media.setdefault(key, MediaStats()).add_stream(stream)
        return view

    def merge_report(self, report: dict[str, Any]) -> None:
        for key, stats in merge_by_target([report["media"]]).items():
            self.media.setdefault(key, MediaStats()).merge(stats)
        for name, n in report["counters"].items():
            self.counters[name] = self.counters.get(name, 0) + n
        self.send_lag.merge(Histogram.from_dict(report["send_lag"]))


def install(environment: Any, config: LoadgenConfig | None = None) -> LoadgenState | None:
    """Attach the state (now, or lazily from parsed options) and the worker->master
    report listeners to ``environment``. Idempotent."""
    if config is not None:
        environment.turnstorm = LoadgenState(config)
    if not getattr(environment, "_turnstorm_reporting", False):
        environment._turnstorm_reporting = True

        def to_master(client_id: str, data: dict[str, Any]) -> None:
            state = getattr(environment, "turnstorm", None)
            if state is not None:
                data[REPORT_KEY] = state.take_report()
                data[FINAL_KEY] = getattr(environment, FINAL_KEY, False)

        def from_worker(client_id: str, data: dict[str, Any]) -> None:
            report = data.get(REPORT_KEY)
            if report is not None:
                state = get_state(environment)
                state.merge_report(report)
                if data.get(FINAL_KEY):
                    state.finished_workers.add(client_id)

        environment.events.report_to_master.add_listener(to_master)
        environment.events.worker_report.add_listener(from_worker)
    return getattr(environment, "turnstorm", None)


def get_state(environment: Any) -> LoadgenState:
    state: LoadgenState | None = getattr(environment, "turnstorm", None)
    if state is None:
        state = LoadgenState(config_from_options(environment.parsed_options))
        environment.turnstorm = state
    return state


class _RelayUser(User):
    abstract = True

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.state = get_state(environment)
        self.number = next(_user_numbers)
        config = self.state.config
        self.target = config.targets[self.number % len(config.targets)]
        self.mapping: Mapping | None = None
        self.renumber(self.number, random.Random(self.number))

    def renumber(self, number: int, rng: random.Random) -> None:
        """Be subscriber ``number`` with ``rng``: whether it backs off on retransmission
        follows from the number (the local mode numbers each phase's users from 0, so
        both phases replay the same subscribers)."""
        config = self.state.config
        self.number = number
        self.rng = rng
        self.backoff = not no_backoff(number, config.no_backoff_fraction)
        self.policy = (config.policy if self.backoff
                       else dataclasses.replace(config.policy, backoff=False))
        self._retransmits_key = ("retransmits_backoff" if self.backoff
                                 else "retransmits_no_backoff")

    def count_retransmits(self, client: UdpClient) -> None:
        """Move the client's retransmission count into the process counters."""
        if client.retransmits:
            self.state.count(self._retransmits_key, client.retransmits)
            client.retransmits = 0

    def fire(self, request_type: str, name: str, seconds: float, length: int = 0,
             exception: BaseException | None = None) -> None:
        self.environment.events.request.fire(
            request_type=request_type, name=name, response_time=seconds * 1000,
            response_length=length, exception=exception, context={},
        )

    def operation(self, request_type: str, name: str, call: Callable[[], tuple[T, float]]) -> T:
        """Run one request, fire its event, raise :class:`OperationFailed` on failure."""
        self.state.limiter.acquire()
        started = clock()
        try:
            value, rtt = call()
        except _REQUEST_ERRORS as exc:
            self.fire(request_type, name, clock() - started, exception=exc)
            raise OperationFailed(name) from exc
        self.fire(request_type, name, rtt)
        return value

    def local_address(self) -> tuple[str, int] | None:
        """The CGNAT-mapped source address for a new socket (None without CGNAT).

        Raises :class:`OperationFailed` (after firing a ``CGNAT``/``Mapping`` failure)
        when the subscriber's gateway has no free port.
        """
        population = self.state.cgnat
        if population is None:
            return None
        now = time.monotonic()
        previous = self.mapping
        try:
            self.mapping = population.map(self.number, now)
        except PortQuotaExhausted as exc:
            self.state.count("cgnat_exhausted")
            self.fire("CGNAT", "Mapping", 0.0, exception=exc)
            raise OperationFailed("Mapping") from exc
        if previous is not None and self.mapping is not previous:
            self.state.count("cgnat_remaps")
        return self.mapping.address, self.mapping.port

    def open_client(self, local: tuple[str, int] | None,
                    credentials: Credentials | None = None) -> UdpClient:
        """A client of this user's target whose retransmissions are charged to the
        process's ``--max-pps`` bound."""
        client = UdpClient(self.target.address, credentials=credentials, local=local,
                           policy=self.policy)
        client.pace = self.state.limiter.acquire
        return client

    def touch_mapping(self) -> None:
        if self.state.cgnat is not None and self.mapping is not None:
            self.state.cgnat.touch(self.number, time.monotonic())


class StunBindingUser(_RelayUser):
    """Binding requests back to back (flood) or every ``binding_interval`` (keepalives)."""

    def wait_time(self) -> float:
        interval = self.state.config.binding_interval
        return interval * self.rng.uniform(0.9, 1.1) if interval else 0.0

    def on_start(self) -> None:
        self.client: UdpClient | None = None

    def _client(self) -> UdpClient:
        if self.client is not None and self.state.cgnat is not None:
            # An idle subscriber's NAT mapping may have expired: a new port, a new 5-tuple.
            mapping = self.state.cgnat.lookup(self.number, time.monotonic())
            if mapping is None or mapping.port != self.client.local_address[1]:
                self.client.close()
                self.client = None
        if self.client is None:
            self.client = self.open_client(self.local_address())
        return self.client

    @task
    def binding(self) -> None:
        config = self.state.config
        if config.flood_window and not config.binding_interval and self.state.cgnat is None:
            flood(self)  # until the user is stopped
            return
        try:
            client = self._client()
        except OperationFailed:
            gevent.sleep(self.state.config.call_gap)
            return
        except WireError as exc:
            self.fire("STUN", "Binding", 0.0, exception=exc)
            gevent.sleep(self.state.config.call_gap)
            return
        self.touch_mapping()
        try:
            self.operation("STUN", "Binding", client.binding)
        except OperationFailed:
            return
        finally:
            self.count_retransmits(client)
        # the Locust event rounds; the histogram keeps the exact baseline
        self.state.media_for(self.target).binding_rtt.record_seconds(client.last_rtt)

    def on_stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


@dataclass
class _Call:
    client: UdpClient
    stream: StreamStats | None = None
    channel: int = 0
    sent: int = 0
    reported: tuple[int, float, int] = (0, 0.0, 0)
    """The stream's echoes, their summed RTT and bytes at the last summary."""
    interval_sent: int = 0
    refreshers: list[Any] = field(default_factory=list)
    flow: MediaFlow | None = None


def _absorb_exit(step: Callable[[], None]) -> int:
    """Run ``step``; 1 if a GreenletExit (Locust stopping the user) interrupted it."""
    try:
        step()
    except GreenletExit:
        return 1
    return 0


class TurnSessionUser(_RelayUser):
    """One call after another: allocate, bind a channel to the echo peer, talk, release."""

    def wait_time(self) -> float:
        return float(self.state.config.call_gap)

    def on_start(self) -> None:
        config = self.state.config
        if config.secret is None or config.peer is None:
            raise locust.exception.StopUser(
                "TurnSessionUser needs a shared secret and an echo peer")
        self.call_state: _Call | None = None

    @task
    def call(self) -> None:
        try:
            self._call()
        except OperationFailed:
            pass
        finally:
            self._end_call()

    def _call(self) -> None:
        config = self.state.config
        assert config.secret is not None and config.peer is not None
        peer = config.peer
        credentials = Credentials.ephemeral(config.secret, f"{config.user_prefix}{self.number}",
                                            time.time())
        try:
            local = self.local_address()
        except OperationFailed:
            self.state.count("allocations_failed")
            raise
        try:
            client = self.open_client(local, credentials)
        except WireError as exc:
            self.fire("TURN", "Allocate", 0.0, exception=exc)
            self.state.count("allocations_failed")
            return
        call = self.call_state = _Call(client)
        self.state.count("calls")
        media = self.state.media_for(self.target)
        try:
            self.operation("STUN", "Binding", lambda: (None, client.binding()[1]))
        except OperationFailed:
            self.state.count("allocations_failed")  # the call never got to its Allocate
            raise
        media.binding_rtt.record_seconds(client.last_rtt)
        try:
            self.operation("TURN", "Allocate", lambda: client.allocate(config.lifetime))
        except OperationFailed:
            self.state.count("allocations_failed")
            raise
        self.state.count("allocations_ok")
        self.operation("TURN", "CreatePermission",
                       lambda: (None, client.create_permission(peer)))
        call.channel = self.operation("TURN", "ChannelBind", lambda: client.channel_bind(peer))
        self._talk(call, config.session_length.sample(self.rng))

    def _talk(self, call: _Call, seconds: float) -> None:
        config = self.state.config
        stream = call.stream = StreamStats()
        self.state.live[self.number] = (str(self.target), stream)
        client = call.client
        # read by the hub (before and after the flow) and by the pump (during it)
        client.on_echo = stream.on_echo
        start = clock()
        end = start + seconds
        timers = {"allocation": start + config.allocation_refresh,
                  "permission": start + config.permission_refresh,
                  "channel": start + config.channel_refresh}
        next_summary = start + config.summary_interval
        # The direct Binding baseline of the relay overhead is sampled through the call,
        # under the same load as the media, not only once at call set-up.
        next_probe = start + config.summary_interval
        pump = media_pump(self.state)
        flow = call.flow = pump.add(client.sock, call.channel, config.frame_interval,
                                    config.frame_bytes, receiver=client, stream=stream)
        try:
            while True:
                now = clock()
                if now >= end:
                    break
                for name in [name for name, at in timers.items() if now >= at]:
                    timers[name] = now + getattr(config, f"{name}_refresh")
                    call.refreshers.append(gevent.spawn(self._refresh, call, name))
                if self.state.cgnat is not None:
                    self.touch_mapping()  # mapping timeouts are minutes; once a wake-up does
                if now >= next_probe:
                    next_probe = now + config.summary_interval
                    call.refreshers.append(gevent.spawn(self._probe, call))
                if now >= next_summary:
                    pump.sync(flow)  # the native engine's numbers of this call, now
                    call.interval_sent = flow.sent - call.sent
                    call.sent = flow.sent
                    self._summary(call, now - next_summary + config.summary_interval)
                    next_summary = now + config.summary_interval
                gevent.sleep(max(0.0, min(end, next_summary, next_probe, *timers.values())
                                 - clock()))
        finally:
            self._stop_flow(call)

    def _stop_flow(self, call: _Call) -> None:
        flow = call.flow
        if flow is not None:
            media_pump(self.state).remove(flow)
            call.interval_sent += flow.sent - call.sent
            call.sent = flow.sent
            call.flow = None

    def _refresh(self, call: _Call, what: str) -> None:
        config = self.state.config
        client = call.client
        assert config.peer is not None
        peer = config.peer
        operations: dict[str, tuple[str, Callable[[], tuple[Any, float]]]] = {
            "allocation": ("Refresh", lambda: client.refresh(config.lifetime)),
            "permission": ("CreatePermission", lambda: (None, client.create_permission(peer))),
            "channel": ("ChannelBind", lambda: client.channel_bind(peer, call.channel)),
        }
        name, operation = operations[what]
        with contextlib.suppress(OperationFailed):
            self.operation("TURN", name, operation)

    def _probe(self, call: _Call) -> None:
        client = call.client
        with contextlib.suppress(OperationFailed):
            self.operation("STUN", "Binding", lambda: (None, client.binding()[1]))
            self.state.media_for(self.target).binding_rtt.record_seconds(client.last_rtt)

    def _summary(self, call: _Call, seconds: float) -> None:
        """One MEDIA "echo" event for the echoes since the last summary: their mean RTT
        and bytes (from the stream's running totals), or a failure when packets were sent
        and none came back."""
        stream = call.stream
        if stream is None:
            return
        delay = stream.delay
        count0, rtt0, size0 = call.reported
        call.reported = (delay.count, delay.mean * delay.count, stream.received_bytes)
        count = delay.count - count0
        if count:
            self.fire("MEDIA", "echo", (call.reported[1] - rtt0) / count,
                      stream.received_bytes - size0)
        elif call.interval_sent:
            self.fire("MEDIA", "echo", seconds, exception=MediaTimeout(
                f"no echo for {call.interval_sent} packets in {seconds:.1f} s"))
        call.interval_sent = 0

    def _end_call(self) -> None:
        """Fold the stream in, release the allocation, close. Safe to run twice.

        Locust stops a user by raising GreenletExit in it, possibly while this very
        cleanup waits for echoes or the release: each step absorbs the exit, the cleanup
        completes, and the exit is raised again at the end.
        """
        call, self.call_state = self.call_state, None
        if call is None:
            return
        self._stop_flow(call)
        exits = 0
        for refresher in call.refreshers:
            refresher.kill(block=False)
        try:
            if call.stream is not None:
                exits += _absorb_exit(lambda: gevent.sleep(self.state.config.echo_grace))
                self._finish_stream(call, call.stream)
            if call.client.allocation is not None:
                interrupted = _absorb_exit(lambda: self._release(call.client))
                if interrupted:  # stopped mid-release: the Refresh may or may not have landed
                    exits += interrupted
                    exits += _absorb_exit(lambda: self._release(call.client, retry=True))
        finally:
            self.count_retransmits(call.client)
            call.client.close()
        if exits:
            raise GreenletExit

    def _finish_stream(self, call: _Call, stream: StreamStats) -> None:
        self.state.live.pop(self.number, None)
        stream.sequence.sent = call.sent
        self.state.media_for(self.target).add_stream(stream)
        self._summary(call, self.state.config.echo_grace)
        lost = stream.sequence.lost
        if lost:
            self.fire("MEDIA", "loss", 0.0, exception=MediaLoss(
                f"{lost} of {call.sent} media packets never came back"))

    def _release(self, client: UdpClient, *, retry: bool = False) -> None:
        """Refresh(LIFETIME=0). On a ``retry`` after an interrupted release, a 437 means
        the first one landed."""
        try:
            with gevent.Timeout(RELEASE_TIMEOUT, TransactionTimeout("Refresh", 0,
                                                                    RELEASE_TIMEOUT)):
                if retry:
                    with contextlib.suppress(AllocationMismatch):
                        client.refresh(0)
                    self.state.count("released")
                    return
                self.operation("TURN", "Release", lambda: client.refresh(0))
        except (OperationFailed, TransactionTimeout, *_REQUEST_ERRORS):
            self.state.count("release_failed")
            return
        self.state.count("released")


def _add_options(parser: Any, **_kwargs: Any) -> None:
    group = parser.add_argument_group("turnstorm")
    group.add_argument("--turn-targets", default="", help="comma-separated turn:HOST:PORT URIs")
    group.add_argument("--turn-allow-targets", default="",
                       help="comma-separated non-loopback addresses/CIDRs you own")
    group.add_argument("--turn-secret-file", default="", help="coturn static-auth-secret file")
    group.add_argument("--turn-peer", default="", help="UDP echo peer HOST:PORT")
    group.add_argument("--turn-session", default="30", help="call length: fixed:S, uniform:A-B, "
                       "exp:MEAN")
    group.add_argument("--turn-max-pps", default="", help="packets/s bound per process")


def _on_init(environment: Any, **_kwargs: Any) -> None:
    install(environment)


# Only for `locust -f turnstorm/loadgen/users.py`; `turnstorm storm` uses its own Events.
events.init_command_line_parser.add_listener(_add_options)  # type: ignore[no-untyped-call]
events.init.add_listener(_on_init)  # type: ignore[no-untyped-call]

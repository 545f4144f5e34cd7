"""Relay collector and exporter: live coturn and kernel signals as Prometheus metrics.

coturn's own traffic counters only move when a session ends (coturn#1340) and Debian's
coturn 4.6.1 has no Prometheus endpoint at all, so this exporter (``turnstorm exporter``,
a sidecar sharing the relay's network namespace, or in-process in local mode) reads:

* coturn's telnet admin CLI (``cli-port`` on 127.0.0.1, password protected): ``pc`` for
  ``total-current-allocs``, ``pu`` for sessions per user, ``ps`` for per-session usage
  (received/sent packets and bytes). ``ps`` lists at most ``cli-max-output-sessions``
  sessions (default 256): beyond that the relayed-traffic counters are partial, which
  ``turnstorm_relay_session_usage_truncated`` says;
* the kernel: ``/proc/<pid>/net/snmp`` UDP counters (whole network namespace) and, per
  socket, ``/proc/<pid>/net/udp{,6}`` receive-queue bytes and drops, restricted to the
  relay process's own sockets (its ``/proc/<pid>/fd`` links ``socket:[inode]``) when a
  pid is known, so relays sharing the host namespace (local mode) are told apart;
* ``/proc/<pid>/stat`` utime+stime (the thread-group total: every thread included), for
  a pid given, or for the process found by command name (``--process turnserver``: in a
  pod with ``shareProcessNamespace`` the sidecar sees the relay's process; found again
  after a restart; several of that name is an error, reported in place of the CPU).

Metrics are collected on scrape (a custom collector) and cached for ``cache_seconds`` so
several scrapers do not multiply the CLI load. Every metric has a ``relay`` label.

==============================================  =======  ===========================================
metric                                          type     meaning
==============================================  =======  ===========================================
turnstorm_relay_up                              gauge    1 when the coturn CLI answered this scrape
turnstorm_relay_allocations                     gauge    ``total-current-allocs`` (``pc``)
turnstorm_relay_sessions                        gauge    ``Total sessions`` (``pu``)
turnstorm_relay_users                           gauge    distinct usernames with sessions (``pu``)
turnstorm_relay_relayed_packets_total           counter  packets of listed sessions, label
                                                         ``direction`` = received|sent (``ps``)
turnstorm_relay_relayed_bytes_total             counter  bytes, same labels and source
turnstorm_relay_session_usage_truncated         gauge    1 when ``ps`` listed fewer sessions than
                                                         exist (cli-max-output-sessions)
turnstorm_relay_udp_in_datagrams_total          counter  Udp InDatagrams (netns)
turnstorm_relay_udp_in_errors_total             counter  Udp InErrors (netns)
turnstorm_relay_udp_rcvbuf_errors_total         counter  Udp RcvbufErrors (netns): receive buffer
                                                         full, datagram dropped
turnstorm_relay_udp_no_ports_total              counter  Udp NoPorts (netns)
turnstorm_relay_udp_out_datagrams_total         counter  Udp OutDatagrams (netns)
turnstorm_relay_udp_sndbuf_errors_total         counter  Udp SndbufErrors (netns)
turnstorm_relay_socket_drops_total              counter  sum of ``drops`` over the relay's UDP
                                                         sockets (all sockets without a pid)
turnstorm_relay_rx_queue_bytes                  gauge    sum of ``rx_queue`` over those sockets
turnstorm_relay_udp_sockets                     gauge    number of those sockets
turnstorm_relay_cpu_seconds_total               counter  relay process user+system CPU (with a pid
                                                         or ``--process``)
turnstorm_relay_scrape_duration_seconds         gauge    time the last collection took
==============================================  =======  ===========================================

The relayed counters are made monotonic by the exporter: it remembers each session's
last ``rp``/``sp``/``rb``/``sb`` by session id and adds only increments, so sessions that
end keep their contribution (traffic of sessions that start and end between two
scrapes, or that are not listed, is missed). Measured on coturn 4.6.1: a session's
``usage`` only takes in relayed ChannelData and Send/Data indications when the
allocation is *refreshed* (or ends), so these counters lag by up to one refresh interval
(clients refresh every few minutes). For a live packet rate use
``turnstorm_relay_udp_in_datagrams_total`` (the relay's network namespace, i.e. the pod)
and ``turnstorm_relay_cpu_seconds_total``.

:func:`turnstorm.signals.scrape_signals` turns one exposition back into numbers and
:class:`turnstorm.signals.SignalTracker` turns two of them into the per-second rates the
policy uses; :func:`collector_values` gives the same numbers without HTTP.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from turnstorm.errors import TurnstormError
from turnstorm.relay.coturncli import CoturnCli, SessionUsage
from turnstorm.relay.procfs import (
    ProcessFinder,
    UdpSocket,
    read_cpu_seconds,
    read_snmp_udp,
    read_udp_sockets,
)
from turnstorm.signals import METRIC_PREFIX, add_sample

DEFAULT_CACHE_SECONDS = 1.0


@dataclass
class RelaySnapshot:
    """Everything one collection found; None where a source was unavailable."""

    up: bool = False
    allocations: int | None = None
    sessions: int | None = None
    users: int | None = None
    usage: SessionUsage | None = None
    snmp: dict[str, int] | None = None
    sockets: list[UdpSocket] | None = None
    cpu_seconds: float | None = None
    duration: float = 0.0
    errors: list[str] = field(default_factory=list)


class RelayCollector:
    """Collects one relay on demand; a prometheus_client custom collector."""

    def __init__(
        self,
        relay: str,
        cli: CoturnCli | None,
        pid: int | None = None,
        *,
        cache_seconds: float = DEFAULT_CACHE_SECONDS,
        session_usage: bool = True,
        clock: Any = time.monotonic,
        process: str | None = None,
    ) -> None:
        self.relay = relay
        self.cli = cli
        self.pid = pid
        self.finder = ProcessFinder(process) if process is not None else None
        """With ``process`` (and no pid): the relay found by name for its CPU only (the
        socket counters are the pod's network namespace, all the relay's)."""
        self.cache_seconds = cache_seconds
        self.session_usage = session_usage
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, RelaySnapshot] | None = None
        self._last_usage: dict[str, tuple[int, int, int, int]] = {}
        self.relayed = [0, 0, 0, 0]
        """Monotonic (rp, rb, sp, sb) built from per-session increments."""

    def snapshot(self) -> RelaySnapshot:
        """A fresh collection, or the cached one if younger than ``cache_seconds``."""
        with self._lock:
            now = self._clock()
            if self._cached is not None and now - self._cached[0] < self.cache_seconds:
                return self._cached[1]
            snap = self._collect()
            self._cached = (self._clock(), snap)
            return snap

    def _collect(self) -> RelaySnapshot:
        start = time.perf_counter()
        snap = RelaySnapshot()
        if self.cli is not None:
            try:
                snap.allocations = self.cli.total_allocations()
                users, snap.sessions = self.cli.sessions_per_user()
                snap.users = len(users)
                if self.session_usage:
                    snap.usage = self.cli.session_usage()
                    self._accumulate(snap.usage)
                snap.up = True
            except (TurnstormError, OSError) as exc:
                snap.errors.append(str(exc))
                self.cli.close()
        try:
            snap.snmp = read_snmp_udp(self.pid)
            snap.sockets = read_udp_sockets(self.pid)
        except (TurnstormError, OSError, ValueError) as exc:
            snap.errors.append(f"kernel counters: {exc}")
        if self.pid is not None or self.finder is not None:
            try:
                pid = self.pid
                if pid is None and self.finder is not None:
                    pid = self.finder.resolve()
                if pid is not None:
                    snap.cpu_seconds = read_cpu_seconds(pid)
            except TurnstormError as exc:
                snap.errors.append(str(exc))
        snap.duration = time.perf_counter() - start
        return snap

    def _accumulate(self, usage: SessionUsage) -> None:
        for sid, values in usage.per_session.items():
            before = self._last_usage.get(sid, (0, 0, 0, 0))
            for i in range(4):
                self.relayed[i] += max(0, values[i] - before[i])
        self._last_usage = dict(usage.per_session)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.snapshot()
        relay = [self.relay]

        def gauge(name: str, doc: str, value: float | None) -> Iterator[Any]:
            if value is not None:
                family = GaugeMetricFamily(METRIC_PREFIX + name, doc, labels=["relay"])
                family.add_metric(relay, value)
                yield family

        def counter(name: str, doc: str, value: float | None) -> Iterator[Any]:
            if value is not None:
                family = CounterMetricFamily(METRIC_PREFIX + name, doc, labels=["relay"])
                family.add_metric(relay, value)
                yield family

        yield from gauge("up", "1 when the coturn CLI answered this scrape",
                         1.0 if snap.up else 0.0)
        yield from gauge("allocations", "coturn total-current-allocs (CLI pc)",
                         snap.allocations)
        yield from gauge("sessions", "coturn Total sessions (CLI pu)", snap.sessions)
        yield from gauge("users", "usernames with sessions (CLI pu)", snap.users)
        if snap.usage is not None:
            rp, rb, sp, sb = self.relayed
            packets = CounterMetricFamily(
                METRIC_PREFIX + "relayed_packets",
                "packets of sessions listed by CLI ps (per-session increments)",
                labels=["relay", "direction"])
            packets.add_metric([self.relay, "received"], rp)
            packets.add_metric([self.relay, "sent"], sp)
            yield packets
            octets = CounterMetricFamily(
                METRIC_PREFIX + "relayed_bytes",
                "bytes of sessions listed by CLI ps (per-session increments)",
                labels=["relay", "direction"])
            octets.add_metric([self.relay, "received"], rb)
            octets.add_metric([self.relay, "sent"], sb)
            yield octets
            yield from gauge("session_usage_truncated",
                             "1 when CLI ps listed fewer sessions than exist",
                             1.0 if snap.usage.truncated else 0.0)
        if snap.snmp is not None:
            for key, name in (("InDatagrams", "udp_in_datagrams"),
                              ("InErrors", "udp_in_errors"),
                              ("RcvbufErrors", "udp_rcvbuf_errors"),
                              ("NoPorts", "udp_no_ports"),
                              ("OutDatagrams", "udp_out_datagrams"),
                              ("SndbufErrors", "udp_sndbuf_errors")):
                yield from counter(name, f"Udp {key} of the relay's network namespace",
                                   snap.snmp.get(key))
        if snap.sockets is not None:
            yield from counter("socket_drops", "drops summed over the relay's UDP sockets",
                               sum(s.drops for s in snap.sockets))
            yield from gauge("rx_queue_bytes", "rx_queue summed over the relay's UDP sockets",
                             sum(s.rx_queue for s in snap.sockets))
            yield from gauge("udp_sockets", "UDP sockets counted", len(snap.sockets))
        yield from counter("cpu_seconds", "relay process user+system CPU seconds",
                           snap.cpu_seconds)
        yield from gauge("scrape_duration_seconds", "time the last collection took",
                         snap.duration)


class Exporter:
    """An HTTP ``/metrics`` endpoint for one or more relay collectors."""

    def __init__(self, collectors: Iterable[RelayCollector], host: str = "127.0.0.1",
                 port: int = 0) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=False)
        self.collectors = list(collectors)
        for collector in self.collectors:
            self.registry.register(collector)
        self.host = host
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> Exporter:
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(self.port, self.host,
                                                           self.registry)
        except OSError as exc:
            raise TurnstormError(f"cannot listen on {self.host}:{self.port}: "
                                 f"{exc.strerror or exc}") from None
        self.port = self._server.server_port
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def exposition(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for collector in self.collectors:
            if collector.cli is not None:
                collector.cli.close()

    def __enter__(self) -> Exporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def collector_values(collector: RelayCollector) -> dict[str, float]:
    """What :func:`turnstorm.signals.scrape_signals` returns for this collector's exposition."""
    values: dict[str, dict[str, float]] = {}
    for family in collector.collect():
        for sample in family.samples:
            add_sample(values, sample.name, sample.labels, sample.value)
    return values.get(collector.relay, {})

"""A Prometheus endpoint per generator process (the master and each worker its own).

Values are computed on scrape from the process's Locust statistics and its
:class:`~turnstorm.loadgen.users.LoadgenState`; nothing is added to the per-request path.
Workers hand their statistics to the master every few seconds and Locust then resets
them, so the exporter keeps what was shipped and every series stays cumulative for the
life of the process. The master's endpoint shows the merged view of all workers.

=============================================== ========= =======================================
metric                                          type      labels / meaning
=============================================== ========= =======================================
``turnstorm_loadgen_transactions_total``        counter   ``type`` (STUN/TURN/MEDIA/CGNAT),
                                                          ``name`` (Binding, Allocate, ...),
                                                          ``result`` (``ok``/``failure``)
``turnstorm_loadgen_rtt_seconds``               histogram ``type``, ``name``: transaction RTT
                                                          (Locust's per-request samples)
``turnstorm_loadgen_media_rtt_seconds``         summary   ``target``: per-packet echo RTT through
                                                          the relay, exact quantiles 0.5, 0.95,
                                                          0.99, 0.999 from the mergeable histogram
``turnstorm_loadgen_binding_rtt_seconds``       summary   ``target``: direct Binding RTT (the
                                                          relay-overhead baseline), same quantiles
``turnstorm_loadgen_media_jitter_seconds``      gauge     ``target``: RFC 3550 interarrival jitter
``turnstorm_loadgen_media_delay_std_seconds``   gauge     ``target``: standard deviation of delay
``turnstorm_loadgen_media_loss_ratio``          gauge     ``target``: lost / sent (0..1)
``turnstorm_loadgen_media_packets_total``       counter   ``target``, ``state`` (``sent``,
                                                          ``received``, ``lost``, ``reordered``,
                                                          ``duplicates``)
``turnstorm_loadgen_relay_overhead_seconds``    gauge     ``target``: median media RTT minus
                                                          median direct Binding RTT
``turnstorm_loadgen_allocations``               gauge     ``state``: ``active`` (held now),
                                                          ``ok``, ``failed``, ``released``,
                                                          ``release_failed`` (since start)
``turnstorm_loadgen_retransmits_total``         counter   ``backoff`` (``true``/``false``)
``turnstorm_loadgen_cgnat_events_total``        counter   ``event`` (``remap``/``exhausted``)
``turnstorm_loadgen_send_lag_seconds``          summary   lateness of paced media sends
``turnstorm_loadgen_users``                     gauge     ``user_class``: running users
=============================================== ========= =======================================
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from turnstorm.loadgen.metrics import Histogram

PREFIX = "turnstorm_loadgen_"
RTT_BUCKETS_MS = (0.5, 1, 2.5, 5, 10, 25, 50, 100, 150, 250, 500, 1000, 2500, 5000, 10000)
"""Upper bounds of the transaction RTT histogram (milliseconds; exported in seconds)."""
QUANTILES = (0.5, 0.95, 0.99, 0.999)
ALLOCATION_STATES = ("ok", "failed", "released", "release_failed")


class _Shipped:
    """Locust's request statistics a worker already sent to the master."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], list[int]] = {}
        """(type, name) -> [requests, failures]."""
        self.times: dict[tuple[str, str], dict[int, int]] = {}
        """(type, name) -> Locust's rounded response times (ms) -> count."""
        self.sums: dict[tuple[str, str], float] = defaultdict(float)

    def keep(self, stats: Any) -> None:
        for entry in list(stats.entries.values()):
            key = (entry.method, entry.name)
            counts = self.counts.setdefault(key, [0, 0])
            counts[0] += entry.num_requests
            counts[1] += entry.num_failures
            times = self.times.setdefault(key, {})
            for ms, n in entry.response_times.items():
                times[ms] = times.get(ms, 0) + n
            self.sums[key] += entry.total_response_time


class LoadgenCollector(Collector):
    """Computes every ``turnstorm_loadgen_*`` series from one Locust environment."""

    def __init__(self, environment: Any) -> None:
        self.environment = environment
        self.shipped = _Shipped()

    def collect(self) -> Iterator[Metric]:
        yield from self._transactions()
        state = getattr(self.environment, "turnstorm", None)
        if state is not None:
            yield from self._media(state.cumulative())
        users = GaugeMetricFamily(PREFIX + "users", "Running users by class",
                                  labels=["user_class"])
        runner = self.environment.runner
        if runner is not None:
            for name, n in sorted(runner.user_classes_count.items()):
                users.add_metric([name], n)
        yield users

    def _transactions(self) -> Iterator[Metric]:
        counts = {k: list(v) for k, v in self.shipped.counts.items()}
        times = {k: dict(v) for k, v in self.shipped.times.items()}
        sums = dict(self.shipped.sums)
        for entry in list(self.environment.stats.entries.values()):
            key = (entry.method, entry.name)
            pair = counts.setdefault(key, [0, 0])
            pair[0] += entry.num_requests
            pair[1] += entry.num_failures
            merged = times.setdefault(key, {})
            for ms, n in list(entry.response_times.items()):
                merged[ms] = merged.get(ms, 0) + n
            sums[key] = sums.get(key, 0.0) + entry.total_response_time
        total = CounterMetricFamily(PREFIX + "transactions", "Request events by outcome",
                                    labels=["type", "name", "result"])
        rtt = HistogramMetricFamily(PREFIX + "rtt_seconds", "Transaction RTT",
                                    labels=["type", "name"])
        for (kind, name), (requests, failures) in sorted(counts.items()):
            total.add_metric([kind, name, "ok"], requests - failures)
            total.add_metric([kind, name, "failure"], failures)
            rtt.add_metric([kind, name], _buckets(times.get((kind, name), {})),
                           sums.get((kind, name), 0.0) / 1000)
        yield total
        yield rtt

    def _media(self, state: Any) -> Iterator[Metric]:
        rtt = SummaryMetricFamily(PREFIX + "media_rtt_seconds",
                                  "Per-packet media echo RTT through the relay",
                                  labels=["target"])
        binding = SummaryMetricFamily(PREFIX + "binding_rtt_seconds",
                                      "Direct STUN Binding RTT to the relay", labels=["target"])
        gauges = {
            "jitter": GaugeMetricFamily(PREFIX + "media_jitter_seconds",
                                        "RFC 3550 interarrival jitter", labels=["target"]),
            "std": GaugeMetricFamily(PREFIX + "media_delay_std_seconds",
                                     "Standard deviation of media delay", labels=["target"]),
            "loss": GaugeMetricFamily(PREFIX + "media_loss_ratio", "Lost / sent media packets",
                                      labels=["target"]),
            "overhead": GaugeMetricFamily(PREFIX + "relay_overhead_seconds",
                                          "Median relayed RTT minus median direct Binding RTT",
                                          labels=["target"]),
        }
        packets = CounterMetricFamily(PREFIX + "media_packets", "Media packets by state",
                                      labels=["target", "state"])
        for target, stats in sorted(state.media.items()):
            _summary(rtt, {"target": target}, stats.rtt)
            _summary(binding, {"target": target}, stats.binding_rtt)
            gauges["jitter"].add_metric([target], stats.jitter_ms / 1000)
            gauges["std"].add_metric([target], stats.delay.std)
            gauges["loss"].add_metric([target], stats.loss_pct / 100)
            overhead = stats.relay_overhead_ms
            if overhead is not None:
                gauges["overhead"].add_metric([target], overhead / 1000)
            for name in ("sent", "received", "lost", "reordered", "duplicates"):
                packets.add_metric([target, name], getattr(stats, name))
        yield rtt
        yield binding
        yield from gauges.values()
        yield packets
        yield from self._counters(state)

    def _counters(self, state: Any) -> Iterator[Metric]:
        counters = state.counters
        allocations = GaugeMetricFamily(PREFIX + "allocations", "TURN allocations by state",
                                        labels=["state"])
        active = (counters["allocations_ok"] - counters["released"]
                  - counters["release_failed"])
        allocations.add_metric(["active"], max(0, active))
        for name in ALLOCATION_STATES:
            allocations.add_metric([name], counters[f"allocations_{name}"]
                                   if name in ("ok", "failed") else counters[name])
        yield allocations
        retransmits = CounterMetricFamily(PREFIX + "retransmits", "Request retransmissions",
                                          labels=["backoff"])
        retransmits.add_metric(["true"], counters["retransmits_backoff"])
        retransmits.add_metric(["false"], counters["retransmits_no_backoff"])
        yield retransmits
        cgnat = CounterMetricFamily(PREFIX + "cgnat_events", "Emulated CGNAT events",
                                    labels=["event"])
        cgnat.add_metric(["remap"], counters["cgnat_remaps"])
        cgnat.add_metric(["exhausted"], counters["cgnat_exhausted"])
        yield cgnat
        lag = SummaryMetricFamily(PREFIX + "send_lag_seconds",
                                  "How late paced media packets left", labels=[])
        _summary(lag, {}, state.send_lag)
        yield lag


def _buckets(times_ms: dict[int, int]) -> list[tuple[str, float]]:
    counts = [0] * (len(RTT_BUCKETS_MS) + 1)
    for ms, n in times_ms.items():
        for i, bound in enumerate(RTT_BUCKETS_MS):
            if ms <= bound:
                counts[i] += n
                break
        else:
            counts[-1] += n
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip((*RTT_BUCKETS_MS, float("inf")), counts, strict=True):
        running += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound / 1000), running))
    return buckets


def _summary(family: SummaryMetricFamily, labels: dict[str, str], histogram: Histogram) -> None:
    """Count, sum and the exact quantiles of ``histogram``, in seconds."""
    family.add_metric(list(labels.values()), histogram.count, histogram.total_us / 1e6)
    for q in QUANTILES:
        family.add_sample(family.name, {**labels, "quantile": repr(q)},
                          histogram.percentile_us(q * 100) / 1e6)


def attach(environment: Any) -> LoadgenCollector:
    """Create the collector and keep shipped statistics. Call it before the runner is
    created, so this listener sees the statistics before Locust resets them."""
    collector: LoadgenCollector | None = getattr(environment, "_turnstorm_collector", None)
    if collector is None:
        collector = LoadgenCollector(environment)
        environment._turnstorm_collector = collector
        shipped = collector.shipped

        def keep(client_id: str, data: dict[str, Any]) -> None:
            shipped.keep(environment.stats)

        environment.events.report_to_master.add_listener(keep)
    return collector


def serve(environment: Any, port: int, host: str = "127.0.0.1") -> Any:
    """Serve ``/metrics`` on ``host:port`` from this process's gevent hub; returns the
    started ``gevent.pywsgi.WSGIServer`` (``.stop()`` it; ``.server_port`` is the port)."""
    from gevent.pywsgi import WSGIServer

    registry = CollectorRegistry(auto_describe=False)
    registry.register(attach(environment))
    server = WSGIServer((host, port), make_wsgi_app(registry), log=None)
    server.start()
    return server

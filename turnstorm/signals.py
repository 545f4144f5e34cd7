"""Relay signals: their names, an exporter exposition read back, rates between scrapes.

Pure (no sockets, no threads, no clocks: ``now`` is passed in), shared by the operator,
the local process actuator and the policy. The relays' exporters
(:mod:`turnstorm.relay.collector`) produce the ``turnstorm_relay_*`` series named here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

METRIC_PREFIX = "turnstorm_relay_"
"""Prefix of every series a relay exporter serves."""

SIGNALS: dict[str, str] = {
    "allocationsPerRelay": "allocations",
    "bindingRatePerRelay": "binding_rate",
    "relayedPpsPerRelay": "relayed_pps",
    "udpRcvbufErrorsPerSecond": "udp_rcvbuf_errors",
    "cpuUtilization": "cpu_percent",
    "probeRttMs": "probe_rtt_ms",
}
"""CRD target name -> signal name in :class:`turnstorm.policy.RelaySample`."""


def scrape_signals(text: str, relay: str | None = None) -> dict[str, float]:
    """Raw values of one relay from an exporter exposition.

    Keys: the metric names without the ``turnstorm_relay_`` prefix (counters keep
    ``_total``); ``relayed_packets_total`` and ``relayed_bytes_total`` are summed over
    directions. With several relays in ``text``, ``relay`` picks one.
    """
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            add_sample(values, sample.name, sample.labels, sample.value)
    if relay is not None:
        return values.get(relay, {})
    if len(values) > 1:
        raise ValueError(f"exposition holds several relays ({', '.join(sorted(values))}): "
                         "name one")
    return next(iter(values.values()), {})


def add_sample(values: dict[str, dict[str, float]], name: str, labels: Mapping[str, str],
                value: float) -> None:
    if not name.startswith(METRIC_PREFIX) or name.endswith("_created"):
        return
    bucket = values.setdefault(labels.get("relay", ""), {})
    key = name[len(METRIC_PREFIX):]
    bucket[key] = bucket.get(key, 0.0) + value


@dataclass
class _Previous:
    now: float
    values: dict[str, float]


class SignalTracker:
    """Turns successive scrapes into policy signals (see :data:`SIGNALS`).

    Gauges pass through; counters become per-second rates between two scrapes of the same
    relay (None on the first scrape, after a counter reset, or while the relay is down:
    missing data, which never scales down).
    """

    RATES: Mapping[str, str] = {
        "udp_rcvbuf_errors": "udp_rcvbuf_errors_total",
        "relayed_pps": "relayed_packets_total",
        "udp_in_pps": "udp_in_datagrams_total",
        "socket_drops": "socket_drops_total",
        # Not exported by RelayCollector (coturn's CLI has no Binding counter); a series
        # of that name from Prometheus feeds bindingRatePerRelay.
        "binding_rate": "binding_requests_total",
    }

    def __init__(self, cpu_limit_cores: float | None = None,
                 drops_source: str = "udp_rcvbuf_errors_total") -> None:
        self.cpu_limit_cores = cpu_limit_cores
        """CPU percent is relative to this (the pod limit); one core when None."""
        self.drops_source = drops_source
        """Counter behind the ``udp_rcvbuf_errors`` signal: the netns-wide one (a pod) or
        ``socket_drops_total`` (relays sharing one namespace)."""
        self._previous: dict[str, _Previous] = {}

    def update(self, relay: str, now: float, scraped: Mapping[str, float]
               ) -> dict[str, float | None]:
        up = scraped.get("up", 0.0) >= 1.0
        signals: dict[str, float | None] = {
            "allocations": scraped.get("allocations") if up else None,
            "sessions": scraped.get("sessions") if up else None,
            "rx_queue_bytes": scraped.get("rx_queue_bytes"),
        }
        previous = self._previous.get(relay)
        rates = dict(self.RATES, udp_rcvbuf_errors=self.drops_source)
        rates["cpu_percent"] = "cpu_seconds_total"
        for signal, source in rates.items():
            value = None
            if previous is not None and source in scraped and source in previous.values:
                elapsed = now - previous.now
                delta = scraped[source] - previous.values[source]
                if elapsed > 0 and delta >= 0:
                    value = delta / elapsed
            if signal == "cpu_percent" and value is not None:
                value = 100.0 * value / (self.cpu_limit_cores or 1.0)
            if signal == "relayed_pps" and not up:
                value = None
            signals[signal] = value
        self._previous[relay] = _Previous(now, dict(scraped))
        return signals

    def forget(self, relay: str) -> None:
        self._previous.pop(relay, None)

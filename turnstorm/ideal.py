"""The ideal column: what a human call needs, as every report and table states it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ideal:
    """One figure's bound, as the table prints it and as a value is checked against it."""

    text: str
    """The ideal column's cell, e.g. ``< 150 ms``."""
    limit: float
    inclusive: bool = False
    """``value <= limit`` is ideal (else ``value < limit``)."""

    def met(self, value: float) -> bool:
        return value <= self.limit if self.inclusive else value < self.limit


LATENCY_P99 = Ideal("< 150 ms", 150.0)
"""Media round-trip time at the 99th percentile, milliseconds."""
LOSS = Ideal("< 1 %", 1.0)
"""Packet loss, percent."""
JITTER = Ideal("< 20 ms", 20.0)
"""Delay standard deviation, milliseconds."""
RELAY_OVERHEAD = Ideal("0-30 ms", 30.0, inclusive=True)
"""Relayed minus direct round-trip time, milliseconds."""

LIMITS = {"latency_p99_ms": LATENCY_P99.limit, "loss_pct": LOSS.limit,
          "jitter_std_ms": JITTER.limit, "relay_overhead_ms": RELAY_OVERHEAD.limit}
"""The bounds by report key (``report.json``'s ``ideal``)."""

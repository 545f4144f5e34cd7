"""Per-second time series of one phase, from the generator's own measurements.

The users' aggregates are cumulative (finished calls plus, in the same process, the calls
in progress); one second's figures are the difference of two cumulative views: the RTT
histogram bucket by bucket (exact percentiles of that second's echoes), packets sent and
lost, Locust's request count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from turnstorm.loadgen.metrics import bucket_bounds, percentile_middle_us, total
from turnstorm.localmode.control import PoolStatus

COLUMNS = ("time_s", "phase", "phase_time_s", "users", "offered_pps", "rtt_p50_ms",
           "rtt_p99_ms", "loss_pct", "jitter_ms", "relays_active", "relays_draining",
           "desired", "allocations")


@dataclass
class Row:
    time_s: float
    phase: str
    phase_time_s: float
    users: int
    offered_pps: float
    rtt_p50_ms: float | None
    rtt_p99_ms: float | None
    loss_pct: float | None
    jitter_ms: float | None
    """Standard deviation of that second's echo delays (the table's jitter)."""
    relays_active: int
    relays_draining: int
    desired: int
    allocations: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile_ms(buckets: dict[int, int], percent: float) -> float | None:
    middle = percentile_middle_us(buckets, percent)
    return None if middle is None else round(middle / 1000, 3)


def std_ms(buckets: dict[int, int]) -> float | None:
    count = sum(buckets.values())
    if count < 2:
        return None
    mids = {i: sum(bucket_bounds(i)) / 2 for i in buckets}
    mean = sum(mids[i] * n for i, n in buckets.items()) / count
    variance = sum(n * (mids[i] - mean) ** 2 for i, n in buckets.items()) / count
    return round(math.sqrt(variance) / 1000, 3)


class PhaseRecorder:
    """Turns the Locust environment into one :class:`Row` per call of :meth:`sample`."""

    def __init__(self, phase: str, status: PoolStatus, offset: float) -> None:
        self.phase = phase
        self.status = status
        self.offset = offset
        """Seconds between the run's start and this phase's start."""
        self.rows: list[Row] = []
        self._buckets: dict[int, int] = {}
        self._sent = 0
        self._lost = 0
        self._requests = 0
        self._pump = 0
        self._elapsed = 0.0

    def sample(self, elapsed: float, environment: Any) -> Row:
        state = environment.turnstorm
        view = state.cumulative(live=True)
        media = total(view.media.values())
        buckets = dict(media.rtt.buckets)
        second = {i: n - self._buckets.get(i, 0) for i, n in buckets.items()}
        second = {i: n for i, n in second.items() if n > 0}
        sent, lost = media.sent - self._sent, media.lost - self._lost
        requests = environment.stats.total.num_requests
        pump = getattr(getattr(state, "pump", None), "sent", None)
        dt = max(elapsed - self._elapsed, 1e-3)
        packets = requests - self._requests
        if pump is not None:
            packets += pump - self._pump
            self._pump = pump
        else:
            packets += sent
        status = self.status
        row = Row(
            time_s=round(self.offset + elapsed, 3), phase=self.phase,
            phase_time_s=round(elapsed, 3), users=int(environment.runner.user_count),
            offered_pps=round(packets / dt, 1),
            rtt_p50_ms=percentile_ms(second, 50), rtt_p99_ms=percentile_ms(second, 99),
            loss_pct=round(min(100.0, max(0.0, 100.0 * lost / sent)), 3) if sent > 0 else None,
            jitter_ms=std_ms(second), relays_active=status.active,
            relays_draining=status.draining, desired=status.desired,
            allocations=status.allocations)
        self._buckets, self._sent, self._lost = buckets, media.sent, media.lost
        self._requests, self._elapsed = requests, elapsed
        self.rows.append(row)
        return row

"""Per-second time series of a run: the generator's figures of each second
(:class:`~turnstorm.loadgen.phaseio.GeneratorRow`, from the phase child) beside the
pool's (:class:`~turnstorm.localmode.control.PoolStatus`) at that moment.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from turnstorm.loadgen.phaseio import GeneratorRow
from turnstorm.localmode.control import PoolStatus

COLUMNS = ("time_s", "phase", "phase_time_s", "users", "offered_pps", "rtt_p50_ms",
           "rtt_p99_ms", "loss_pct", "jitter_ms", "relays_active", "relays_draining",
           "desired", "allocations")


@dataclass
class Row(GeneratorRow):
    """One second of a run: the generator's figures and the pool's."""

    time_s: float
    """Seconds since the run began (the phases one after the other)."""
    relays_active: int
    relays_draining: int
    desired: int
    allocations: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, generated: GeneratorRow, status: PoolStatus, offset: float) -> Row:
        """The generator's second, ``offset`` seconds after the run began, beside the
        pool's status now."""
        return cls(**asdict(generated), time_s=round(offset + generated.phase_time_s, 3),
                   relays_active=status.active, relays_draining=status.draining,
                   desired=status.desired, allocations=status.allocations)

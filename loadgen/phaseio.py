"""What the local mode's orchestrator and its phase child say to each other: typed
records, one JSON object a line.

The orchestrator (:mod:`turnstorm.localmode.run`) writes one :class:`PhaseJob` to the
child's stdin; the child (:mod:`turnstorm.loadgen.phase`, the only Locust process of a
phase) answers on stdout with a :class:`GeneratorRow` a second, then one
:class:`PhaseResult`, or one :class:`PhaseError` for a setting that cannot run. Locust-free,
so that the local mode reads them without importing Locust.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class PhaseJob:
    """One phase's storm, as the orchestrator asks for it."""

    phase: str
    config: dict[str, Any]
    """The :class:`~turnstorm.loadgen.config.LoadgenConfig` as
    :func:`~turnstorm.loadgen.config.config_to_dict` gives it (secret included)."""
    shape: str
    shape_params: dict[str, Any]
    duration: float
    users: int
    turn_weight: int
    binding_weight: int
    cgnat: list[Any] | None
    """GATEWAYS, QUOTA, TIMEOUT of the emulated CGNAT; None: none."""
    metrics_port: int | None
    workers: int
    web: int | None
    priority: int
    """The nice value the generator runs at (the relays' and the echo peer's too)."""


@dataclass
class GeneratorRow:
    """One second of the generator's own figures (the pool's columns are the
    orchestrator's: :class:`turnstorm.localmode.series.Row`)."""

    phase: str
    phase_time_s: float
    users: int
    offered_pps: float
    rtt_p50_ms: float | None
    rtt_p99_ms: float | None
    loss_pct: float | None
    jitter_ms: float | None
    """Standard deviation of that second's echo delays (the table's jitter)."""


@dataclass
class PhaseResult:
    """The phase's totals, once its storm has ended."""

    duration_s: float
    media: dict[str, Any]
    counters: dict[str, Any]
    send_lag_ms: dict[str, float]


@dataclass
class PhaseError:
    """A setting the child cannot run (exit code 2) or a storm that failed (1)."""

    message: str


Record = PhaseJob | GeneratorRow | PhaseResult | PhaseError
_KINDS: dict[str, type[Record]] = {"job": PhaseJob, "row": GeneratorRow,
                                    "result": PhaseResult, "error": PhaseError}
_NAMES = {cls: kind for kind, cls in _KINDS.items()}


def encode(record: Record) -> str:
    """One line: ``{"kind": ..., "data": {...}}`` and a newline."""
    return json.dumps({"kind": _NAMES[type(record)], "data": dataclasses.asdict(record)}) + "\n"


def decode(line: str) -> Record:
    """The record of one :func:`encode` line; ValueError for anything else."""
    try:
        message = json.loads(line)
        return _KINDS[message["kind"]](**message["data"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a phase record: {line.strip()[:200]!r} ({exc})") from None

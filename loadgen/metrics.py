"""Media and transaction metrics: exact-enough percentiles, RFC 3550 jitter, delay spread, loss.

Pure: no gevent, no clock. Every aggregate is mergeable (``merge``) and serializable
(``to_dict``/``from_dict``) so Locust workers can ship partial results to the master and
the master's merge equals one process having seen every sample.

Histogram layout (log-linear, like HdrHistogram with 3 significant digits): integer
microseconds below 2048 get one bucket each; each power-of-two range above is split into
1024 equal buckets, so a bucket is at most 1/1024 of its lower bound wide and a reported
percentile (the bucket middle) is within 0.05 % of the true sample (plus the 0.5 us of
rounding to whole microseconds).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SUB_BUCKETS = 1024
"""Linear buckets per power of two above the exact range."""
EXACT_LIMIT = 2 * SUB_BUCKETS
"""Values below this many microseconds are counted exactly."""
RELATIVE_ERROR = 1 / (2 * SUB_BUCKETS)
"""Largest relative error of a reported percentile (bucket half-width / bucket start)."""
PERCENTILES: dict[str, float] = {"p50": 50.0, "p95": 95.0, "p99": 99.0, "p999": 99.9}
"""The percentiles every report carries, by key."""
JITTER_GAIN = 16
"""RFC 3550 section 6.4.1: J += (|D| - J) / 16."""
REPLAY_WINDOW = 64
"""Sequence numbers behind the highest one still checked for duplicates."""
_WINDOW_MASK = (1 << REPLAY_WINDOW) - 1


def bucket_index(value_us: int) -> int:
    """The bucket holding a non-negative integer value (microseconds)."""
    if value_us < EXACT_LIMIT:
        return value_us
    shift = value_us.bit_length() - 11
    return shift * SUB_BUCKETS + (value_us >> shift)


def bucket_bounds(index: int) -> tuple[int, int]:
    """``(lowest, highest)`` integer value that falls in bucket ``index`` (inclusive)."""
    if index < EXACT_LIMIT:
        return index, index
    shift = index // SUB_BUCKETS - 1
    sub = index - shift * SUB_BUCKETS
    return sub << shift, ((sub + 1) << shift) - 1


def percentile_middle_us(buckets: Mapping[int, int], percent: float,
                         count: int | None = None) -> float | None:
    """Nearest-rank percentile of bucket counts: the middle (microseconds) of the bucket
    holding the ceil(p/100 * n)-th smallest sample; None when there is none. ``count``
    is the counts' sum, when known."""
    count = sum(buckets.values()) if count is None else count
    if count <= 0:
        return None
    rank = max(1, math.ceil(percent / 100 * count - 1e-9))
    seen = 0
    for index in sorted(buckets):
        seen += buckets[index]
        if seen >= rank:
            low, high = bucket_bounds(index)
            return (low + high) / 2
    return None


def percentile_ms(buckets: Mapping[int, int], percent: float) -> float | None:
    """:func:`percentile_middle_us` in milliseconds (3 decimals); None when empty."""
    middle = percentile_middle_us(buckets, percent)
    return None if middle is None else round(middle / 1000, 3)


def std_ms(buckets: Mapping[int, int]) -> float | None:
    """Standard deviation of bucket counts (bucket middles), milliseconds; None with
    fewer than two samples."""
    count = sum(buckets.values())
    if count < 2:
        return None
    mids = {i: sum(bucket_bounds(i)) / 2 for i in buckets}
    mean = sum(mids[i] * n for i, n in buckets.items()) / count
    variance = sum(n * (mids[i] - mean) ** 2 for i, n in buckets.items()) / count
    return round(math.sqrt(variance) / 1000, 3)


class Histogram:
    """A sparse, mergeable log-linear histogram of durations in microseconds."""

    __slots__ = ("buckets", "count", "max_us", "min_us", "total_us")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total_us = 0
        self.min_us = 0
        self.max_us = 0

    def record_us(self, value_us: float, count: int = 1) -> None:
        """Add ``count`` samples of ``value_us`` (negative values count as 0)."""
        value = round(value_us) if value_us > 0 else 0  # the hot path: no max()/min()
        index = value if value < EXACT_LIMIT else bucket_index(value)
        buckets = self.buckets
        buckets[index] = buckets.get(index, 0) + count
        if self.count == 0:
            self.min_us = self.max_us = value
        elif value < self.min_us:
            self.min_us = value
        elif value > self.max_us:
            self.max_us = value
        self.count += count
        self.total_us += value * count

    def add_counts(self, counts: Mapping[int, int], total_us: int, min_us: int,
                   max_us: int) -> None:
        """Add pre-bucketed samples: ``counts`` maps bucket index -> samples, with their
        exact sum, min and max (the hot path's bulk form of :meth:`record_us`)."""
        n = sum(counts.values())
        if not n:
            return
        buckets = self.buckets
        for index, c in counts.items():
            buckets[index] = buckets.get(index, 0) + c
        self.min_us = min_us if self.count == 0 else min(self.min_us, min_us)
        self.max_us = max(self.max_us, max_us)
        self.count += n
        self.total_us += total_us

    def record_seconds(self, seconds: float) -> None:
        self.record_us(seconds * 1e6)

    def percentile_us(self, percent: float) -> float:
        """Nearest-rank percentile: the bucket middle of the ceil(p/100 * n)-th smallest
        sample, clamped to the exact min and max. 0 for an empty histogram."""
        if not 0 <= percent <= 100:
            raise ValueError(f"percentile {percent} is outside 0-100")
        if self.count == 0:
            return 0.0
        middle = percentile_middle_us(self.buckets, percent, self.count)
        if middle is None:  # pragma: no cover - counts always add up to self.count
            return float(self.max_us)
        return float(min(max(middle, self.min_us), self.max_us))

    def percentile_ms(self, percent: float) -> float:
        return self.percentile_us(percent) / 1000

    @property
    def mean_us(self) -> float:
        return self.total_us / self.count if self.count else 0.0

    def summary_ms(self) -> dict[str, float]:
        """``{"p50": ..., "p95": ..., "p99": ..., "p999": ...}`` in milliseconds."""
        return {key: round(self.percentile_ms(p), 3) for key, p in PERCENTILES.items()}

    def merge(self, other: Histogram) -> None:
        if other.count == 0:
            return
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.min_us = other.min_us if self.count == 0 else min(self.min_us, other.min_us)
        self.max_us = max(self.max_us, other.max_us)
        self.count += other.count
        self.total_us += other.total_us

    def to_dict(self) -> dict[str, Any]:
        # JSON object keys must be strings; msgpack (Locust's wire format) keeps lists.
        return {"buckets": [[i, n] for i, n in sorted(self.buckets.items())],
                "count": self.count, "total_us": self.total_us,
                "min_us": self.min_us, "max_us": self.max_us}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        self = cls()
        self.buckets = {int(i): int(n) for i, n in data["buckets"]}
        self.count = int(data["count"])
        self.total_us = int(data["total_us"])
        self.min_us = int(data["min_us"])
        self.max_us = int(data["max_us"])
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Histogram) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


@dataclass
class RunningStats:
    """Count, mean and variance by Welford's method; ``merge`` is Chan et al.'s update."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)

    @property
    def variance(self) -> float:
        """Population variance (the spread of the samples we have, not an estimate)."""
        return self.m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    def merge(self, other: RunningStats) -> None:
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.m2 += other.m2 + delta * delta * self.count * other.count / total
        self.mean += delta * other.count / total
        self.count = total

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunningStats:
        return cls(int(data["count"]), float(data["mean"]), float(data["m2"]))


@dataclass
class Jitter:
    """RFC 3550 section 6.4.1 interarrival jitter of one stream, in the timestamps' unit.

    ``D(i-1, i) = (R_i - R_{i-1}) - (S_i - S_{i-1})`` in arrival order, and
    ``J += (|D| - J) / 16``.
    """

    value: float = 0.0
    samples: int = 0
    _last_transit: float | None = None

    def update(self, sent: float, received: float) -> float:
        transit = received - sent
        if self._last_transit is not None:
            d = abs(transit - self._last_transit)
            self.value += (d - self.value) / JITTER_GAIN
            self.samples += 1
        self._last_transit = transit
        return self.value


@dataclass
class SequenceTracker:
    """Loss, reordering and duplicates of one stream from its sequence numbers.

    A packet is *reordered* when it arrives after one with a higher number. Duplicates are
    detected within the last :data:`REPLAY_WINDOW` numbers (like an SRTP replay window).
    Loss is ``expected - received``: expected is what the sender reports as sent when it
    does, else ``highest - first + 1`` (RFC 3550 appendix A.3).
    """

    first: int | None = None
    highest: int = -1
    received: int = 0
    reordered: int = 0
    duplicates: int = 0
    sent: int | None = None
    _window: int = 0

    def on_packet(self, seq: int) -> bool:
        """Record ``seq``; False when it is a duplicate (then it counts for nothing else)."""
        if self.first is None:
            self.first = self.highest = seq
            self._window = 1
        elif seq > self.highest:
            shift = seq - self.highest
            self._window = ((self._window << shift) | 1) & _WINDOW_MASK
            self.highest = seq
        else:
            behind = self.highest - seq
            bit = 1 << behind if behind < REPLAY_WINDOW else 0
            if self._window & bit:
                self.duplicates += 1
                return False
            self._window |= bit
            self.reordered += 1
        self.received += 1
        return True

    @property
    def expected(self) -> int:
        if self.sent is not None:
            return self.sent
        return 0 if self.first is None else self.highest - self.first + 1

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.received)


@dataclass
class StreamStats:
    """One media stream's echo measurements: RTT histogram, jitter, delay spread, loss."""

    rtt: Histogram = field(default_factory=Histogram)
    delay: RunningStats = field(default_factory=RunningStats)
    jitter: Jitter = field(default_factory=Jitter)
    sequence: SequenceTracker = field(default_factory=SequenceTracker)
    received_bytes: int = 0

    def on_echo(self, seq: int, sent: float, received: float, size: int) -> None:
        """A packet sent at ``sent`` came back at ``received`` (seconds, same clock).

        The media pump calls this for every echo, so the common case is written out here:
        the next packet in order (:meth:`SequenceTracker.on_packet`), Welford's update
        (:meth:`RunningStats.add`) and the RFC 3550 jitter step (:meth:`Jitter.update`),
        each exactly as those methods do it."""
        sequence = self.sequence
        if seq == sequence.highest + 1 and sequence.first is not None:
            sequence._window = ((sequence._window << 1) | 1) & _WINDOW_MASK
            sequence.highest = seq
            sequence.received += 1
        elif not sequence.on_packet(seq):
            return
        rtt = received - sent
        self.rtt.record_us(rtt * 1e6)
        delay = self.delay
        count = delay.count + 1
        delay.count = count
        delta = rtt - delay.mean
        delay.mean += delta / count
        delay.m2 += delta * (rtt - delay.mean)
        jitter = self.jitter
        last = jitter._last_transit
        if last is not None:
            d = rtt - last if rtt >= last else last - rtt
            jitter.value += (d - jitter.value) / JITTER_GAIN
            jitter.samples += 1
        jitter._last_transit = rtt
        self.received_bytes += size


@dataclass
class MediaStats:
    """Everything measured for one target, mergeable across streams and processes.

    Jitter is per stream; the aggregate is the mean of the streams' final jitter weighted
    by their jitter sample counts.
    """

    rtt: Histogram = field(default_factory=Histogram)
    """Media echo RTT through the relay."""
    binding_rtt: Histogram = field(default_factory=Histogram)
    """Direct STUN Binding RTT to the same relay (the overhead baseline)."""
    delay: RunningStats = field(default_factory=RunningStats)
    jitter_weighted_s: float = 0.0
    jitter_samples: int = 0
    streams: int = 0
    sent: int = 0
    received: int = 0
    lost: int = 0
    reordered: int = 0
    duplicates: int = 0
    received_bytes: int = 0

    def add_stream(self, stream: StreamStats) -> None:
        """Fold a finished stream in (set ``stream.sequence.sent`` first for exact loss)."""
        seq = stream.sequence
        self.rtt.merge(stream.rtt)
        self.delay.merge(stream.delay)
        self.jitter_weighted_s += stream.jitter.value * stream.jitter.samples
        self.jitter_samples += stream.jitter.samples
        self.streams += 1
        self.sent += seq.expected
        self.received += seq.received
        self.lost += seq.lost
        self.reordered += seq.reordered
        self.duplicates += seq.duplicates
        self.received_bytes += stream.received_bytes

    def merge(self, other: MediaStats) -> None:
        self.rtt.merge(other.rtt)
        self.binding_rtt.merge(other.binding_rtt)
        self.delay.merge(other.delay)
        for name in _COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def jitter_ms(self) -> float:
        return self.jitter_weighted_s / self.jitter_samples * 1000 if self.jitter_samples else 0.0

    @property
    def loss_pct(self) -> float:
        return 100.0 * self.lost / self.sent if self.sent else 0.0

    @property
    def relay_overhead_ms(self) -> float | None:
        """Median media RTT through the relay minus median direct Binding RTT."""
        if not self.rtt.count or not self.binding_rtt.count:
            return None
        return self.rtt.percentile_ms(50) - self.binding_rtt.percentile_ms(50)

    def as_dict(self) -> dict[str, Any]:
        """The human report: milliseconds and percent, rounded to microseconds."""
        overhead = self.relay_overhead_ms
        return {
            "rtt_ms": self.rtt.summary_ms(),
            "rtt_mean_ms": round(self.rtt.mean_us / 1000, 3),
            "binding_rtt_ms": self.binding_rtt.summary_ms(),
            "jitter_ms": round(self.jitter_ms, 3),
            "delay_std_ms": round(self.delay.std * 1000, 3),
            "loss_pct": round(self.loss_pct, 3),
            "relay_overhead_ms": None if overhead is None else round(overhead, 3),
            "streams": self.streams,
            "packets": {"sent": self.sent, "received": self.received, "lost": self.lost,
                        "reordered": self.reordered, "duplicates": self.duplicates},
            "received_bytes": self.received_bytes,
        }

    def to_dict(self) -> dict[str, Any]:
        """Lossless form for shipping between processes (see :meth:`from_dict`)."""
        data: dict[str, Any] = {name: getattr(self, name) for name in _COUNTERS}
        data["rtt"] = self.rtt.to_dict()
        data["binding_rtt"] = self.binding_rtt.to_dict()
        data["delay"] = self.delay.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MediaStats:
        self = cls(rtt=Histogram.from_dict(data["rtt"]),
                   binding_rtt=Histogram.from_dict(data["binding_rtt"]),
                   delay=RunningStats.from_dict(data["delay"]))
        for name in _COUNTERS:
            setattr(self, name, type(getattr(self, name))(data[name]))
        return self


_COUNTERS = ("jitter_weighted_s", "jitter_samples", "streams", "sent", "received", "lost",
             "reordered", "duplicates", "received_bytes")


def merge_by_target(parts: Iterable[Mapping[str, Mapping[str, Any]]]) -> dict[str, MediaStats]:
    """Merge ``{target: MediaStats.to_dict()}`` maps from several processes."""
    merged: dict[str, MediaStats] = {}
    for part in parts:
        for target, data in part.items():
            merged.setdefault(target, MediaStats()).merge(MediaStats.from_dict(data))
    return merged


def total(stats: Iterable[MediaStats]) -> MediaStats:
    """One aggregate over several targets."""
    result = MediaStats()
    for item in stats:
        result.merge(item)
    return result

"""Media metrics: histogram percentiles and merge, RFC 3550 jitter, delay std, loss."""

from __future__ import annotations

import json
import math
import random

import pytest

from turnstorm.loadgen.metrics import (
    RELATIVE_ERROR,
    Histogram,
    Jitter,
    MediaStats,
    RunningStats,
    SequenceTracker,
    StreamStats,
    bucket_bounds,
    bucket_index,
    merge_by_target,
)


def exact_percentile(values: list[int], percent: float) -> int:
    ordered = sorted(values)
    rank = max(1, math.ceil(percent / 100 * len(ordered) - 1e-9))
    return ordered[rank - 1]


def test_jitter_matches_hand_computed_sequence() -> None:
    # sent 0, 20, 40, 60 ms; received 10, 32, 49, 75 ms -> transit 10, 12, 9, 15
    # D = 2, 3, 6
    # J1 = 0 + (2 - 0) / 16                 = 0.125
    # J2 = 0.125 + (3 - 0.125) / 16         = 0.3046875
    # J3 = 0.3046875 + (6 - 0.3046875) / 16 = 0.66064453125
    jitter = Jitter()
    values = [jitter.update(s, r) for s, r in ((0, 10), (20, 32), (40, 49), (60, 75))]
    assert values == [0.0, 0.125, 0.3046875, 0.66064453125]
    assert jitter.samples == 3


def test_delay_std_matches_hand_computed_sequence() -> None:
    # delays 10, 12, 9, 15: mean 11.5, squared deviations 2.25 + 0.25 + 6.25 + 12.25 = 21,
    # population variance 21 / 4 = 5.25
    stats = RunningStats()
    for value in (10, 12, 9, 15):
        stats.add(value)
    assert stats.mean == 11.5
    assert stats.variance == pytest.approx(5.25, abs=1e-12)
    assert stats.std == pytest.approx(2.29128784747792, abs=1e-12)


def test_running_stats_merge_equals_single_pass() -> None:
    rng = random.Random(7)
    values = [rng.gauss(40, 12) for _ in range(1001)]
    whole, left, right = RunningStats(), RunningStats(), RunningStats()
    for v in values:
        whole.add(v)
    for v in values[:300]:
        left.add(v)
    for v in values[300:]:
        right.add(v)
    left.merge(right)
    assert left.count == whole.count
    assert left.mean == pytest.approx(whole.mean, rel=1e-12)
    assert left.variance == pytest.approx(whole.variance, rel=1e-9)


def test_bucket_layout_is_contiguous_and_narrow() -> None:
    previous_high = -1
    for index in range(0, 40 * 1024):
        low, high = bucket_bounds(index)
        assert low == previous_high + 1
        assert bucket_index(low) == index
        assert bucket_index(high) == index
        assert high == low if index < 2048 else (high - low + 1) / low <= 1 / 1024
        previous_high = high


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_percentiles_within_stated_error(seed: int) -> None:
    rng = random.Random(seed)
    # log-normal RTTs from ~100 us to seconds, plus a spike cluster
    values = [round(rng.lognormvariate(9, 1.5)) for _ in range(20000)]
    values += [rng.randrange(400_000, 500_000) for _ in range(300)]
    hist = Histogram()
    for v in values:
        hist.record_us(v)
    for percent in (0, 1, 50, 90, 95, 99, 99.9, 100):
        exact = exact_percentile(values, percent)
        assert abs(hist.percentile_us(percent) - exact) <= exact * RELATIVE_ERROR + 0.5, percent
    assert hist.count == len(values)
    assert hist.min_us == min(values)
    assert hist.max_us == max(values)


def test_small_values_are_exact() -> None:
    hist = Histogram()
    for v in (5, 1, 3, 2, 4):
        hist.record_us(v)
    assert [hist.percentile_us(p) for p in (20, 40, 60, 80, 100)] == [1, 2, 3, 4, 5]
    assert hist.summary_ms() == {"p50": 0.003, "p95": 0.005, "p99": 0.005, "p999": 0.005}


def test_empty_histogram_and_bad_percentile() -> None:
    hist = Histogram()
    assert hist.percentile_us(99) == 0.0
    with pytest.raises(ValueError, match=r"^percentile 101 is outside 0-100$"):
        hist.percentile_us(101)


def test_merge_of_two_halves_equals_single_histogram() -> None:
    rng = random.Random(11)
    values = [rng.expovariate(1 / 30000) for _ in range(10000)]
    whole, first, second = Histogram(), Histogram(), Histogram()
    for v in values:
        whole.record_us(v)
    for v in values[:4321]:
        first.record_us(v)
    for v in values[4321:]:
        second.record_us(v)
    # ship one half through JSON as a worker would
    shipped = Histogram.from_dict(json.loads(json.dumps(second.to_dict())))
    first.merge(shipped)
    assert first == whole
    assert first.summary_ms() == whole.summary_ms()


def test_sequence_loss_reorder_duplicates() -> None:
    tracker = SequenceTracker()
    for seq in (0, 1, 3, 2, 2, 5, 6, 6):
        tracker.on_packet(seq)
    assert tracker.received == 6
    assert tracker.duplicates == 2
    assert tracker.reordered == 1
    assert tracker.expected == 7
    assert tracker.lost == 1  # 4 never arrived
    tracker.sent = 9  # the sender sent 0-8: 7 and 8 were lost at the tail
    assert tracker.lost == 3


def test_media_stats_aggregate_and_roundtrip() -> None:
    stream = StreamStats()
    for seq, (sent, received) in enumerate(((0.0, 0.010), (0.020, 0.032), (0.040, 0.049))):
        stream.on_echo(seq, sent, received, 640)
    stream.sequence.sent = 4
    media = MediaStats()
    media.add_stream(stream)
    for rtt in (0.004, 0.005, 0.006):
        media.binding_rtt.record_seconds(rtt)
    report = media.as_dict()
    # 10000 us lies in bucket 10000-10007 (reported by its middle); 5000 in 5000-5003
    assert report["rtt_ms"]["p50"] == 10.004
    assert report["binding_rtt_ms"]["p50"] == 5.002
    assert report["relay_overhead_ms"] == 5.002
    # jitter: D = 2 ms then 3 ms -> 0.125 ms, then 0.3046875 ms over 2 samples
    assert report["jitter_ms"] == pytest.approx(0.305, abs=1e-3)
    assert report["loss_pct"] == 25.0
    assert report["packets"] == {"sent": 4, "received": 3, "lost": 1, "reordered": 0,
                                 "duplicates": 0}
    assert report["received_bytes"] == 1920
    shipped = json.loads(json.dumps({"turn:127.0.0.1:3478": media.to_dict()}))
    merged = merge_by_target([shipped, shipped])
    twice = merged["turn:127.0.0.1:3478"].as_dict()
    assert twice["packets"]["sent"] == 8
    assert twice["rtt_ms"] == report["rtt_ms"]
    assert twice["jitter_ms"] == report["jitter_ms"]
    assert twice["delay_std_ms"] == report["delay_std_ms"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stream_on_echo_equals_its_parts(seed: int) -> None:
    """The pump's hot path (one method) gives exactly what the separate steps give, on
    echoes in order, lost, reordered and duplicated."""

    rng = random.Random(seed)
    echoes: list[tuple[int, float, float]] = []
    for seq in range(2000):
        sent = seq * 0.02
        if rng.random() < 0.02:
            continue  # lost
        echoes.append((seq, sent, sent + 0.03 + rng.expovariate(200)))
        if rng.random() < 0.01:
            echoes.append(echoes[-1])  # duplicated
    for i in range(0, len(echoes) - 1, 37):
        echoes[i], echoes[i + 1] = echoes[i + 1], echoes[i]  # reordered
    stream = StreamStats()
    sequence, delay, jitter, rtt = SequenceTracker(), RunningStats(), Jitter(), Histogram()
    size = 0
    for seq, sent, received in echoes:
        stream.on_echo(seq, sent, received, 160)
        if sequence.on_packet(seq):
            rtt.record_us((received - sent) * 1e6)
            delay.add(received - sent)
            jitter.update(sent, received)
            size += 160
    assert stream.sequence == sequence
    assert (sequence.duplicates > 0 and sequence.reordered > 0 and sequence.lost > 0)
    assert stream.delay == delay and stream.jitter == jitter
    assert stream.rtt.buckets == rtt.buckets and stream.rtt.count == rtt.count
    assert stream.received_bytes == size

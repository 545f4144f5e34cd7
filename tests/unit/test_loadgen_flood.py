"""Bulk statistics of the flood path equal Locust's per-request logging."""

from __future__ import annotations

import os

os.environ.setdefault("LOCUST_SKIP_MONKEY_PATCH", "1")

from locust.stats import RequestStats

from turnstorm.loadgen.flood import log_bulk
from turnstorm.loadgen.metrics import Histogram, bucket_bounds


def test_log_bulk_equals_one_log_per_sample() -> None:
    samples_us = [90, 90, 450, 1999, 2500, 12_345, 150_000, 2_400_000]
    histogram = Histogram()
    for us in samples_us:
        histogram.record_us(us)
    bulk, single = RequestStats(), RequestStats()
    log_bulk(bulk, "STUN", "Binding", histogram.buckets, histogram.total_us,
             histogram.min_us, histogram.max_us, 1_000.5)
    for index, n in histogram.buckets.items():
        low, high = bucket_bounds(index)
        for _ in range(n):
            single.log_request("STUN", "Binding", (low + high) / 2000, 0)
    for ours, theirs in ((bulk.get("Binding", "STUN"), single.get("Binding", "STUN")),
                         (bulk.total, single.total)):
        assert ours.num_requests == theirs.num_requests == len(samples_us)
        assert dict(ours.response_times) == dict(theirs.response_times)
        assert ours.total_response_time == sum(samples_us) / 1000
        assert ours.min_response_time == 0.09 and ours.max_response_time == 2400.0
        assert ours.num_reqs_per_sec == {1000: len(samples_us)}
    # the exact histogram keeps what Locust rounds away
    assert histogram.percentile_us(50) == 1999


def test_histogram_add_counts_equals_record() -> None:
    values = [3, 3, 70, 4096, 5000, 99_999]
    one, bulk = Histogram(), Histogram()
    counts: dict[int, int] = {}
    for value in values:
        one.record_us(value)
        index = next(i for i in one.buckets if bucket_bounds(i)[0] <= value
                     <= bucket_bounds(i)[1])
        counts[index] = counts.get(index, 0) + 1
    bulk.add_counts(counts, sum(values), min(values), max(values))
    assert bulk == one

"""The native media engine's per-echo arithmetic equals StreamStats.on_echo exactly.

``turnstorm._mediapump.measure`` runs the engine's own C function for each echo, from
a given starting point, so every number the engine hands to a stream (sequence, loss,
reordering, duplicates, Welford delay, RFC 3550 jitter, bytes, RTT histogram) can be
compared with the pure-Python reference on the same samples.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import IN_CI
from turnstorm.loadgen.media import PUMP_ENV, load_stream, native_available, stream_state
from turnstorm.loadgen.metrics import StreamStats

try:
    from turnstorm import _mediapump
except ImportError:
    _mediapump = None  # type: ignore[assignment]

needs_native = pytest.mark.skipif(
    _mediapump is None and not IN_CI,
    reason="turnstorm._mediapump is not built (needs a C compiler and the Python headers; "
           "`pip install -e .` builds it)")


def test_native_engine_is_built_where_it_can_be() -> None:
    """CI has gcc and the Python headers: the engine must be built and in use there."""
    if _mediapump is None:
        if IN_CI:
            pytest.fail("turnstorm._mediapump was not built: the storm would run on the "
                        "pure-Python media pump")
        pytest.skip("turnstorm._mediapump is not built on this machine")
    if os.environ.get(PUMP_ENV) != "python":
        assert native_available()


def reference(start: StreamStats, echoes: list[tuple[int, float, float, int]]) -> StreamStats:
    stream = StreamStats()
    load_stream(stream, stream_state(start), (b"", 0, 0, 0))
    stream.rtt.merge(start.rtt)
    for seq, sent, received, size in echoes:
        stream.on_echo(seq, sent, received, size)
    return stream


def native(start: StreamStats, echoes: list[tuple[int, float, float, int]]) -> StreamStats:
    assert _mediapump is not None
    _, sent, errors, numbers, rtt = _mediapump.measure(stream_state(start), echoes)
    assert (sent, errors) == (0, 0)
    stream = StreamStats()
    stream.rtt.merge(start.rtt)
    load_stream(stream, numbers, rtt)
    return stream


def assert_same(a: StreamStats, b: StreamStats) -> None:
    assert stream_state(a) == stream_state(b)
    assert a.rtt.buckets == b.rtt.buckets
    assert (a.rtt.count, a.rtt.total_us, a.rtt.min_us, a.rtt.max_us) == (
        b.rtt.count, b.rtt.total_us, b.rtt.min_us, b.rtt.max_us)


@needs_native
def test_hand_computed_jitter_and_loss() -> None:
    # sent 0, 20, 40, 60 ms; received 10, 32, 49, 75 ms: transit 10, 12, 9, 15 ms,
    # J = 0.66064453125 ms after three differences (see test_loadgen_metrics); seq 2 lost
    echoes = [(0, 0.0, 0.010, 160), (1, 0.020, 0.032, 160), (3, 0.040, 0.049, 160),
              (4, 0.060, 0.075, 160)]
    stream = native(StreamStats(), echoes)
    assert stream.jitter.samples == 3
    assert stream.jitter.value == pytest.approx(0.00066064453125, rel=1e-12)
    stream.sequence.sent = 5
    assert stream.sequence.lost == 1 and stream.sequence.received == 4
    assert stream.rtt.min_us == 9000 and stream.rtt.max_us == 15000
    assert stream.received_bytes == 640


echo_lists = st.lists(
    st.tuples(st.integers(0, 300), st.floats(0, 100, allow_nan=False),
              st.floats(-0.001, 2.5, allow_nan=False), st.integers(12, 1400)),
    max_size=200)


@needs_native
@settings(max_examples=200, deadline=None)
@given(echo_lists, echo_lists)
def test_equals_on_echo_from_any_starting_point(
        before: list[tuple[int, float, float, int]],
        after: list[tuple[int, float, float, int]]) -> None:
    # arbitrary order, gaps, duplicates, jumps beyond the 64-packet window, negative
    # and multi-second RTTs; the second list continues from the first's state (a flow
    # handed from the hub's reader to the engine and back)
    to_echo = [(seq, sent, sent + rtt, size) for seq, sent, rtt, size in before]
    start = reference(StreamStats(), to_echo)
    assert_same(start, native(StreamStats(), to_echo))
    more = [(seq, sent, sent + rtt, size) for seq, sent, rtt, size in after]
    assert_same(reference(start, more), native(start, more))


@needs_native
@pytest.mark.parametrize("seed", range(5))
def test_long_reordered_stream(seed: int) -> None:
    rng = random.Random(seed)
    echoes = []
    for seq in range(5000):
        if rng.random() < 0.02:
            continue  # lost
        sent = seq * 0.02
        echoes.append((seq, sent, sent + rng.lognormvariate(-3.5, 0.6), 640))
        if rng.random() < 0.01:
            echoes.append(echoes[-1])  # duplicated
    for _ in range(100):  # reordered
        i = rng.randrange(len(echoes) - 3)
        echoes[i], echoes[i + 2] = echoes[i + 2], echoes[i]
    assert_same(reference(StreamStats(), echoes), native(StreamStats(), echoes))


@needs_native
def test_bad_starting_point_is_refused() -> None:
    assert _mediapump is not None
    with pytest.raises(TypeError):
        _mediapump.measure(("x",), [])
    with pytest.raises(ValueError):
        _mediapump.wake_lateness(0, 0.001)
    with pytest.raises(ValueError):
        _mediapump.RateBucket(0, 1)
    for lead in (float("nan"), float("inf"), -0.001):  # NaN once spun the thread forever
        with pytest.raises(ValueError):
            _mediapump.Engine(lead=lead)

"""The relay exporter's ``/proc/<pid>/stat`` reader against every line the kernel may
write (command names with spaces, parentheses and line breaks, older kernels' shorter
lines) and against lines it never writes (cut short, a field of another form, noise):
the CPU times of the first, "no data" (None) for the others, never an exception.

Counts are the CI's (deterministic: ``derandomize``): 300 examples of about 100 lines
each, every one checked, a few seconds in all."""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turnstorm.errors import TurnstormError
from turnstorm.relay.collector import RelayCollector
from turnstorm.relay.procfs import STAT_TIMES, parse_stat_cpu_seconds, read_cpu_seconds

EXAMPLES = 300
LINES = 20_000
KERNEL_FIELDS_AFTER_NAME = (13, 50)
"""A 6.x kernel writes 50 fields after the command name; old ones fewer, down to the
times."""
# Any character but NUL, and often the ones that confuse a split on spaces or ")".
NAMES = st.text(st.characters(exclude_characters="\x00") | st.sampled_from("() \n\t"),
                max_size=16)
NOT_COUNTERS = ["-1", "x", "1.5", "0x10", "+3", "\u0663", "\u00b2", "9" * 21, "1_0"]
"""Fields that are not an unsigned decimal the kernel writes."""
ULL = st.integers(0, 2**64 - 1)


def kernel_line(pid: int, name: str, state: str, times: tuple[int, int], count: int) -> str:
    fields = [state] + [str(index) for index in range(1, count)]
    for index, value in zip(STAT_TIMES, times, strict=True):
        fields[index] = str(value)
    return f"{pid} ({name}) " + " ".join(fields) + "\n"


def with_field(line: str, index: int, value: str) -> str:
    """``line`` with field ``index`` after the command name replaced."""
    head, _, tail = line.rpartition(")")
    fields = tail.split()
    fields[index] = value
    return head + ") " + " ".join(fields) + "\n"


def no_data_or_seconds(text: str, ticks: int) -> None:
    seconds = parse_stat_cpu_seconds(text, ticks)
    assert seconds is None or (math.isfinite(seconds) and seconds >= 0), (text, seconds)


def test_stat_lines_read_as_the_kernel_writes_them() -> None:
    checked = [0]

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(pid=st.integers(1, 2**22), name=NAMES, state=st.sampled_from("RSDZTtXIPW"),
           times=st.tuples(ULL, ULL), count=st.integers(*KERNEL_FIELDS_AFTER_NAME),
           ticks=st.sampled_from([100, 250, 1000, 1]), junk=st.sampled_from(NOT_COUNTERS),
           noise=st.text(max_size=40))
    def check(pid: int, name: str, state: str, times: tuple[int, int], count: int,
              ticks: int, junk: str, noise: str) -> None:
        line = kernel_line(pid, name, state, times, count)
        assert parse_stat_cpu_seconds(line, ticks) == (times[0] + times[1]) / ticks, line
        assert parse_stat_cpu_seconds(line, 0) is None
        for index in range(count):  # a field of another form: only the times matter
            expected = None if index in STAT_TIMES else (times[0] + times[1]) / ticks
            assert parse_stat_cpu_seconds(with_field(line, index, junk), ticks) == expected
        for end in range(len(line)):  # cut short anywhere
            no_data_or_seconds(line[:end], ticks)
        no_data_or_seconds(noise, ticks)
        no_data_or_seconds(f"{pid} ({noise}", ticks)
        checked[0] += count + len(line) + 4

    check()
    assert checked[0] >= LINES


def test_lines_the_kernel_never_writes_are_no_data() -> None:
    line = kernel_line(857, "turnserver", "S", (1, 1), 50)
    assert parse_stat_cpu_seconds(line, 100) == pytest.approx(0.02)
    for text in ("", "\n", "857", "857 (turnserver", "857 (turnserver) S 855",
                 "(turnserver) " + line.partition(") ")[2], "x" + line,
                 line.replace(" (", "(", 1), line.replace(") ", " ", 1)):
        assert parse_stat_cpu_seconds(text, 100) is None, text


@pytest.fixture
def odd_process(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real process whose command name holds a line break, spaces and parentheses."""
    binary = tmp_path / "r) (x\n) y"
    sleep = shutil.which("sleep")
    assert sleep is not None
    shutil.copy(sleep, binary)
    process = subprocess.Popen([str(binary), "30"])
    deadline = time.monotonic() + 5
    while Path(f"/proc/{process.pid}/comm").read_text() != "r) (x\n) y\n":
        assert time.monotonic() < deadline, "the copy of sleep did not start"
        time.sleep(0.01)
    yield process
    process.kill()
    process.wait()


def test_a_real_process_with_an_odd_name(odd_process: subprocess.Popen[bytes]) -> None:
    text = Path(f"/proc/{odd_process.pid}/stat").read_text()
    assert text.startswith(f"{odd_process.pid} (r) (x\n) y) ")
    assert read_cpu_seconds(odd_process.pid) >= 0
    snapshot = RelayCollector("odd", None, odd_process.pid, cache_seconds=0).snapshot()
    assert snapshot.cpu_seconds is not None and snapshot.cpu_seconds >= 0
    assert snapshot.errors == []


def test_an_unreadable_stat_line_is_an_error_of_the_exporter(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_text("42 (turnserver) S 1 42")
    with pytest.raises(TurnstormError) as caught:
        read_cpu_seconds(42, str(tmp_path))
    assert str(caught.value) == (f"process 42: no CPU times in {tmp_path}/42/stat (not the "
                                 "kernel's stat format)")
    with pytest.raises(TurnstormError) as caught:
        read_cpu_seconds(43, str(tmp_path))
    assert str(caught.value) == "process 43: No such file or directory"

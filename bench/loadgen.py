"""The load generator's capacity per process against a local coturn, with same-run baselines.

Runs ``python -m bench.loadgen [--quick]`` from the repository root (``--quick`` stays
under a minute). One real ``turnserver`` and one echo peer process on loopback; the
generator is this process (gevent-patched, as under Locust). Four figures:

(a) STUN Binding transactions/s per generator core through the Locust ``StunBindingUser``
    flood path (``flood_window``), CPU measured over the steady part of the run.
    Baseline: :func:`turnstorm.blast.run_binding_blast` (the fastest plain loop we have)
    in an unpatched subprocess, same duration. Goal >= 120,000.
(b) Concurrent paced media sessions at 50 packets/s per generator core: N calls through
    the relay (Allocate, permission, channel to the echo peer), paced by the pump
    ``TurnSessionUser`` runs: the native engine
    (:class:`~turnstorm.loadgen.media.NativeMediaPump`, one thread of C that sends the
    frames and reads and measures the echoes) where it is built, else the pure-Python
    :class:`~turnstorm.loadgen.media.MediaPump`, which is also measured for reference.
    Valid only with generator-induced loss 0 (refused sends + drops on our own sockets'
    receive queues), send-timing error p99 < 1 ms, and at least 99 % of the frames
    echoed (a relay that drops them leaves the generator less to receive). Sessions per
    core = N / generator CPU fraction (every thread of the process, kernel time
    included); N is 400 by default, what one coturn on the other CPU of a 2-core machine
    relays without loss. Baseline: the same calls paced by one greenlet per call sleeping
    between packets. Goal >= 1,000. All run
    with the generator on a core of its own (pinned, ``SCHED_FIFO``) and the relay and
    echo peer on the other CPUs, as on separate machines, when the machine allows it:
    sharing the two cores with a busy relay makes the timing error the scheduler's, not
    ours. Printed alongside: the timing floor (how late a thread doing nothing but wake
    up every millisecond on the same core is) and the time the hypervisor stole that core
    during the measurement, the part of the timing error no sender can remove.
(c) Idle subscribers held with keepalives in one process (:class:`KeepaliveCrowd`):
    every subscriber's keepalive answered from its own source 5-tuple, none
    outstanding. With the ``auto`` transport that is one socket per subscriber while the
    open-file limit allows, else the raw transport (one raw socket, subscribers as
    gateway ports, as a CGNAT's public side; needs root), which the limit does not cap.
    Baseline: ``StunBindingUser`` keepalive users (a greenlet and a client each): CPU
    per keepalive and memory per subscriber. Goal >= 50,000.
(d) CPU-seconds per relayed message against coturn's ``turnutils_uclient`` relaying the
    same number of messages (same sessions, length, 20 ms pacing) in the same run.
    Goal: ratio <= 1.0.

The last line is ``loadgen: worst ratio to goal <r> [<figure>] (goal 1.00 on every figure)
ok|short``.
"""

from __future__ import annotations

# isort: off
import locust  # noqa: F401 - first: the generator runs gevent-patched, as under Locust
# isort: on

import argparse
import contextlib
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import gevent
from gevent.pool import Pool

from turnstorm.loadgen.config import LoadgenConfig
from turnstorm.loadgen.keepalive import KeepaliveCrowd
from turnstorm.loadgen.media import (
    NATIVE_TICK,
    MediaPump,
    NativeMediaPump,
    native_available,
    wake_lateness,
)
from turnstorm.loadgen.metrics import Histogram, StreamStats
from turnstorm.loadgen.runner import run_locust, transactions
from turnstorm.loadgen.storm import start_echo_process
from turnstorm.loadgen.users import StunBindingUser
from turnstorm.loadgen.wire import MEDIA_HEADER, UdpClient, clock
from turnstorm.proto.credentials import Credentials
from turnstorm.relay.process import LocalRelay, loopback_relay_config
from turnstorm.relay.procfs import read_steal_seconds
from turnstorm.uri import parse_uri

GOALS = {"a": 120_000.0, "b": 1_000.0, "c": 50_000.0, "d": 1.0}
SERVER_EXTRA = ["no-stun-backward-compatibility", "response-origin-only-with-rfc5780"]
FRAME_INTERVAL = 0.020
FRAME_BYTES = 160
"""Media payload for (b)-(d): 20 ms of 64 kbit/s audio (the rate matters, not the size)."""
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None = None) -> float:
    """utime + stime of a process (this one by default)."""
    path = f"/proc/{pid or os.getpid()}/stat"
    with open(path, encoding="ascii") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def runqueue_wait() -> float:
    """Seconds this process's threads waited for a CPU so far (/proc/self/schedstat)."""
    total = 0
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/schedstat", encoding="ascii") as handle:
            total += int(handle.read().split()[1])
    return total / 1e9


def socket_drops(fds: list[int]) -> int:
    """Datagrams the kernel dropped at these sockets' receive queues (/proc/net/udp)."""
    inodes = {os.fstat(fd).st_ino for fd in fds}
    drops = 0
    with open("/proc/net/udp", encoding="ascii") as handle:
        next(handle)
        for line in handle:
            parts = line.split()
            if int(parts[9]) in inodes:
                drops += int(parts[12])
    return drops


@dataclass
class Figure:
    key: str
    label: str
    value: float
    goal: float
    higher_is_better: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def ratio_to_goal(self) -> float:
        if self.higher_is_better:
            return self.value / self.goal
        return self.goal / self.value if self.value else float("inf")


# -- (a) Binding flood ------------------------------------------------------------------------


BLAST_CODE = """
import json, sys
from turnstorm.blast import run_binding_blast
r = run_binding_blast(sys.argv[1], int(sys.argv[2]), duration=float(sys.argv[3]), window=256,
                      batch=32)
print(json.dumps({"tx": r.received, "cpu": r.cpu_seconds, "elapsed": r.elapsed,
                  "lost": r.lost}))
"""


def bench_binding(relay: LocalRelay, duration: float) -> Figure:
    done = subprocess.run([sys.executable, "-c", BLAST_CODE, relay.host, str(relay.port),
                           str(duration)], capture_output=True, text=True, check=True,
                          timeout=duration + 30)
    blast = json.loads(done.stdout)
    base = blast["tx"] / blast["cpu"]
    config = LoadgenConfig(targets=[parse_uri(f"turn:{relay.host}:{relay.port}")],
                           max_pps=1e7, flood_window=256)
    marks: list[tuple[float, float, int]] = []

    def progress(elapsed: float, environment: Any) -> None:
        marks.append((time.perf_counter(), cpu_seconds(),
                      environment.stats.get("Binding", "STUN").num_requests))

    result = run_locust(config, [StunBindingUser], users=1, spawn_rate=10,
                        duration=duration + 1, progress=progress, tick=0.5)
    (t0, c0, n0), (t1, c1, n1) = marks[1], marks[-1]
    per_core = (n1 - n0) / (c1 - c0)
    row = transactions(result.environment)["STUN Binding"]
    print(f"(a) baseline blast (unpatched loop): {blast['tx'] / blast['elapsed']:9.0f} tx/s, "
          f"{base:9.0f} tx/s per client core, lost {blast['lost']}")
    print(f"(a) Locust StunBindingUser flood:    {(n1 - n0) / (t1 - t0):9.0f} tx/s, "
          f"{per_core:9.0f} tx/s per generator core, failures {row['failures']}, "
          f"ratio to baseline x{per_core / base:.2f}")
    return Figure("a", "Binding tx/s per generator core", per_core, GOALS["a"])


# -- (b) paced media --------------------------------------------------------------------------


@dataclass
class Call:
    client: UdpClient
    channel: int
    stream: StreamStats = field(default_factory=StreamStats)


def open_calls(relay: LocalRelay, peer: tuple[str, int], count: int) -> list[Call]:
    calls: list[Call] = []

    def one(number: int) -> None:
        credentials = Credentials.ephemeral(relay.secret, f"bench{number}", time.time())
        client = UdpClient((relay.host, relay.port), credentials=credentials)
        client.allocate()
        client.create_permission(peer)
        channel, _ = client.channel_bind(peer)
        call = Call(client, channel)
        client.on_echo = call.stream.on_echo
        calls.append(call)

    pool = Pool(50)
    for number in range(count):
        pool.spawn(one, number)
    pool.join(raise_error=True)
    return calls


@dataclass
class MediaRun:
    sessions: int
    seconds: float
    cpu: float
    sent: int
    received: int
    send_errors: int
    drops: int
    lag: Histogram
    waited: float = 0.0
    """Seconds the process waited for a CPU (other processes on the machine) meanwhile."""

    @property
    def cpu_fraction(self) -> float:
        return self.cpu / self.seconds

    @property
    def generator_loss(self) -> int:
        return self.send_errors + self.drops

    def row(self, name: str) -> str:
        lag = self.lag
        return (f"{name:<34}{self.sessions:>6} sessions  cpu {self.cpu_fraction:6.1%}  "
                f"{self.sessions / self.cpu_fraction:7.0f}/core  lag p99 "
                f"{lag.percentile_ms(99):6.3f} ms (p50 {lag.percentile_ms(50):.3f}, p99.9 "
                f"{lag.percentile_ms(99.9):.3f})  sent {self.sent} echoed {self.received}  "
                f"generator loss {self.generator_loss}  waited for a CPU "
                f"{self.waited / self.seconds:.1%} of the time")


def reset_streams(calls: list[Call]) -> None:
    for call in calls:
        call.stream = StreamStats()
        call.client.on_echo = call.stream.on_echo


def pump_media(calls: list[Call], seconds: float, native: bool) -> MediaRun:
    """The product's pump: the native engine (``native``) or the pure-Python one."""
    reset_streams(calls)
    state = type("PumpState", (), {"send_lag": Histogram(), "limiter": None})()
    pump = NativeMediaPump(state) if native else MediaPump(state)
    fds = [call.client.sock.fileno() for call in calls]
    drops0 = socket_drops(fds)
    flows = [pump.add(call.client.sock, call.channel, FRAME_INTERVAL, FRAME_BYTES,
                      receiver=call.client, stream=call.stream)
             for call in calls]
    gevent.sleep(0.5)  # every flow is on the wheel; measure the steady state
    pump.sync()
    state.send_lag = Histogram()
    t0, c0, sent0, w0 = time.perf_counter(), cpu_seconds(), pump.sent, runqueue_wait()
    received0 = sum(call.stream.sequence.received for call in calls)
    gevent.sleep(seconds)
    pump.sync()
    t1, c1, sent1, w1 = time.perf_counter(), cpu_seconds(), pump.sent, runqueue_wait()
    received1 = sum(call.stream.sequence.received for call in calls)
    for flow in flows:
        pump.remove(flow)
    gevent.sleep(0.3)
    if isinstance(pump, NativeMediaPump):
        pump.close()
    return MediaRun(len(calls), t1 - t0, c1 - c0, sent1 - sent0, received1 - received0,
                    pump.send_errors, socket_drops(fds) - drops0, state.send_lag, w1 - w0)


def greenlet_media(calls: list[Call], seconds: float) -> MediaRun:
    """The baseline: one greenlet per call, sleeping until each packet is due."""
    reset_streams(calls)
    lag = [Histogram()]
    counts = {"sent": 0, "errors": 0}
    padding = bytes(FRAME_BYTES - MEDIA_HEADER.size)
    fds = [call.client.sock.fileno() for call in calls]
    drops0 = socket_drops(fds)
    stop_at = clock() + seconds + 0.5

    def talk(call: Call) -> None:
        next_send = clock()
        seq = 0
        while next_send < stop_at:
            delay = next_send - clock()
            if delay > 0:
                gevent.sleep(delay)
            now = clock()
            lag[0].record_us((now - next_send) * 1e6)
            call.client.send_channel(call.channel, MEDIA_HEADER.pack(seq, now) + padding)
            seq += 1
            counts["sent"] += 1
            next_send += FRAME_INTERVAL

    greenlets = [gevent.spawn(talk, call) for call in calls]
    gevent.sleep(0.5)
    lag[0] = Histogram()  # the steady state only
    t0, c0, sent0, w0 = time.perf_counter(), cpu_seconds(), counts["sent"], runqueue_wait()
    received0 = sum(call.stream.sequence.received for call in calls)
    gevent.sleep(seconds)
    t1, c1, sent1, w1 = time.perf_counter(), cpu_seconds(), counts["sent"], runqueue_wait()
    received1 = sum(call.stream.sequence.received for call in calls)
    gevent.joinall(greenlets)
    gevent.sleep(0.3)
    return MediaRun(len(calls), t1 - t0, c1 - c0, sent1 - sent0, received1 - received0,
                    counts["errors"], socket_drops(fds) - drops0, lag[0], w1 - w0)


def _threads(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


@contextlib.contextmanager
def own_core(others: list[int]) -> Iterator[str]:
    """Run this process as if on a machine of its own: pinned to the first CPU at
    ``SCHED_FIFO`` priority 10 (children reset to normal), every thread of ``others``
    (the relay, the echo peer) moved to the other CPUs. Restored afterwards. Yields what
    was done, or why not (one CPU, no CAP_SYS_NICE)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        yield "not isolated: one CPU for generator, relay and echo"
        return
    mine, rest = {cpus[0]}, set(cpus[1:])
    try:
        for pid in others:
            for tid in _threads(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(tid, rest)
        for tid in _threads(os.getpid()):
            os.sched_setaffinity(tid, mine)
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(10))
        done = (f"generator on CPU {cpus[0]} at SCHED_FIFO 10, relay and echo on CPUs "
                f"{','.join(map(str, sorted(rest)))} (as on separate machines)")
    except OSError as exc:
        done = f"not isolated ({exc.strerror or exc}): generator, relay and echo share CPUs"
    try:
        yield done
    finally:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        for pid in [os.getpid(), *others]:
            for tid in _threads(pid):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, set(cpus))


def bench_media(relay: LocalRelay, peer: tuple[str, int], sessions: int,
                seconds: float, others: list[int]) -> Figure:
    calls = open_calls(relay, peer, sessions)
    try:
        with own_core(others) as isolation:
            print(f"(b) {isolation}")
            base = greenlet_media(calls, seconds)
            print(base.row("(b) baseline greenlet per call"))
            python = pump_media(calls, seconds, native=False)
            print(python.row("(b) MediaPump (pure Python)"))
            if native_available():
                cpu = min(os.sched_getaffinity(0))
                floor = wake_lateness(min(seconds, 2.0), NATIVE_TICK)
                if floor is not None:
                    print(f"(b) timing floor: a thread waking every {NATIVE_TICK * 1e3:g} ms "
                          f"on CPU {cpu}, doing nothing else, is late by p50 "
                          f"{floor.percentile_ms(50):.3f} ms, p99 {floor.percentile_ms(99):.3f}"
                          f" ms, max {floor.max_us / 1e3:.3f} ms")
                stolen0 = read_steal_seconds(cpu)
                ours = pump_media(calls, seconds, native=True)
                stolen = read_steal_seconds(cpu) - stolen0
                print(ours.row("(b) NativeMediaPump (the default)"))
                print(f"(b) CPU {cpu} was stolen by the hypervisor for {stolen * 1e3:.0f} ms "
                      f"of the {ours.seconds:.1f} s measured (every frame due meanwhile "
                      "leaves late)")
            else:
                print("(b) the native engine is not built (turnstorm._mediapump): the "
                      "pure-Python pump is the product's pump here")
                ours = python
    finally:
        for call in calls:
            call.client.release_and_close(timeout=2)
    per_core = sessions / ours.cpu_fraction
    # Every echo must come back, or the generator did less receive work than the figure
    # claims (an overloaded relay drops them): a measurement condition, like the others.
    echoed = ours.received >= 0.99 * ours.sent
    valid = ours.generator_loss == 0 and ours.lag.percentile_ms(99) < 1.0 and echoed
    base_core = sessions / base.cpu_fraction
    print(f"(b) sessions per generator core: {per_core:.0f} (baseline {base_core:.0f}, "
          f"x{per_core / base_core:.2f}); conditions (generator loss 0, lag p99 < 1 ms, "
          f"relay echoed >= 99 % of the frames) {'met' if valid else 'NOT met'}")
    label = "paced media sessions per generator core"
    if not valid:
        label += f" (conditions not met; {per_core:.0f} measured)"
    return Figure("b", label, per_core if valid else 0.0, GOALS["b"])


# -- (c) idle subscribers ---------------------------------------------------------------------


def bench_idle(relay: LocalRelay, interval: float, baseline_users: int, count: int) -> Figure:
    config = LoadgenConfig(targets=[parse_uri(f"turn:{relay.host}:{relay.port}")],
                           binding_interval=interval, max_pps=1e6)
    rss0, c0 = rss_mb(), cpu_seconds()
    result = run_locust(config, [StunBindingUser], users=baseline_users,
                        spawn_rate=baseline_users * 4, duration=interval + 1.5)
    base_row = transactions(result.environment)["STUN Binding"]
    base_cpu = (cpu_seconds() - c0) / max(1, base_row["count"])
    base_mem = max(0.0, rss_mb() - rss0) / baseline_users * 1024
    print(f"(c) baseline StunBindingUser keepalives: {baseline_users} subscribers, "
          f"{base_row['count']} keepalives ({base_row['failures']} failed), "
          f"{base_cpu * 1e6:.0f} us CPU each, {base_mem:.1f} KB RSS per subscriber")
    rss0 = rss_mb()
    try:
        crowd = KeepaliveCrowd((relay.host, relay.port), count, interval)
    except OSError as exc:
        print(f"(c) cannot hold {count} subscribers here: {exc}")
        figure = Figure("c", "idle subscribers held per process", 0.0, GOALS["c"])
        figure.notes.append(str(exc))
        return figure
    print(f"(c) transport {crowd.transport}" + "".join(f"; {n}" for n in crowd.notes))
    try:
        opened = rss_mb()
        c0 = cpu_seconds()
        crowd.run(duration=interval * 1.2)
        gevent.sleep(1.0)
        cpu = cpu_seconds() - c0
        stats = crowd.stats
        held = count if (stats.unanswered == 0 and crowd.outstanding() == 0
                         and stats.answered >= count and stats.errors == 0) else 0
        crowd.take_rtts()
        per_keepalive = cpu / max(1, stats.sent)
        mem = max(0.0, opened - rss0) / count * 1024 * 1024
        print(f"(c) KeepaliveCrowd: {count} subscribers, {stats.sent} keepalives, answered "
              f"{stats.answered}, unanswered {stats.unanswered}, RTT p99 "
              f"{crowd.rtt.percentile_ms(99):.2f} ms, {per_keepalive * 1e6:.0f} us CPU each "
              f"(x{base_cpu / per_keepalive:.1f} less than baseline), RSS growth {mem:.0f} "
              f"bytes per subscriber, process RSS {rss_mb():.0f} MB")
    finally:
        crowd.close()
    return Figure("c", "idle subscribers held per process", float(held), GOALS["c"])


# -- (d) CPU per relayed message vs turnutils_uclient -----------------------------------------


def bench_cpu_per_message(relay: LocalRelay, peer: tuple[str, int], sessions: int,
                          messages: int) -> Figure:
    uclient = shutil.which("turnutils_uclient")
    if uclient is None:
        print("(d) turnutils_uclient not found (apt-get install coturn-utils or coturn)")
        return Figure("d", "CPU per relayed message vs turnutils_uclient", float("inf"),
                      GOALS["d"], higher_is_better=False)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [uclient, "-m", str(sessions), "-n", str(messages), "-l", str(FRAME_BYTES), "-z",
         str(int(FRAME_INTERVAL * 1000)), "-c", "-W", relay.secret, "-u", "benchuc", "-e",
         peer[0], "-r", str(peer[1]), "-p", str(relay.port), relay.host],
        capture_output=True, text=True, timeout=120, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    theirs_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    relayed = 0
    for line in done.stdout.splitlines():
        if "tot_recv_msgs=" in line and "msz" not in line:
            relayed = int(line.rsplit("tot_recv_msgs=", 1)[1].split(",")[0])
    c0 = cpu_seconds()
    calls = open_calls(relay, peer, sessions)
    state = type("PumpState", (), {"send_lag": Histogram(), "limiter": None})()
    pump = MediaPump(state)
    flows = [pump.add(call.client.sock, call.channel, FRAME_INTERVAL, FRAME_BYTES,
                      receiver=call.client)
             for call in calls]
    while any(flow.sent < messages for flow in flows):
        for flow in flows:
            if flow.sent >= messages:
                pump.remove(flow)
        gevent.sleep(0.005)
    for flow in flows:
        pump.remove(flow)
    gevent.sleep(0.3)
    ours_relayed = sum(call.stream.sequence.received for call in calls)
    for call in calls:
        call.client.release_and_close(timeout=2)
    ours_cpu = cpu_seconds() - c0
    theirs = theirs_cpu / max(1, relayed)
    ours = ours_cpu / max(1, ours_relayed)
    print(f"(d) turnutils_uclient: {relayed} messages relayed and back, {theirs_cpu:.2f} CPU-s, "
          f"{theirs * 1e6:.1f} us per message (exit {done.returncode})")
    print(f"(d) turnstorm generator: {ours_relayed} messages relayed and back, "
          f"{ours_cpu:.2f} CPU-s, {ours * 1e6:.1f} us per message; ratio {ours / theirs:.2f}")
    return Figure("d", "CPU per relayed message / turnutils_uclient's", ours / theirs,
                  GOALS["d"], higher_is_better=False)


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs (under a minute)")
    parser.add_argument("--sessions", type=int, default=400, help="media sessions for (b) "
                        "(default 400: what one coturn on the other CPU of a 2-core machine "
                        "relays without loss; beyond that the relay drops echoes and the "
                        "generator's share of the work shrinks)")
    parser.add_argument("--only", default="abcd", help="which figures to run (default abcd)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    sessions = args.sessions
    relay = LocalRelay(loopback_relay_config(
        min_port=20000, max_port=29999, user_quota=5000, total_quota=5000,
        extra=list(SERVER_EXTRA)), secrets.token_urlsafe(24))
    figures: list[Figure] = []
    with relay:
        echo, peer = start_echo_process()
        try:
            print(f"loadgen bench: coturn on {relay.host}:{relay.port}, echo peer "
                  f"{peer[0]}:{peer[1]}, {os.cpu_count()} CPUs shared by generator, relay "
                  f"and echo; {'quick' if quick else 'full'} mode", flush=True)
            if "a" in args.only:
                figures.append(bench_binding(relay, 3.0 if quick else 8.0))
            if "b" in args.only:
                others = [pid for pid in (relay.pid, echo.pid) if pid is not None]
                figures.append(bench_media(relay, peer, sessions, 3.0 if quick else 8.0,
                                           others))
            if "c" in args.only:
                figures.append(bench_idle(relay, 6.0 if quick else 15.0, 1000,
                                          60_000 if quick else 100_000))
            if "d" in args.only:
                figures.append(bench_cpu_per_message(relay, peer, 20, 100 if quick else 250))
        finally:
            echo.terminate()
            echo.wait(5)
    for figure in figures:
        comparison = ">=" if figure.higher_is_better else "<="
        print(f"({figure.key}) {figure.label}: {figure.value:.2f} (goal {comparison} "
              f"{figure.goal:g}) x{figure.ratio_to_goal:.2f} of goal")
    worst = min(figures, key=lambda f: f.ratio_to_goal)
    verdict = "ok" if worst.ratio_to_goal >= 1.0 else "short"
    print(f"loadgen: worst ratio to goal {worst.ratio_to_goal:.2f} [({worst.key}) "
          f"{worst.label} {worst.value:.2f}] (goal 1.00 on every figure) {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""STUN Binding transactions/s from one client process against a local coturn.

Runs ``python -m bench.binding [--quick]`` from the repository root. Starts a real
``turnserver`` on loopback, then measures in the same run:

* the baseline: a naive client (one blocking socket, stop-and-wait, our codec to encode
  and parse every message);
* the pipelined blast (:func:`turnstorm.blast.run_binding_blast`), ``--repeat`` times.

For each it prints tx/s, client and server CPU (% of one core), tx/s per client core
(tx/s divided by the client's CPU fraction: the headline, since client and server share
this machine's cores), RTT percentiles and losses; then the blast/baseline ratios. The
headline is the median over the blast runs, so one run disturbed by another process on a
shared machine does not decide it. The last line is the verdict against the goal.
"""

from __future__ import annotations

import argparse
import array
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable

from turnstorm.blast import BlastResult, percentiles, run_binding_blast
from turnstorm.proto import stun
from turnstorm.relay.process import LocalRelay, loopback_relay_config
from turnstorm.relay.procfs import read_cpu_seconds

GOAL = 120_000
"""Binding transactions/s per client core."""
SERVER_EXTRA = ["no-stun-backward-compatibility", "response-origin-only-with-rfc5780"]
"""Binding responses carry XOR-MAPPED-ADDRESS only (no MAPPED-ADDRESS, RESPONSE-ORIGIN):
what a modern deployment would send, and less per response for both sides."""


def naive_binding(host: str, port: int, *, duration: float, timeout: float = 1.0) -> BlastResult:
    """The baseline: one request at a time on a blocking socket, codec on both ends."""
    sent = lost = invalid = 0
    rtts = []
    clock = time.perf_counter_ns
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        sock.settimeout(timeout)
        cpu0 = time.process_time()
        start = clock()
        end = start + int(duration * 1e9)
        while clock() < end:
            request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
            sent_at = clock()
            sock.send(request.encode())
            sent += 1
            try:
                response = stun.parse(sock.recv(2048))
            except TimeoutError:
                lost += 1
                continue
            except stun.StunParseError:
                invalid += 1
                continue
            if (response.transaction_id != request.transaction_id
                    or response.message_class != stun.Class.RESPONSE):
                invalid += 1
                continue
            rtts.append(clock() - sent_at)
        elapsed = (clock() - start) / 1e9
        cpu = time.process_time() - cpu0
    return BlastResult(sent=sent, received=len(rtts), lost=lost, late=0, errors=0,
                       invalid=invalid, elapsed=elapsed, cpu_seconds=cpu,
                       rtt_us=percentiles(array.array("q", rtts)))


def measured(pid: int, run: Callable[[], BlastResult]) -> tuple[BlastResult, float]:
    """A run and the server's CPU use over it (fraction of one core)."""
    server0 = read_cpu_seconds(pid)
    result = run()
    return result, (read_cpu_seconds(pid) - server0) / result.elapsed


HEADER = (f"{'run':<24}{'tx/s':>9}{'client':>8}{'server':>8}{'tx/s/cl-core':>14}"
          f"{'p50 us':>9}{'p99 us':>9}{'lost':>7}")


def row(name: str, result: BlastResult, server: float) -> str:
    return (f"{name:<24}{result.tx_per_second:>9.0f}{result.cpu_fraction:>8.0%}"
            f"{server:>8.0%}{result.tx_per_cpu_second:>14.0f}"
            f"{result.rtt_us.get('p50', 0):>9.0f}{result.rtt_us.get('p99', 0):>9.0f}"
            f"{result.lost:>7}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.binding",
        description="STUN Binding transactions/s from one client process against a local coturn.")
    parser.add_argument("--quick", action="store_true", help="3 s runs (about 15 s in all)")
    parser.add_argument("--duration", type=float, help="seconds per run (default 10; 3 quick)")
    parser.add_argument("--repeat", type=int, default=3, help="blast runs (default 3)")
    parser.add_argument("--window", type=int, default=256, help="outstanding requests")
    parser.add_argument("--batch", type=int, default=32, help="requests per send (<= 64)")
    parser.add_argument("--sockets", type=int, default=1, help="client sockets")
    parser.add_argument("--relay-threads", type=int, default=1, help="coturn relay threads")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = loopback_relay_config(relay_threads=args.relay_threads, extra=list(SERVER_EXTRA))
    with LocalRelay(config, secret=os.urandom(16).hex()) as relay:
        host, port, pid = relay.host, relay.port, relay.pid
        assert pid is not None

        def blast(duration: float) -> BlastResult:
            return run_binding_blast(host, port, duration=duration, window=args.window,
                                     batch=args.batch, sockets=args.sockets)

        blast(min(1.0, args.duration))  # warm-up: coturn's first sessions, our imports
        print(f"binding: coturn on {host}:{port} (relay-threads {args.relay_threads}), "
              f"{os.cpu_count()} CPUs shared by client and server, {args.duration:g} s runs; "
              f"blast window {args.window}, batch {args.batch}, sockets {args.sockets}")
        print(HEADER)
        base, base_server = measured(pid, lambda: naive_binding(host, port,
                                                                 duration=args.duration))
        print(row("baseline stop-and-wait", base, base_server), flush=True)
        runs = []
        for index in range(args.repeat):
            result, server = measured(pid, lambda: blast(args.duration))
            runs.append(result)
            print(row(f"blast #{index + 1}" + ("" if result.gso else " (no GSO)"), result,
                      server), flush=True)
    per_core = statistics.median(result.tx_per_cpu_second for result in runs)
    rate = statistics.median(result.tx_per_second for result in runs)
    print(f"blast median: {rate:.0f} tx/s, {per_core:.0f} tx/s per client core")
    print(f"ratio blast/baseline: tx/s x{rate / base.tx_per_second:.2f}, "
          f"tx/s per client core x{per_core / base.tx_per_cpu_second:.2f}")
    verdict = "ok" if per_core >= GOAL else "short"
    print(f"binding: {per_core:.0f} tx/s per client core (goal >= {GOAL}) {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

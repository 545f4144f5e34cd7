"""``turnstorm storm``: Locust headless, in-process, against relays on loopback (or allowed).

Locust (and its gevent monkey-patching) is imported only when a storm actually runs, so
the rest of the CLI stays free of it.
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from turnstorm import ideal, options
from turnstorm.errors import TurnstormError
from turnstorm.loadgen.config import (
    DEFAULT_MAX_PPS,
    ConfigError,
    LoadgenConfig,
    SessionLength,
    parse_peer,
    parse_targets,
)
from turnstorm.loadgen.echoproc import start_echo_process
from turnstorm.loadgen.metrics import MediaStats, total
from turnstorm.probe import load_secret as read_secret
from turnstorm.uri import check_target

MAX_DURATION = 24 * 3600.0
MAX_WORKERS = 64
EXIT_NOTHING_MEASURED = 3
"""Exit status of a storm that measured nothing: no echoed media for a mix that makes
calls, no successful request for ``stun`` and ``idle`` (the table is still printed)."""
EXIT_INTERRUPTED = 130
CALL_MIXES = ("turn", "both", "ice")
"""The ``--mix`` values whose users make calls (and so need a peer and echo media)."""
SHAPE_PARAMS = {
    "steady": ("users", "spawn_rate"),
    "ramp": ("start_users", "end_users", "ramp_seconds"),
    "reconnect-storm": ("users", "storm_at", "fraction", "window", "drop_seconds"),
    "flash-crowd": ("base_users", "peak_users", "at_seconds", "rise_seconds",
                    "hold_seconds"),
    "diurnal": ("min_users", "max_users", "period"),
    "retransmit-amplification": ("base_users", "wave_users", "storm_at", "window",
                                 "no_backoff_fraction"),
}
"""Each shape's parameters, for ``--help`` (this module does not import Locust; a test
keeps it equal to :data:`turnstorm.loadgen.shapes.SHAPES`)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", action="append", required=True, metavar="URI",
                   help="relay to load, turn:HOST[:PORT] (repeatable; IP literals, UDP)")
    p.add_argument("--allow-target", action="append", default=[], metavar="ADDR|CIDR",
                   help="allow a non-loopback relay or peer you own (repeatable)")
    p.add_argument("--secret-file", metavar="FILE",
                   help="coturn static-auth-secret (TURN REST credentials); needed for TURN")
    p.add_argument("--peer", metavar="HOST:PORT",
                   help="UDP echo peer behind the relay (default: start one on 127.0.0.1)")
    p.add_argument("--mix", choices=("turn", "stun", "both", "idle", "ice"), default="turn",
                   help="users: TURN calls, STUN Binding floods, both, idle subscribers "
                        "with keepalives (--crowd-size per user) or ICE sessions "
                        "(default turn)")
    p.add_argument("--crowd-size", type=int, default=1000, metavar="N",
                   help="idle subscribers per user with --mix idle (default 1000)")
    p.add_argument("--crowd-transport", choices=("auto", "sockets", "raw"), default="auto",
                   help="idle subscribers' source 5-tuples: a socket each, or gateway ports "
                        "written into raw packets (root and a loopback relay; not capped "
                        "by the open-file limit); auto picks sockets while the limit allows "
                        "(default auto)")
    p.add_argument("--shape", default="steady",
                   help="load shape (default steady); its parameters, set with "
                        "--shape-param: " + "; ".join(
                            f"{name}: {', '.join(params)}"
                            for name, params in SHAPE_PARAMS.items()))
    p.add_argument("--shape-param", action="append", default=[], metavar="KEY=VALUE",
                   help="shape parameter, e.g. fraction=0.5 (repeatable)")
    p.add_argument("--users", type=int, default=10,
                   help="users for the steady shape and reconnect-storm (default 10)")
    p.add_argument("--spawn-rate", type=float, default=10.0,
                   help="users started per second for the steady shape (default 10)")
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds the storm lasts, at most 86400 (default 60)")
    p.add_argument("--max-pps", type=float, default=DEFAULT_MAX_PPS,
                   help=f"packets/s bound for the generator (default {DEFAULT_MAX_PPS:g})")
    p.add_argument("--session", default="uniform:10-30",
                   help="call length: fixed:S, uniform:A-B or exp:MEAN (default uniform:10-30)")
    p.add_argument("--binding-interval", type=float, default=0.0,
                   help="seconds between one STUN user's Bindings (0: flood), or between "
                        "an idle subscriber's keepalives with --mix idle (0: 20 s); "
                        "default 0")
    p.add_argument("--flood-window", type=int, default=0, metavar="N",
                   help="STUN flood users keep N Bindings in flight, batched (default 0: "
                        "one at a time)")
    p.add_argument("--cgnat", metavar="GATEWAYS:QUOTA:TIMEOUT",
                   help="put subscribers behind emulated CGNAT gateways on 127.100.0.x, "
                        "e.g. 4:64:120 (with --workers, each worker emulates its share "
                        "of the gateways)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on --listen-host:PORT while the storm runs "
                        "(with --workers, worker i serves PORT+1+i)")
    options.add_workers(p, "local distributed mode: a Locust master here and N worker "
                           "processes on loopback (default 0: users run in this process)")
    options.add_web(p, "serve Locust's web UI with the Media tab on --listen-host:PORT "
                       "(default 8089) while the storm runs")
    p.add_argument("--listen-host", default="127.0.0.1", metavar="ADDR",
                   help="address the metrics endpoint and the web UI bind (default "
                        "127.0.0.1; 0.0.0.0 in a pod, so Prometheus and users reach them)")
    p.add_argument("--out", metavar="DIR", help="write results.json and CSV files here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.duration <= MAX_DURATION:
        raise ConfigError(f"--duration must be between 0 and {MAX_DURATION:g} seconds")
    if args.users < 0 or not (math.isfinite(args.spawn_rate) and args.spawn_rate > 0):
        raise ConfigError("--users must be >= 0 and --spawn-rate a positive number")
    for option, port in (("--metrics-port", args.metrics_port), ("--web", args.web)):
        if port is not None:
            if not 0 < port < 65536:
                raise ConfigError(f"{option} must be between 1 and 65535")
            _check_port(option, _listen_host(args.listen_host), port)
    if not 0 <= args.workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be between 0 and {MAX_WORKERS}")
    targets = parse_targets(args.target, args.allow_target)
    if args.mix in CALL_MIXES and args.peer is None:
        remote = [str(t) for t in targets if not ipaddress.ip_address(t.host).is_loopback]
        if remote:
            raise ConfigError(f"{', '.join(remote)} is not on this host: give --peer IP:PORT, "
                              "an echo peer the relay can reach (the built-in one listens "
                              "on 127.0.0.1, which a remote relay cannot reach and a "
                              "secure one refuses)")
    secret = read_secret(args.secret_file) if args.secret_file else None
    if args.mix not in ("stun", "idle") and secret is None:
        raise ConfigError("TURN users need --secret-file (or use --mix stun)")
    shape_params = _shape_params(args.shape_param)
    peer = parse_peer(args.peer) if args.peer else None
    if peer is not None:
        check_target(peer[0], args.allow_target)
    cgnat = _cgnat(args.cgnat) if args.cgnat else None
    crowd_transport = args.crowd_transport
    if args.mix == "idle":
        from turnstorm.loadgen.keepalive import choose_transport

        # every user of a process holds its own crowd: size the check for all of them
        per_process = math.ceil(args.users / max(1, args.workers)) * args.crowd_size
        chosen = set()
        for target in targets:
            try:
                chosen.add(choose_transport(target.address, max(1, per_process),
                                            args.crowd_transport))
            except OSError as exc:
                raise ConfigError(f"--mix idle with {args.users} users of "
                                  f"{args.crowd_size} subscribers against {target}: "
                                  f"{exc}") from None
        if len(chosen) == 1:
            crowd_transport = chosen.pop()
    if args.out:
        _prepare_out(args.out)
    echo = None
    if peer is None and args.mix in ("turn", "both"):
        echo, peer = start_echo_process()
    try:
        config = LoadgenConfig(
            targets=targets, secret=secret, peer=peer,
            session_length=SessionLength.parse(args.session), max_pps=args.max_pps,
            binding_interval=args.binding_interval, flood_window=args.flood_window,
            crowd_size=args.crowd_size, crowd_transport=crowd_transport)
        result = _run_locust(args, config, shape_params, cgnat)
    finally:
        if echo is not None:
            echo.terminate()
            echo.wait(5)
    report = build_report(result, args)
    print_table(report)
    if args.out:
        write_outputs(args.out, report, result)
        print(f"results written to {args.out}", file=sys.stderr)
    if result.interrupted:
        print(f"interrupted after {result.elapsed:.1f} s: the figures cover the run so far",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.mix in CALL_MIXES:
        if not report["media_measured"]:
            print("no media was measured: " + _failure_summary(result), file=sys.stderr)
            return EXIT_NOTHING_MEASURED
    elif not any(entry["count"] > entry["failures"]
                 for entry in report["transactions"].values()):
        print("no request succeeded: " + _failure_summary(result), file=sys.stderr)
        return EXIT_NOTHING_MEASURED
    return 0


def _prepare_out(directory: str) -> None:
    """Fail before the run, not after it, when results cannot be written."""
    probe = os.path.join(directory, ".turnstorm-write-test")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w", encoding="utf8"):
            pass
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"--out {directory}: cannot write there: "
                          f"{exc.strerror or exc}") from None


def _check_port(option: str, host: str, port: int) -> None:
    """Fail before the run when ``option``'s listening port cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"{option} {port}: cannot listen on {host}:{port}: "
                              f"{exc.strerror or exc}") from None


def _failure_summary(result: Any) -> str:
    """The most frequent failure reasons Locust recorded (or a hint when none were)."""
    errors = sorted(result.environment.stats.errors.values(), key=lambda e: -e.occurrences)
    if not errors:
        return "no failure was recorded (no user started, or no call reached its media)"
    return "; ".join(f"{e.method} {e.name}: {e.error} (x{e.occurrences})"
                     for e in errors[:3])


def _run_locust(args: argparse.Namespace, config: LoadgenConfig,
                shape_params: dict[str, float], cgnat: Any) -> Any:
    # Locust first: it monkey-patches the process with gevent at import.
    from turnstorm.loadgen.iceuser import IceSessionUser
    from turnstorm.loadgen.keepalive import IdleSubscribersUser
    from turnstorm.loadgen.runner import run_locust
    from turnstorm.loadgen.shapes import make_shape
    from turnstorm.loadgen.users import StunBindingUser, TurnSessionUser

    mixes: dict[str, list[type[Any]]] = {"turn": [TurnSessionUser], "stun": [StunBindingUser],
                                         "both": [TurnSessionUser, StunBindingUser],
                                         "idle": [IdleSubscribersUser],
                                         "ice": [IceSessionUser]}
    classes = mixes[args.mix]
    shape = None
    if args.shape != "steady" or shape_params:
        params = {"duration": args.duration, **shape_params}
        if args.shape in ("steady", "reconnect-storm") and "users" not in params:
            params["users"] = args.users
        shape = make_shape(args.shape, **params)
        # the shape decides which share of the users does not back off
        config.no_backoff_fraction = float(getattr(shape, "no_backoff_fraction", 0.0))
    progress = None if args.quiet else _progress_printer()
    return run_locust(config, classes, duration=args.duration, users=args.users,
                      spawn_rate=args.spawn_rate, shape=shape, cgnat=cgnat, progress=progress,
                      metrics_port=args.metrics_port, workers=args.workers, web_port=args.web,
                      listen_host=_listen_host(args.listen_host))


def _listen_host(text: str) -> str:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"--listen-host {text!r} is not an IP address") from None
    return text


def _shape_params(items: list[str]) -> dict[str, float]:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--shape-param {item!r}: expected KEY=VALUE")
        try:
            params[key.strip().replace("-", "_")] = float(value)
        except ValueError:
            raise ConfigError(f"--shape-param {item!r}: {value!r} is not a number") from None
    return params


def _cgnat(text: str) -> Any:
    from turnstorm.loadgen.cgnat import DEFAULT_PORT_MIN, Population

    usage = f"--cgnat {text!r}: expected GATEWAYS:QUOTA:TIMEOUT, e.g. 4:64:120"
    parts = text.split(":")
    try:
        gateways, quota, timeout = int(parts[0]), int(parts[1]), float(parts[2])
    except (IndexError, ValueError):
        raise ConfigError(usage) from None
    if len(parts) != 3:
        raise ConfigError(usage)
    most = 65536 - DEFAULT_PORT_MIN
    if not 1 <= gateways <= 65536:
        raise ConfigError(f"{usage}; GATEWAYS must be between 1 and 65536")
    if not 1 <= quota <= most:
        raise ConfigError(f"{usage}; QUOTA (ports per gateway, from {DEFAULT_PORT_MIN}) "
                          f"must be between 1 and {most}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"{usage}; TIMEOUT (seconds a mapping lives unused) must be "
                          "a positive number")
    return Population.build(gateways, quota, timeout, hold=2.0)


def _progress_printer() -> Callable[[float, Any], None]:
    last = {"sent": 0, "t": 0.0}

    def show(elapsed: float, environment: Any) -> None:
        state = environment.turnstorm
        media = total(state.media.values())
        counters = state.counters
        stats = environment.stats.total
        rate = (stats.num_requests - last["sent"]) / max(elapsed - last["t"], 1e-9)
        last.update(sent=stats.num_requests, t=elapsed)
        # Finished calls are in ``media``; calls in progress report once a second through
        # Locust's MEDIA/echo entry (a per-interval mean RTT, rounded by Locust).
        echo = environment.stats.entries.get(("echo", "MEDIA"))
        live_p99 = echo.get_response_time_percentile(0.99) if echo and echo.num_requests else 0
        print(f"[{elapsed:5.0f} s] users {environment.runner.user_count:4d}  "
              f"req/s {rate:7.0f}  fail {stats.num_failures:5d}  "
              f"alloc ok {counters['allocations_ok']:4d} failed "
              f"{counters['allocations_failed']:4d}  media rtt p99 ~{live_p99:5.0f} ms  "
              f"loss {media.loss_pct:5.2f} %",
              file=sys.stderr, flush=True)

    return show


def build_report(result: Any, args: argparse.Namespace) -> dict[str, Any]:
    from turnstorm.loadgen.runner import transactions

    state = result.state
    media: MediaStats = total(state.media.values())
    summary = media.as_dict()
    counters = state.counters
    return {
        "rtt_ms": summary["rtt_ms"],
        "jitter_ms": summary["jitter_ms"],
        "delay_std_ms": summary["delay_std_ms"],
        "loss_pct": summary["loss_pct"],
        "relay_overhead_ms": summary["relay_overhead_ms"],
        "binding_rtt_ms": summary["binding_rtt_ms"],
        "allocations": {"ok": counters["allocations_ok"],
                        "failed": counters["allocations_failed"],
                        "released": counters["released"],
                        "release_failed": counters["release_failed"]},
        "cgnat": {"remaps": counters["cgnat_remaps"], "exhausted": counters["cgnat_exhausted"]},
        "retransmits": {"backoff": counters["retransmits_backoff"],
                        "no_backoff": counters["retransmits_no_backoff"]},
        "packets": summary["packets"],
        "media_measured": summary["packets"]["received"] > 0,
        "send_lag_ms": state.send_lag.summary_ms(),
        "transactions": transactions(result.environment),
        "targets": {key: stats.as_dict() for key, stats in state.media.items()},
        "run": {"duration_s": round(result.elapsed, 3), "shape": args.shape,
                "mix": args.mix, "users": args.users, "max_pps": args.max_pps,
                "workers": args.workers},
    }


def write_outputs(directory: str, report: dict[str, Any], result: Any) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "results.json"), "w", encoding="utf8") as handle:
            json.dump(report, handle, indent=2, sort_keys=True)
            handle.write("\n")
        with open(os.path.join(directory, "transactions.csv"), "w", newline="",
                  encoding="utf8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["type", "name", "count", "failures", "median_ms", "p95_ms",
                             "p99_ms", "avg_ms"])
            for entry in sorted(result.environment.stats.entries.values(),
                                key=lambda e: (e.method, e.name)):
                writer.writerow([entry.method, entry.name, entry.num_requests,
                                 entry.num_failures, entry.median_response_time,
                                 entry.get_response_time_percentile(0.95),
                                 entry.get_response_time_percentile(0.99),
                                 round(entry.avg_response_time, 3)])
        with open(os.path.join(directory, "media.csv"), "w", newline="",
                  encoding="utf8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["target", "rtt_p50_ms", "rtt_p95_ms", "rtt_p99_ms", "rtt_p999_ms",
                             "jitter_ms", "delay_std_ms", "loss_pct", "relay_overhead_ms",
                             "sent", "received"])
            for target, row in report["targets"].items():
                rtt = row["rtt_ms"]
                writer.writerow([target, rtt["p50"], rtt["p95"], rtt["p99"], rtt["p999"],
                                 row["jitter_ms"], row["delay_std_ms"], row["loss_pct"],
                                 row["relay_overhead_ms"], row["packets"]["sent"],
                                 row["packets"]["received"]])
    except OSError as exc:
        raise TurnstormError(f"cannot write results to {directory}: {exc.strerror}") from None


def print_table(report: dict[str, Any]) -> None:
    """The four figures next to the ideal column. Without a single echoed media packet
    the media figures read ``n/a`` (and OUTSIDE for a mix that makes calls), never 0."""
    rtt = report["rtt_ms"]
    overhead = report["relay_overhead_ms"]
    measured = report["media_measured"]
    calls = report["run"]["mix"] in CALL_MIXES
    missing = "n/a (no media)"
    rows = [
        ("latency (media RTT p50/p99)", f"{rtt['p50']:.2f} / {rtt['p99']:.2f} ms",
         ideal.LATENCY_P99.text, ideal.LATENCY_P99.met(rtt["p99"])),
        ("loss", f"{report['loss_pct']:.2f} %", ideal.LOSS.text,
         ideal.LOSS.met(report["loss_pct"])),
        ("jitter (delay std; RFC 3550)",
         f"{report['delay_std_ms']:.2f} ms; {report['jitter_ms']:.2f} ms",
         ideal.JITTER.text, ideal.JITTER.met(report["delay_std_ms"])),
        ("relay overhead", "n/a" if overhead is None else f"{overhead:.2f} ms",
         ideal.RELAY_OVERHEAD.text,
         overhead is not None and ideal.RELAY_OVERHEAD.met(overhead)),
    ]
    if not measured:
        rows = [(label, missing, bound, not calls) for label, _, bound, _ in rows]
    print(f"{'figure':<30}{'measured':>22}  {'ideal':<10}")
    for label, value, bound, ok in rows:
        print(f"{label:<30}{value:>22}  {bound:<10}{'' if ok else '  OUTSIDE'}")
    alloc = report["allocations"]
    print(f"allocations ok {alloc['ok']}, failed {alloc['failed']}, released "
          f"{alloc['released']}; packets {report['packets']['sent']} sent, "
          f"{report['packets']['received']} echoed")


def configure_logging() -> None:
    """Locust logs every user start at INFO; a storm shows its own progress instead."""
    import logging

    logging.getLogger("locust").setLevel(logging.WARNING)


def main_run(args: argparse.Namespace) -> int:
    configure_logging()
    started = time.monotonic()
    code = run(args)
    if not args.quiet:
        print(f"storm finished in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return code

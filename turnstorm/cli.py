"""The ``turnstorm`` command line.

Every subcommand prints one clear line on stderr and exits non-zero on bad input or an
unreachable server; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from turnstorm import __version__, options
from turnstorm.errors import TurnstormError
from turnstorm.proto.transaction import TransactionTimeout

T = TypeVar("T")
EXIT_ERROR = 1
EXIT_USAGE = 2


def _add_probe(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "probe",
        help="measure one STUN/TURN server: Binding RTT, Allocate, relayed echo RTT",
        description=(
            "Measure a STUN/TURN server: the direct Binding RTT, the Allocate latency "
            "(with the 401/nonce authentication), the echo RTT through a channel on the "
            "relay and the relay overhead (relayed minus direct). The allocation is "
            "released at the end. Targets outside loopback need --allow-target."
        ),
        epilog="example: turnstorm probe 'turn:127.0.0.1:3478?transport=udp' "
               "--secret-file secret.txt --json",
    )
    p.add_argument("uri", help="server URI: turn:HOST[:PORT][?transport=udp|tcp] (IP literal)")
    auth = p.add_argument_group("credentials (one of)")
    auth.add_argument("--secret-file", metavar="FILE",
                      help="shared secret of coturn's use-auth-secret (TURN REST credentials)")
    auth.add_argument("--user", help="long-term credential username")
    auth.add_argument("--password-file", metavar="FILE",
                      help="file holding the long-term credential password (kept off the "
                           "command line, where other users of the host can read it)")
    auth.add_argument("--password", help="long-term credential password (prefer "
                                         "--password-file)")
    p.add_argument("--peer", metavar="HOST:PORT",
                   help="UDP echo peer behind the relay (default: a built-in one on loopback)")
    p.add_argument("--samples", type=int, default=5,
                   help="Binding and echo round trips to take the median of (default 5)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to wait for each step (default 5)")
    p.add_argument("--allow-target", action="append", default=[], metavar="ADDR|CIDR",
                   help="allow a non-loopback server or peer (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run_probe)


def _run_probe(args: argparse.Namespace) -> int:
    from turnstorm.probe import load_secret, probe
    from turnstorm.proto.credentials import Credentials
    from turnstorm.uri import check_target, parse_host_port, parse_uri

    if args.timeout <= 0:
        raise TurnstormError("--timeout must be positive")
    uri = parse_uri(args.uri)
    check_target(uri.host, args.allow_target)
    peer = None
    if args.peer:
        try:
            peer = parse_host_port(args.peer)
        except ValueError as exc:
            raise TurnstormError(f"--peer {exc}") from None
        check_target(peer[0], args.allow_target)
    if args.password and args.password_file:
        raise TurnstormError("give either --password or --password-file, not both")
    password = load_secret(args.password_file) if args.password_file else args.password
    if args.secret_file:
        if args.user or password:
            raise TurnstormError("give either --secret-file or --user/--password, not both")
        credentials = Credentials.ephemeral(load_secret(args.secret_file), "turnstorm-probe",
                                            time.time())
    elif args.user and password:
        credentials = Credentials(args.user, password)
    else:
        raise TurnstormError("probe needs credentials: --secret-file FILE, or --user and "
                             "--password-file (or --password)")
    try:
        result = _asyncio_run(probe(uri, credentials, peer=peer, samples=args.samples,
                                    timeout=args.timeout))
    except TransactionTimeout as exc:
        raise TurnstormError(f"{uri}: no answer from the server ({exc})") from None
    if args.json:
        print(json.dumps(result.as_dict(), sort_keys=True))
    else:
        print(f"server          {result.uri}  ({result.software or 'unknown software'})")
        print(f"binding rtt     {result.binding_rtt_ms:9.3f} ms")
        print(f"allocate        {result.allocate_ms:9.3f} ms")
        print(f"relayed rtt     {result.relay_rtt_ms:9.3f} ms  via {result.relayed_address}"
              f" to {result.peer}")
        print(f"relay overhead  {result.relay_overhead_ms:9.3f} ms")
    return 0


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="reproduce the CGNAT storm locally: a fixed relay pool, then the autoscaled one",
        description=(
            "Run a scenario (one TurnPool and one LoadRun, the CRD schemas, in one YAML "
            "file) on this machine, no cluster needed: CPU-capped coturn relays on "
            "127.0.0.x with the rendered secure config, an echo peer, the relay signals, a "
            "local Prometheus if installed, the autoscaler with the process actuator and "
            "the Locust storm (headless). The storm runs twice with the same seed and "
            "shape: against a fixed pool at spec.replicas.min, then against the autoscaled "
            "pool. Live progress goes to stderr; the comparison table to stdout; "
            "report.json, timeseries.csv and PNG plots to --out. Needs root (relay cgroups) "
            "and coturn. Ctrl-C stops every child process."
        ),
        epilog="example: sudo turnstorm run scenarios/default.yaml --out turnstorm-out",
    )
    p.add_argument("scenario", nargs="?", metavar="SCENARIO.yaml",
                   help="scenario file (default: scenarios/default.yaml of the source tree, "
                        "sized for a 2-core machine, about 3 minutes)")
    p.add_argument("--out", default="turnstorm-out", metavar="DIR",
                   help="directory for report.json, timeseries.csv and the PNG plots "
                        "(default ./turnstorm-out)")
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help="bound each phase to this many seconds (default: the LoadRun's "
                        "spec.durationSeconds)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the simulated subscribers; both phases use it (default 1)")
    options.add_workers(p, "spread the users over N local Locust worker processes (default "
                           "0: all in the one generator process; the CGNAT emulation needs 0)")
    options.add_web(p, "serve the Locust web UI with the Media tab on 127.0.0.1:PORT "
                       "(default 8089) during each phase")
    p.add_argument("--time-scale", type=float, metavar="FACTOR",
                   help="run the autoscaler's clock FACTOR times faster than the wall "
                        "clock, so the TurnPool's periods, windows and drain deadline fit a "
                        "demo (default: the TurnPool annotation turnstorm.io/time-scale, "
                        "else 10)")
    p.add_argument("--phase", choices=("both", "fixed", "autoscaled"), default="both",
                   help="run both phases (default) or one of them")
    p.add_argument("--no-prometheus", action="store_true",
                   help="do not start a local Prometheus even if one is installed")
    p.add_argument("--plain", action="store_true",
                   help="plain progress lines even on a terminal")
    p.set_defaults(func=_run_local)


def _run_local(args: argparse.Namespace) -> int:
    from turnstorm.localmode.run import Options, default_scenario, run

    phases = ("fixed", "autoscaled") if args.phase == "both" else (args.phase,)
    return run(Options(scenario=args.scenario or default_scenario(), out=args.out,
                       duration=args.duration, seed=args.seed, workers=args.workers,
                       web=args.web, time_scale=args.time_scale,
                       prometheus=not args.no_prometheus, plain=args.plain, phases=phases))


def _add_render(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "render",
        help="print the Kubernetes objects the operator would create for a TurnPool",
        description=(
            "Validate a TurnPool YAML file (defaults and rules as the apiserver applies "
            "them) and print the objects the operator would own for it: ConfigMap with "
            "turnserver.conf, Services, Deployment, PodDisruptionBudget and, with "
            "--service-monitor, a ServiceMonitor. For review and GitOps. Files may hold "
            "several documents; non-TurnPool documents are skipped."
        ),
        epilog="example: turnstorm render examples/turnpool.yaml > pool-objects.yaml",
    )
    p.add_argument("file", help="YAML file with one or more TurnPool documents ('-' for stdin)")
    p.add_argument("--replicas", type=int, help="relay count to render (default: "
                   "spec.replicas.target)")
    p.add_argument("--namespace", help="namespace for objects without one (default: default)")
    p.add_argument("--exporter-image", help="image of the turnstorm exporter sidecar")
    p.add_argument("--service-monitor", action="store_true",
                   help="include the ServiceMonitor (as if the Prometheus operator's CRD exists)")
    p.set_defaults(func=_run_render)


def _run_render(args: argparse.Namespace) -> int:
    from turnstorm.operator.render import DEFAULT_EXPORTER_IMAGE, render_pool, to_yaml
    from turnstorm.spec import load_documents, turnpool_from_object

    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file, encoding="utf8") as handle:
                text = handle.read()
    except OSError as exc:
        raise TurnstormError(f"cannot read {args.file}: {exc.strerror}") from None
    documents = load_documents(text, args.file)
    pools = [d for d in documents if isinstance(d, dict) and d.get("kind") == "TurnPool"]
    if not pools:
        raise TurnstormError(f"{args.file}: no TurnPool document found")
    if args.replicas is not None and args.replicas < 0:
        raise TurnstormError("--replicas must be 0 or more")
    out = []
    for document in pools:
        spec = turnpool_from_object(document)  # checks metadata's types before it is read
        if args.namespace and not (document.get("metadata") or {}).get("namespace"):
            spec.namespace = args.namespace
        out += render_pool(spec, replicas=args.replicas,
                           exporter_image=args.exporter_image or DEFAULT_EXPORTER_IMAGE,
                           service_monitor_available=args.service_monitor)
    sys.stdout.write(to_yaml(out))
    return 0


def _add_operator(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "operator",
        help="run the Kubernetes operator (kopf) that owns TurnPools",
        description=(
            "Run the operator: for each TurnPool it renders and owns the coturn "
            "Deployment, Services, ConfigMap, PodDisruptionBudget and ServiceMonitor, "
            "and reports status. Credentials: in-cluster, else the kubeconfig."
        ),
    )
    p.add_argument("--namespace", help="watch one namespace (default: all)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster or ~/.kube/config)")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                   help="liveness endpoint URL (default http://0.0.0.0:8080/healthz)")
    p.add_argument("--exporter-image", help="image of the relay exporter sidecar")
    p.add_argument("--metrics-port", type=int, default=9642,
                   help="serve the operator's Prometheus metrics on this port (0: off; "
                        "default 9642)")
    p.set_defaults(func=_run_operator)


def _run_operator(args: argparse.Namespace) -> int:
    from turnstorm.operator.main import run

    run(namespace=args.namespace, liveness=args.liveness, kubeconfig=args.kubeconfig,
        exporter_image=args.exporter_image, metrics_port=args.metrics_port or None)
    return 0


def _asyncio_run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without
        return asyncio.run(coro)
    return uvloop.run(coro)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_probe,
    _add_run,
    _add_render,
    _add_operator,
]


def _add_storm(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from turnstorm.loadgen import storm

    p = sub.add_parser(
        "storm",
        help="run Locust headless against relays: TURN calls, Binding floods, CGNAT shapes",
        description=(
            "Load STUN/TURN relays with Locust users in this process, bounded by "
            "--duration and --max-pps, and report media RTT percentiles, jitter, loss and "
            "relay overhead next to the ideal column. Targets outside loopback need "
            "--allow-target."
        ),
        epilog="example: turnstorm storm --target turn:127.0.0.1:3478 --secret-file "
               "secret.txt --users 20 --duration 30 --out results/",
    )
    storm.add_arguments(p)
    p.set_defaults(func=storm.main_run)


SUBCOMMANDS.append(_add_storm)


def _add_exporter(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from turnstorm.relay import sidecar

    p = sub.add_parser(
        "exporter",
        help="serve a relay's live coturn and kernel UDP signals as Prometheus metrics",
        description=(
            "Relay exporter (sidecar sharing the relay's network namespace): reads "
            "allocations and sessions from coturn's admin CLI, UDP receive-buffer errors, "
            "socket drops and queues from /proc, and the relay's CPU with --pid, and "
            "serves them on /metrics. Metric names: see turnstorm.relay.collector."
        ),
        epilog="example: TURNSTORM_CLI_PASSWORD=... turnstorm exporter --cli 127.0.0.1:5766 "
               "--listen 0.0.0.0:9641",
    )
    sidecar.add_arguments(p)
    p.set_defaults(func=sidecar.main_run)


SUBCOMMANDS.append(_add_exporter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turnstorm",
        description="Reproduce CGNAT-scale storms against STUN/TURN relays and scale out of them.",
    )
    parser.add_argument("--version", action="version", version=f"turnstorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except TurnstormError as exc:
        print(f"turnstorm {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"turnstorm {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())

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

from turnstorm import __version__
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
    auth.add_argument("--password", help="long-term credential password")
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
    from turnstorm.client import parse_host_port
    from turnstorm.probe import load_secret, probe
    from turnstorm.proto.credentials import Credentials
    from turnstorm.uri import check_target, parse_uri

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
    if args.secret_file:
        if args.user or args.password:
            raise TurnstormError("give either --secret-file or --user/--password, not both")
        credentials = Credentials.ephemeral(load_secret(args.secret_file), "turnstorm-probe",
                                            time.time())
    elif args.user and args.password:
        credentials = Credentials(args.user, args.password)
    else:
        raise TurnstormError("probe needs credentials: --secret-file FILE, or --user and "
                             "--password")
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
        help="start a local coturn relay on loopback and probe it (no cluster needed)",
        description=(
            "Start a real coturn relay on 127.0.0.1 with turnstorm's secure rendered "
            "config and a fresh random shared secret, probe it over UDP and TCP through "
            "a local echo peer, print the figures and stop everything. (The CGNAT storm "
            "with autoscaling will run here too once the local storm mode lands.)"
        ),
    )
    p.add_argument("--samples", type=int, default=20,
                   help="round trips per measurement (default 20)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run_local)


def _run_local(args: argparse.Namespace) -> int:
    import secrets

    from turnstorm.localrelay import LocalRelay, loopback_relay_config
    from turnstorm.probe import probe
    from turnstorm.proto.credentials import Credentials
    from turnstorm.uri import ServerUri

    secret = secrets.token_urlsafe(24)
    relay = LocalRelay(loopback_relay_config(), secret)
    print(f"starting coturn on 127.0.0.1:{relay.port} ...", file=sys.stderr)
    results = {}
    with relay:
        for transport in ("udp", "tcp"):
            uri = ServerUri("turn", relay.host, relay.port, transport)
            credentials = Credentials.ephemeral(secret, "turnstorm-run", time.time())
            print(f"probing {uri} ...", file=sys.stderr)
            result = _asyncio_run(probe(uri, credentials, samples=args.samples))
            results[transport] = result.as_dict()
    if args.json:
        print(json.dumps(results, sort_keys=True))
        return 0
    print(f"{'metric':<22}{'udp':>12}{'tcp':>12}")
    for key, label in (("binding_rtt_ms", "binding rtt (ms)"), ("allocate_ms", "allocate (ms)"),
                       ("relay_rtt_ms", "relayed rtt (ms)"),
                       ("relay_overhead_ms", "relay overhead (ms)")):
        print(f"{label:<22}{results['udp'][key]:>12.3f}{results['tcp'][key]:>12.3f}")
    print("relay stopped; allocations released")
    return 0


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
    import yaml

    from turnstorm.operator.render import DEFAULT_EXPORTER_IMAGE, render_pool, to_yaml
    from turnstorm.spec import turnpool_from_object

    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file, encoding="utf8") as handle:
                text = handle.read()
    except OSError as exc:
        raise TurnstormError(f"cannot read {args.file}: {exc.strerror}") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise TurnstormError(f"{args.file}: not valid YAML: {exc}".splitlines()[0]) from None
    pools = [d for d in documents if isinstance(d, dict) and d.get("kind") == "TurnPool"]
    if not pools:
        raise TurnstormError(f"{args.file}: no TurnPool document found")
    if args.replicas is not None and args.replicas < 0:
        raise TurnstormError("--replicas must be 0 or more")
    out = []
    for document in pools:
        if args.namespace and not document.get("metadata", {}).get("namespace"):
            document.setdefault("metadata", {})["namespace"] = args.namespace
        spec = turnpool_from_object(document)
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
    p.set_defaults(func=_run_operator)


def _run_operator(args: argparse.Namespace) -> int:
    from turnstorm.operator.main import run

    run(namespace=args.namespace, liveness=args.liveness, kubeconfig=args.kubeconfig,
        exporter_image=args.exporter_image)
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
    from turnstorm import exporter

    p = sub.add_parser(
        "exporter",
        help="serve a relay's live coturn and kernel UDP signals as Prometheus metrics",
        description=(
            "Relay exporter (sidecar sharing the relay's network namespace): reads "
            "allocations and sessions from coturn's admin CLI, UDP receive-buffer errors, "
            "socket drops and queues from /proc, and the relay's CPU with --pid, and "
            "serves them on /metrics. Metric names: see turnstorm.exporter."
        ),
        epilog="example: TURNSTORM_CLI_PASSWORD=... turnstorm exporter --cli 127.0.0.1:5766 "
               "--listen 0.0.0.0:9641",
    )
    exporter.add_arguments(p)
    p.set_defaults(func=exporter.main_run)


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

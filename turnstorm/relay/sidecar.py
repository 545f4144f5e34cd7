"""``turnstorm exporter``: the relay exporter sidecar's command line.

Serves one relay's :class:`~turnstorm.relay.collector.RelayCollector` on ``/metrics``
(metric names in :mod:`turnstorm.relay.collector`) until SIGTERM or SIGINT.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Mapping
from typing import Any

from turnstorm.errors import TurnstormError
from turnstorm.relay.collector import DEFAULT_CACHE_SECONDS, Exporter, RelayCollector
from turnstorm.relay.coturncli import CoturnCli, CoturnCliError


def read_password(password_file: str | None, env: Mapping[str, str]) -> str:
    """The CLI password: from ``password_file`` (first line) or TURNSTORM_CLI_PASSWORD."""
    if password_file:
        try:
            with open(password_file, encoding="utf8") as handle:
                password = handle.readline().strip()
        except OSError as exc:
            raise TurnstormError(f"cannot read {password_file}: {exc.strerror}") from None
        if not password:
            raise TurnstormError(f"{password_file} is empty")
        return password
    password = env.get("TURNSTORM_CLI_PASSWORD", "")
    if not password:
        raise TurnstormError("the coturn CLI password is missing: give --cli-password-file "
                             "or set TURNSTORM_CLI_PASSWORD")
    return password


def serve(cli_address: tuple[str, int], password: str, listen: tuple[str, int], *,
          pid: int | None = None, relay: str | None = None,
          cache_seconds: float = DEFAULT_CACHE_SECONDS,
          stop: threading.Event | None = None, process: str | None = None) -> None:
    """Run the exporter until ``stop`` is set (or SIGTERM/SIGINT in the main thread)."""
    import signal

    cli = CoturnCli(cli_address[0], cli_address[1], password)
    try:
        cli.connect()  # fail fast on a wrong password; later outages only set up=0
    except CoturnCliError as exc:
        if "password" in str(exc):
            raise
    name = relay or os.environ.get("HOSTNAME") or socket.gethostname()
    collector = RelayCollector(name, cli, pid, cache_seconds=cache_seconds, process=process)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    with Exporter([collector], listen[0], listen[1]) as exporter:
        print(f"turnstorm exporter: serving {exporter.url} for relay {name!r}", flush=True)
        stop.wait()


def _address(text: str, option: str) -> tuple[str, int]:
    from turnstorm.uri import parse_host_port

    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise TurnstormError(f"{option} {exc}") from None


def add_arguments(parser: Any) -> None:
    """Options of ``turnstorm exporter`` (an argparse parser)."""
    parser.add_argument("--cli", required=True, metavar="HOST:PORT",
                        help="coturn admin CLI address (cli-ip:cli-port), e.g. 127.0.0.1:5766")
    parser.add_argument("--cli-password-file", metavar="FILE",
                        help="file holding the CLI password (default: env "
                             "TURNSTORM_CLI_PASSWORD)")
    parser.add_argument("--pid", type=int,
                        help="relay process id: adds CPU seconds and restricts socket "
                             "counters to its sockets (needs a shared pid namespace)")
    parser.add_argument("--process", metavar="NAME",
                        help="find the relay process by command name (e.g. turnserver) for "
                             "its CPU seconds: a pod whose containers share the process "
                             "namespace (shareProcessNamespace); socket counters stay the "
                             "whole network namespace's")
    parser.add_argument("--listen", default="0.0.0.0:9641", metavar="HOST:PORT",
                        help="where to serve /metrics (default 0.0.0.0:9641)")
    parser.add_argument("--relay", help="relay label (default: $HOSTNAME, the pod name)")
    parser.add_argument("--cache", type=float, default=DEFAULT_CACHE_SECONDS,
                        metavar="SECONDS",
                        help=f"reuse a collection this long (default {DEFAULT_CACHE_SECONDS:g})")


def main_run(args: Any) -> int:
    """``turnstorm exporter``: serve until SIGTERM/SIGINT."""
    if args.cache < 0:
        raise TurnstormError("--cache must be 0 or more")
    if args.pid is not None and not os.path.isdir(f"/proc/{args.pid}"):
        raise TurnstormError(f"--pid {args.pid}: no such process")
    if args.pid is not None and args.process is not None:
        raise TurnstormError("--pid and --process are exclusive")
    if args.process is not None and not re.fullmatch(r"[^/\s]{1,15}", args.process):
        raise TurnstormError(f"--process {args.process!r}: a command name is 1-15 "
                             "characters without '/' or spaces (as in /proc/<pid>/comm)")
    password = read_password(args.cli_password_file, os.environ)
    serve(_address(args.cli, "--cli"), password, _address(args.listen, "--listen"),
          pid=args.pid, relay=args.relay, cache_seconds=args.cache, process=args.process)
    return 0

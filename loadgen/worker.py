"""One local Locust worker process of ``turnstorm storm --workers N``.

    python -m turnstorm.loadgen.worker --master-port PORT --users MODULE:CLASS[,...] \\
        [--metrics-port PORT] [--dump FILE] < config.json

The :class:`~turnstorm.loadgen.config.LoadgenConfig` arrives as JSON on stdin (it holds
the shared secret, which must not show up in ``ps``). The worker connects to the master on
127.0.0.1, runs the users the master dispatches, ships its statistics and media
aggregates in Locust's reports and, when the master stops the test, sends one final
report at once (marked final) so the master knows it has every sample. ``--dump`` writes
everything this worker measured as JSON at that moment (tests compare it with the
master's merge). When the master's process dies, however it dies, the worker stops its
users (their calls release) and exits.
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import gevent
import locust  # noqa: F401 - first: it monkey-patches the process with gevent
from locust.env import Environment
from locust.event import Events

from turnstorm.lifeline import ParentWatch, bind_to_parent
from turnstorm.loadgen.cgnat import Gateway, Population
from turnstorm.loadgen.config import CGNAT_KEY, config_from_dict
from turnstorm.loadgen.exporter import attach, serve
from turnstorm.loadgen.users import FINAL_KEY, install


def load_class(spec: str) -> type[Any]:
    module, _, name = spec.partition(":")
    cls: type[Any] = getattr(importlib.import_module(module), name)
    return cls


def _once(action: Callable[[], None]) -> Callable[[], None]:
    done: list[bool] = []

    def run() -> None:
        if not done:
            done.append(True)
            action()

    return run


def _quit_when_gone(parent: ParentWatch, quit_runner: Callable[[], None]) -> None:
    while not parent.gone:
        gevent.sleep(1.0)
    quit_runner()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m turnstorm.loadgen.worker")
    parser.add_argument("--master-port", type=int, required=True)
    parser.add_argument("--users", required=True, help="comma-separated MODULE:CLASS")
    parser.add_argument("--metrics-port", type=int)
    parser.add_argument("--metrics-host", default="127.0.0.1")
    parser.add_argument("--prefix", help="REST username prefix of this worker's users")
    parser.add_argument("--dump", help="write this worker's cumulative report here when the "
                        "test stops")
    args = parser.parse_args(argv)
    parent = bind_to_parent()  # SIGTERM when the master's process dies, however it dies
    try:
        data = json.loads(sys.stdin.read())
    except ValueError:  # empty or cut short: the master died handing it over
        return 0
    if parent.gone:
        return 0
    gateways = data.pop(CGNAT_KEY, None)
    config = config_from_dict(data)
    if args.prefix:
        config.user_prefix = args.prefix
    classes = [load_class(spec) for spec in args.users.split(",")]
    environment = Environment(user_classes=classes, events=Events())  # type: ignore[no-untyped-call]
    state = install(environment, config)
    assert state is not None
    if gateways:
        state.cgnat = Population([Gateway(**gateway) for gateway in gateways])
    attach(environment)  # before the runner: it must see statistics before Locust resets them
    metrics = (serve(environment, args.metrics_port, args.metrics_host)
               if args.metrics_port else None)
    runner = environment.create_worker_runner("127.0.0.1", args.master_port)

    def final_report(**_kwargs: Any) -> None:
        setattr(environment, FINAL_KEY, True)
        runner._send_stats()  # at once, not at the next 3 s report tick
        if args.dump:
            view = state.cumulative(live=False)
            with open(args.dump, "w", encoding="utf8") as handle:
                json.dump({"media": {k: v.to_dict() for k, v in view.media.items()},
                           "counters": view.counters, "send_lag": view.send_lag.to_dict()},
                          handle)

    environment.events.test_stop.add_listener(final_report)  # type: ignore[no-untyped-call]
    # SIGTERM (the master's end, or its death: maybe more than once) or a new parent:
    # stop the users (their calls release) instead of waiting a minute for the master's
    # heartbeat
    quit_once = _once(runner.quit)
    gevent.signal_handler(signal.SIGTERM, quit_once)
    gevent.spawn(_quit_when_gone, parent, quit_once)
    try:
        runner.greenlet.join()
    finally:
        if metrics is not None:
            metrics.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run the users in-process with Locust's own runner (headless), bounded in time.

Import this module before kubernetes/kopf in any process that loads both: Locust
monkey-patches with gevent at import.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event
import locust  # noqa: F401 - first: it monkey-patches the process with gevent
from gevent import subprocess as gsubprocess
from locust.env import Environment
from locust.event import Events
from locust.runners import STATE_STOPPED

from turnstorm import children
from turnstorm.errors import TurnstormError
from turnstorm.loadgen.config import CGNAT_KEY, ConfigError, LoadgenConfig, config_to_dict
from turnstorm.loadgen.exporter import serve
from turnstorm.loadgen.users import LoadgenState, install
from turnstorm.loadgen.webui import install_media_tab
from turnstorm.relay.process import free_port

WORKER_START_TIMEOUT = 20.0
"""Seconds the master waits for its worker processes to connect."""
FINAL_REPORT_TIMEOUT = 15.0
"""Seconds the master waits, after stopping the users, for every worker's last report."""

Progress = Callable[[float, Any], None]
"""Called about once a second with (elapsed seconds, environment)."""


@dataclass
class RunResult:
    environment: Any
    state: LoadgenState
    elapsed: float
    interrupted: bool = False
    """Ctrl-C ended the run early; the figures cover the run until then."""


def run_locust(
    config: LoadgenConfig,
    user_classes: Sequence[type[Any]],
    *,
    duration: float,
    users: int = 1,
    spawn_rate: float = 1.0,
    shape: Any = None,
    cgnat: Any = None,
    progress: Progress | None = None,
    tick: float = 1.0,
    metrics_port: int | None = None,
    workers: int = 0,
    web_port: int | None = None,
    worker_dump_dir: str | None = None,
    listen_host: str = "127.0.0.1",
) -> RunResult:
    """Run ``user_classes`` for at most ``duration`` seconds (a shape may end it sooner).

    Without a shape, ``users`` are spawned at ``spawn_rate``. Users are stopped at the
    end, which releases their allocations (each user's call ends in its ``finally``).
    ``metrics_port`` serves the Prometheus endpoint on 127.0.0.1 while the run lasts
    (worker ``i`` serves ``metrics_port + 1 + i``). ``workers`` > 0 runs a Locust master in
    this process and that many worker processes on loopback; the result then holds the
    master's merge of every worker's final report. ``web_port`` serves Locust's web UI
    with the Media tab on 127.0.0.1. ``worker_dump_dir`` makes each worker write what it
    measured to ``worker-<i>.json`` there (for tests of the merge). ``listen_host`` is the
    address the metrics endpoints and the web UI bind (``0.0.0.0`` in a pod).
    """
    if duration <= 0:
        raise ValueError("duration must be positive")
    if workers and cgnat is not None and len(cgnat.gateways) < workers:
        raise ConfigError(f"--cgnat with --workers {workers} needs at least {workers} "
                          f"gateways (each worker emulates its own); got "
                          f"{len(cgnat.gateways)}")
    environment = Environment(user_classes=list(user_classes), shape_class=shape,
                              events=Events())  # type: ignore[no-untyped-call]
    state = install(environment, config)
    assert state is not None
    state.cgnat = None if workers else cgnat
    servers = []
    if metrics_port is not None:
        try:
            servers.append(serve(environment, metrics_port, listen_host))
        except OSError as exc:
            raise TurnstormError(f"cannot serve metrics on {listen_host}:{metrics_port}: "
                                 f"{exc.strerror or exc}") from None
    processes: list[Any] = []
    saved_argv = sys.argv
    runner: Any
    try:
        if workers:
            master_port = free_port()
            runner = environment.create_master_runner("127.0.0.1", master_port)
            processes = start_workers(config, user_classes, workers, master_port,
                                      metrics_port, worker_dump_dir, listen_host, cgnat)
            wait_for_workers(runner, processes, workers)
        else:
            runner = environment.create_local_runner()
        if web_port is not None:
            # Locust's web UI re-parses sys.argv with its own parser (for the "extra
            # options" of its start form): hide our command line from it for the run.
            saved_argv, sys.argv = sys.argv, sys.argv[:1]
            environment.create_web_ui(listen_host, web_port)
            install_media_tab(environment)
        started = time.monotonic()
        if shape is not None:
            shape.reset_time()
            runner.start_shape()
        else:
            runner.start(users, spawn_rate=spawn_rate)
        # The first Ctrl-C ends the run early: the users stop (their calls release) and
        # what was measured is reported. A second one, while stopping, aborts.
        stop = gevent.event.Event()
        on_interrupt = gevent.signal_handler(signal.SIGINT, stop.set)
        try:
            while True:
                elapsed = time.monotonic() - started
                if elapsed >= duration or (runner.state == STATE_STOPPED and elapsed > tick):
                    break
                if stop.wait(min(tick, duration - elapsed)):
                    print("interrupted: stopping the users...", file=sys.stderr, flush=True)
                    break
                if progress is not None:
                    progress(time.monotonic() - started, environment)
        finally:
            on_interrupt.cancel()
            if workers:
                stop_workers(runner, state, workers)
            runner.quit()
        elapsed = time.monotonic() - started
    finally:
        for process in processes:
            _end(process)
        if environment.web_ui is not None:
            if getattr(environment.web_ui, "server", None) is not None:
                environment.web_ui.stop()  # type: ignore[no-untyped-call]
            sys.argv = saved_argv
        for server in servers:
            server.stop()
    return RunResult(environment, state, elapsed, stop.is_set())


def start_workers(config: LoadgenConfig, user_classes: Sequence[type[Any]], count: int,
                  master_port: int, metrics_port: int | None,
                  dump_dir: str | None, listen_host: str = "127.0.0.1",
                  cgnat: Any = None) -> list[Any]:
    """``count`` worker processes; the config (with the secret) goes through stdin. The
    packet-rate bound is the whole run's: each worker gets ``max_pps / count``. With an
    emulated CGNAT, worker ``i`` emulates gateways ``i, i + count, ...`` (disjoint
    addresses: a worker's subscribers never share another worker's NAT state)."""
    specs = ",".join(f"{cls.__module__}:{cls.__qualname__}" for cls in user_classes)
    data = config_to_dict(config)
    data["max_pps"] = config.max_pps / count
    processes = []
    for index in range(count):
        if cgnat is not None:
            data[CGNAT_KEY] = [dataclasses.asdict(g.gateway)
                               for g in cgnat.gateways[index::count]]
        payload = json.dumps(data).encode()
        command = [sys.executable, "-m", "turnstorm.loadgen.worker",
                   "--master-port", str(master_port), "--users", specs,
                   "--prefix", f"{config.user_prefix}-w{index}-"]
        if metrics_port is not None:
            command += ["--metrics-port", str(metrics_port + 1 + index),
                        "--metrics-host", listen_host]
        if dump_dir is not None:
            command += ["--dump", os.path.join(dump_dir, f"worker-{index}.json")]
        # a session of its own: Ctrl-C reaches the master only, which stops the users
        # and collects every worker's final report (see run_locust)
        process = gsubprocess.Popen(command, stdin=gsubprocess.PIPE, start_new_session=True)
        process.stdin.write(payload)
        process.stdin.close()
        processes.append(process)
    return processes


def wait_for_workers(runner: Any, processes: list[Any], count: int) -> None:
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while len(runner.clients.ready) < count:
        dead = [p for p in processes if p.poll() is not None]
        if dead:
            raise TurnstormError(f"a load generator worker exited with code "
                                 f"{dead[0].returncode} before the run started")
        if time.monotonic() > deadline:
            raise TurnstormError(f"only {len(runner.clients.ready)} of {count} workers "
                                 f"connected within {WORKER_START_TIMEOUT:g} s")
        gevent.sleep(0.1)


def stop_workers(runner: Any, state: LoadgenState, count: int) -> None:
    """Stop the users everywhere and wait for every worker's final report."""
    runner.stop()
    deadline = time.monotonic() + FINAL_REPORT_TIMEOUT
    while len(state.finished_workers) < count and time.monotonic() < deadline:
        gevent.sleep(0.05)
    if len(state.finished_workers) < count:
        raise TurnstormError(f"only {len(state.finished_workers)} of {count} workers sent "
                             f"their final report within {FINAL_REPORT_TIMEOUT:g} s")


def _end(process: Any) -> None:
    children.stop(process)


def transactions(environment: Any) -> dict[str, dict[str, int]]:
    """Locust's request statistics as ``{"TYPE name": {"count", "failures"}}``."""
    return {
        f"{entry.method} {entry.name}": {"count": entry.num_requests,
                                         "failures": entry.num_failures}
        for entry in environment.stats.entries.values()
    }

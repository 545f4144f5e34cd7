"""``turnstorm run``: the storm against a fixed pool, then against the autoscaled pool.

Order of things: validate the scenario, check the prerequisites (coturn, cgroup
rights, Python packages), start the guard of :mod:`turnstorm.lifeline` (a run killed
outright, SIGKILL included, leaves no relay, cgroup, Prometheus or directory behind; the
echo peer and the phase's generator see their parent die and exit by themselves), start
the echo peer and, if installed, a local Prometheus;
then for each phase a fresh :class:`~turnstorm.relay.actuator.LocalPool` at the pool's minimum
size, the autoscaler loop (:mod:`turnstorm.localmode.control`) and the Locust storm
(:func:`turnstorm.loadgen.runner.run_locust`, same seed and shape both times). Every
child (relays and their cgroups, echo peer, Prometheus, Locust workers) is stopped on
the way out, on success, on a failure and on Ctrl-C/SIGTERM alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from turnstorm import children, lifeline
from turnstorm.errors import TurnstormError
from turnstorm.loadgen import phaseio
from turnstorm.localmode.report import IDEAL, PHASES, format_table, table_rows, write_report
from turnstorm.localmode.scenario import Scenario, ScenarioError, load_scenario
from turnstorm.relay.process import INSTALL_HINT, free_port

DEFAULT_OUT = "turnstorm-out"
PRIORITY = -10
"""Nice value of the load generator, the echo peer and the relays (as root): other work
on the machine must not skew the measurement. The relays' cgroup CPU caps stay the only
bound on them."""
MAX_PHASE_SECONDS = 3600.0


def default_scenario() -> str:
    """``scenarios/default.yaml`` of the source tree (the README's run command)."""
    return str(Path(__file__).resolve().parents[2] / "scenarios" / "default.yaml")


@dataclass
class Options:
    scenario: str
    out: str = DEFAULT_OUT
    duration: float | None = None
    seed: int = 1
    workers: int = 0
    web: int | None = None
    time_scale: float | None = None
    prometheus: bool = True
    plain: bool = False
    phases: tuple[str, ...] = PHASES


@dataclass
class Context:
    scenario: Scenario
    options: Options
    secret: str
    peer: tuple[str, int]
    workdir: str
    pool_metrics_port: int | None = None
    loadgen_metrics_port: int | None = None
    prometheus_url: str | None = None
    rows: list[Any] = field(default_factory=list)
    offset: float = 0.0


def preflight() -> None:
    """One line saying exactly what to install or how to run, when something is missing."""
    missing = [name for name in ("locust", "rich", "matplotlib", "prometheus_client")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise TurnstormError(f"missing Python packages ({', '.join(missing)}): "
                             "pip install 'turnstorm[loadgen]' matplotlib")
    if shutil.which("turnserver") is None and not os.access("/usr/bin/turnserver", os.X_OK):
        raise TurnstormError(f"turnserver not found: {INSTALL_HINT}")
    from turnstorm.relay.cgroup import CgroupError, detect

    try:
        hierarchy = detect()
    except CgroupError as exc:
        raise TurnstormError(f"CPU-capped relays need the cgroup cpu controller: {exc}"
                             ) from None
    if not os.access(hierarchy.root, os.W_OK):
        raise TurnstormError(f"CPU-capped relays need write access to {hierarchy.root}: run "
                             "as root (sudo turnstorm run ...)")


def check_options(options: Options) -> None:
    if options.duration is not None and not 0 < options.duration <= MAX_PHASE_SECONDS:
        raise TurnstormError(f"--duration must be between 0 and {MAX_PHASE_SECONDS:g} s")
    if not 0 <= options.workers <= 64:
        raise TurnstormError("--workers must be between 0 and 64")
    if options.web is not None and not 0 < options.web < 65536:
        raise TurnstormError("--web must be a port between 1 and 65535")
    if options.time_scale is not None and not 0 < options.time_scale <= 1000:
        raise TurnstormError("--time-scale must be between 0 and 1000")


def phase_seconds(options: Options, scenario: Scenario) -> float:
    if options.duration is None:
        return scenario.load.duration
    return min(options.duration, scenario.load.duration)


# -- children -------------------------------------------------------------------------------


def _stop(process: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    children.stop(process, timeout=timeout)


def start_prometheus(ctx: Context) -> subprocess.Popen[bytes] | None:
    """A local Prometheus scraping the relay and generator exporters (None if absent)."""
    binary = shutil.which("prometheus")
    if binary is None:
        return None
    ctx.pool_metrics_port = free_port("127.0.0.1")
    ctx.loadgen_metrics_port = free_port("127.0.0.1")
    port = free_port("127.0.0.1")
    directory = os.path.join(ctx.workdir, "prometheus")
    os.makedirs(directory)
    config = os.path.join(directory, "prometheus.yml")
    with open(config, "w", encoding="utf8") as handle:
        handle.write(
            "global: {scrape_interval: 2s, evaluation_interval: 2s}\n"
            "scrape_configs:\n"
            "  - job_name: turnstorm-relays\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{ctx.pool_metrics_port}']}}]\n"
            "  - job_name: turnstorm-loadgen\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{ctx.loadgen_metrics_port}']}}]\n")
    log = open(os.path.join(directory, "prometheus.log"), "wb")  # noqa: SIM115
    try:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={directory}/data",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    except OSError:
        log.close()
        ctx.pool_metrics_port = ctx.loadgen_metrics_port = None
        return None
    finally:
        log.close()
    ctx.prometheus_url = f"http://127.0.0.1:{port}"
    return process


def boost(pgid: int) -> None:
    """Raise the scheduling priority of every thread of process group ``pgid`` (best
    effort: needs root)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PGRP, pgid, PRIORITY)


def _wait_released(pool: Any, timeout: float = 3.0) -> None:
    """Give the relays a moment to drop the allocations the stopped users released."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sum(pool.allocations(name) for name in list(pool.relays)) == 0:
                return
        except TurnstormError:
            return
        time.sleep(0.2)


# -- one phase ------------------------------------------------------------------------------


def _phase_job(ctx: Context, phase: str, duration: float, targets: list[str]) -> phaseio.PhaseJob:
    from turnstorm.loadgen.config import LoadgenConfig, config_to_dict
    from turnstorm.uri import parse_uri

    plan, options = ctx.scenario.load, ctx.options
    config = LoadgenConfig(
        targets=[parse_uri(u) for u in targets], secret=ctx.secret, peer=ctx.peer,
        session_length=plan.session, max_pps=plan.max_pps,
        binding_interval=plan.binding_interval)
    return phaseio.PhaseJob(
        phase=phase, config=config_to_dict(config), shape=plan.shape,
        shape_params=dict(plan.shape_params), duration=duration, users=plan.users,
        turn_weight=plan.turn_weight, binding_weight=plan.binding_weight,
        cgnat=list(plan.cgnat) if plan.cgnat is not None and not options.workers else None,
        metrics_port=ctx.loadgen_metrics_port, workers=options.workers, web=options.web,
        priority=PRIORITY)


def run_phase(ctx: Context, phase: str, progress: Any) -> dict[str, Any]:
    from turnstorm.loadgen.rotation import shared_rotation
    from turnstorm.localmode.control import Controller
    from turnstorm.localmode.series import Row
    from turnstorm.policy import Autoscaler, StormOptions
    from turnstorm.relay.actuator import LocalPool

    scenario, options = ctx.scenario, ctx.options
    spec, plan = scenario.pool, scenario.load
    timing = scenario.timing(options.time_scale)
    duration = phase_seconds(options, scenario)
    rotation = shared_rotation()
    rotation.reset()
    overrides: dict[str, Any] = {
        "realm": spec.realm, "user_quota": spec.user_quota, "total_quota": spec.total_quota,
        "max_bps": spec.max_bps, "denied_peers": list(spec.denied_peers),
        # the echo peer on loopback is the one peer the relays must reach
        "allowed_peers": [*spec.allowed_peers, f"{ctx.peer[0]}/32"],
    }
    pool = LocalPool(secret=ctx.secret, cpus=spec.cpu_cores, min_port=spec.relay_port_min,
                     max_port=spec.relay_port_max, prefix=f"{phase}-relay",
                     relay_overrides=overrides,
                     metrics=(("127.0.0.1", ctx.pool_metrics_port)
                              if ctx.pool_metrics_port else None))
    autoscale = phase == "autoscaled" and spec.scaling.enabled
    result: dict[str, Any] | None = None
    rows: list[Row] = []
    with pool:
        for _ in range(spec.min_replicas):
            member = pool.start_relay()
            if member.pid is not None:
                boost(member.pid)
        autoscaler = Autoscaler(spec.scaling, spec.min_replicas, spec.max_replicas,
                                StormOptions.from_policy(spec.scaling))
        # The fixed pool spreads its calls (what a Service does); the autoscaled one
        # places them as its TurnPool's spec.scaling.placement says (spread by default).
        controller = Controller(pool, autoscaler, rotation, timing.interval_seconds,
                                timing.time_scale, apply=autoscale, on_new_relay=boost,
                                fill=spec.scaling.pack_fill if autoscale else None,
                                processes=max(1, options.workers))
        controller.publish()
        label = "fixed pool" if phase == "fixed" else "autoscaled pool"
        sizes = (f"{spec.min_replicas}-{spec.max_replicas} relays" if autoscale
                 else f"{spec.min_replicas} relay{'s' if spec.min_replicas != 1 else ''}")
        child = subprocess.Popen(
            [sys.executable, "-m", "turnstorm.loadgen.phase"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(phaseio.encode(_phase_job(ctx, phase, duration, pool.rotation())))
            child.stdin.close()
            progress.start_phase(f"{label} ({sizes} at {spec.cpu_cores:g} CPU)", duration)
            controller.start()
            started = time.monotonic()
            for line in child.stdout:
                record = phaseio.decode(line)
                if isinstance(record, phaseio.PhaseError):
                    raise ScenarioError(f"{scenario.path}: LoadRun {plan.name}: "
                                        f"{record.message}")
                if isinstance(record, phaseio.PhaseResult):
                    result = dataclasses.asdict(record)
                    continue
                if not isinstance(record, phaseio.GeneratorRow):
                    raise TurnstormError(f"the load generator of phase {phase} sent a "
                                         f"{type(record).__name__}")
                status = controller.status
                row = Row.of(record, status, ctx.offset)
                rows.append(row)
                progress.update(row, status, controller.events)
                if controller.error is not None:
                    break
            code = child.wait()
            if autoscale:
                # the calls have ended: let the drains already under way finish
                controller.finish_drains(max(3.0, 3 * timing.interval_seconds))
        finally:
            controller.stop()
            progress.end_phase()
            _stop(child, 15.0)
        if controller.error is not None:
            raise TurnstormError(f"the autoscaler loop failed: {controller.error}")
        if result is None:
            raise TurnstormError(f"the load generator of phase {phase} exited with code "
                                 f"{code} without a result")
        ctx.offset += time.monotonic() - started
        cut_by_scaling = pool.allocations_cut
        _wait_released(pool)
    ctx.rows.extend(rows)
    return {
        **result,
        "scaling": controller.summary(),
        "allocations_cut": cut_by_scaling,
        "allocations_cut_at_teardown": pool.allocations_cut - cut_by_scaling,
        "pool_events": list(pool.events),
        "autoscaled": autoscale,
    }


# -- the whole run ----------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(options: Options) -> int:
    scenario = load_scenario(options.scenario)
    check_options(options)
    preflight()
    from turnstorm.loadgen.echoproc import start_echo_process
    from turnstorm.loadgen.rotation import ROTATION_ENV, SEED_ENV, shared_rotation
    from turnstorm.localmode.progress import Progress

    progress = Progress(sys.stderr, rich=False if options.plain else None)
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.monotonic()
    started_wall = time.time()
    phases: dict[str, dict[str, Any]] = {}
    lifeline.arm()  # killed outright, this process still leaves nothing behind
    stack = contextlib.ExitStack()
    stack.callback(lifeline.disarm)
    try:
        workdir = tempfile.mkdtemp(prefix="turnstorm-run-")
        lifeline.track("dir", workdir)  # and the local Prometheus, which names it
        stack.callback(lifeline.untrack, workdir)
        stack.callback(shutil.rmtree, workdir, True)
        rotation_file = os.path.join(workdir, "rotation.json")
        os.environ[ROTATION_ENV] = rotation_file
        os.environ[SEED_ENV] = str(options.seed)
        shared_rotation().path = rotation_file
        echo, peer = start_echo_process()
        stack.callback(_stop, echo)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, echo.pid, PRIORITY)
        import secrets

        ctx = Context(scenario, options, secrets.token_urlsafe(24), peer, workdir)
        if options.prometheus:
            prometheus = start_prometheus(ctx)
            if prometheus is not None:
                stack.callback(_stop, prometheus)
                progress.line(f"local Prometheus on {ctx.prometheus_url} (scraping the relay "
                              "and generator exporters)")
        timing = scenario.timing(options.time_scale)
        progress.line(
            f"scenario {scenario.path}: TurnPool {scenario.pool.name} "
            f"({scenario.pool.min_replicas}-{scenario.pool.max_replicas} relays, "
            f"{scenario.pool.cpu_cores:g} CPU each), LoadRun {scenario.load.name} "
            f"({scenario.load.shape}, {scenario.load.users} users); policy clock x"
            f"{timing.time_scale:g}, evaluated every {timing.interval_seconds:g} s")
        for phase in options.phases:
            phases[phase] = run_phase(ctx, phase, progress)
    finally:
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            stack.close()
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous_term)
    rows = table_rows(phases)
    report = {
        "scenario": {"file": scenario.path, "turnpool": scenario.documents["TurnPool"],
                     "loadrun": scenario.documents["LoadRun"]},
        "options": {"seed": options.seed, "phase_seconds": phase_seconds(options, scenario),
                    "workers": options.workers, "time_scale": timing.time_scale,
                    "interval_seconds": timing.interval_seconds},
        "ideal": IDEAL,
        "phases": phases,
        "table": rows,
        "prometheus_url": ctx.prometheus_url,
        "started_unix": round(started_wall, 3),
        "duration_s": round(time.monotonic() - started, 3),
    }
    title = (f"turnstorm run {os.path.basename(scenario.path)}: "
             f"{scenario.load.shape}, {scenario.load.users} users, relays at "
             f"{scenario.pool.cpu_cores:g} CPU")
    write_report(options.out, report, ctx.rows, title)
    print(format_table(rows))
    print(f"report: {os.path.join(options.out, 'report.json')} (CSV time series and PNG "
          f"plots next to it); run took {report['duration_s']:.0f} s")
    return 0

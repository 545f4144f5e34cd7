"""bench.autoscale's trace replay: the policies, the traces, the seeds, the table, the goal.

Every policy is run by the real :class:`~turnstorm.policy.Autoscaler` in
:mod:`turnstorm.simulate`, on the same footing (:class:`Footing`: one evaluation interval
and one metric lag for all, the same endpoint propagation delay, start-up time and relay
limit). The policies:

* naive baselines, as HPA/KEDA scaling a Deployment whose pods stop at once (their calls
  are cut): ``hpa-cpu70`` (cpuUtilization 70 % of the limit, CPU averaged over 15 s as
  metrics-server does) and ``keda-alloc`` (allocations per relay = 80 % of the calibrated
  SLO capacity, the usual headroom), default behaviors (up: window 0, max(100 %, 4
  pods)/15 s; down: window 300 s, 100 %/15 s);
* draining baselines: the same two on this project's Deployment, whose deleted relays
  drain in the rendered ``preStop`` hook (out of the Service, they keep their calls up to
  the drain deadline and cost their relay-seconds meanwhile); the ReplicaSet picks which
  pods go (not ready first, then the newest, in log2 buckets, ties random); with the
  default scale-down window (300 s) and a tuned one (``-30s``: 30 s);
* ``ours``: allocationsPerRelay = 90 % of the calibrated SLO capacity, storm options on
  (slope over 30 s, projected 30 s ahead), scaleDown window 30 s, drain (deadline 900
  s), placement ``pack`` applied as on a cluster (relays outside the open set labelled
  standby at each evaluation, ``headroomPercent`` 100), vertical resizing 25-150 % in
  steps of 25 %, whose grants take ``resize_delay`` and are refused on a
  ``resize_refusal`` share of the nodes;
* ``oracle``: the fewest relays keeping every relay within its knee each second, perfect
  placement, no start-up delay (:func:`turnstorm.simulate.oracle`).

A second table runs ours at ``metrics.intervalSeconds`` 1 (the operator scrapes the
exporters itself), the rest unchanged.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from turnstorm.policy import Autoscaler, StormOptions
from turnstorm.simulate import (
    PolicySetup,
    RelayModel,
    ScaleIn,
    SimConfig,
    SimResult,
    Trace,
    diurnal_ramp,
    flash_crowd,
    oracle,
    reconnect_storm,
    reconnect_waves,
    regional_failover,
    simulate,
)
from turnstorm.spec import ScalingBehavior, ScalingPolicy, VerticalScaling

SLO_RTT_MS = 150.0
SLO_LOSS = 0.01
GOAL_VIOLATION_RATIO = 0.5
GOAL_REPLICA_RATIO = 1.0
GOAL_ORACLE_RATIO = 1.25
OUR_TARGET_SHARE = 0.9
"""Our allocationsPerRelay as a share of the calibrated SLO capacity."""
KEDA_TARGET_SHARE = 0.80
BURST = 1.5
"""Our vertical.maxPercent / 100; the calibration measures a relay resized to it."""
VERTICAL = VerticalScaling(enabled=True, max_factor=BURST, min_factor=0.25, step=0.25)
DRAIN_DEADLINE = 900
PACK_HEADROOM = 1.0


@dataclass(frozen=True)
class Footing:
    """What every policy shares."""

    interval: int = 15
    """Seconds between evaluations (HPA's sync period)."""
    lag: int = 5
    """Seconds between a relay's state and any policy seeing it."""
    endpoint_delay: int = 2
    """Seconds until clients see a relay join or leave the Service."""
    resize_delay: int = 3
    resize_refusal: float = 0.25
    startup: int = 15
    max_relays: int = 12

    def config(self, seed: int) -> SimConfig:
        return SimConfig(startup=self.startup, max_replicas=self.max_relays,
                         slo_rtt_ms=SLO_RTT_MS, slo_loss=SLO_LOSS, metric_lag=self.lag,
                         endpoint_delay=self.endpoint_delay, resize_delay=self.resize_delay,
                         resize_refusal=self.resize_refusal, seed=seed)


def behavior(window: int, percent: int, pods: int) -> ScalingBehavior:
    return ScalingBehavior(window, percent, pods, 15)


def policy(targets: dict[str, float], down_window: int = 300,
           vertical: VerticalScaling | None = None) -> ScalingPolicy:
    return ScalingPolicy(enabled=True, tolerance=0.1, targets=targets,
                         scale_up=behavior(0, 100, 4), scale_down=behavior(down_window, 100, 0),
                         drain_deadline_seconds=DRAIN_DEADLINE,
                         vertical=vertical or VerticalScaling())


def ours(slo_calls: int, footing: Footing, interval: int) -> PolicySetup:
    target = round(OUR_TARGET_SHARE * slo_calls)
    return PolicySetup(
        "ours" if interval == footing.interval else f"ours-{interval}s",
        lambda: Autoscaler(policy({"allocationsPerRelay": target}, down_window=30,
                                  vertical=VERTICAL), 1, footing.max_relays,
                           StormOptions(lookahead_seconds=30, slope_window_seconds=30)),
        interval=interval, scale_in="drain", pack_fill=target,
        standby_headroom=PACK_HEADROOM,
        description=f"allocationsPerRelay {target}, storm lookahead 30 s over a 30 s slope, "
                    f"interval {interval} s, scaleDown window 30 s, drain (deadline "
                    f"{DRAIN_DEADLINE} s), pack by standby labels (headroom "
                    f"{PACK_HEADROOM:.0%}), vertical {VERTICAL.min_factor:.0%}-"
                    f"{VERTICAL.max_factor:.0%} in steps of {VERTICAL.step:.0%}")


def baselines(slo_calls: int, footing: Footing) -> list[PolicySetup]:
    keda = round(KEDA_TARGET_SHARE * slo_calls)
    signals = {"hpa-cpu70": ({"cpuUtilization": 70.0}, "cpuUtilization 70 %"),
               "keda-alloc": ({"allocationsPerRelay": float(keda)},
                              f"allocationsPerRelay {keda}")}
    out = []
    kinds: tuple[tuple[ScaleIn, int, str], ...] = (
        ("delete", 300, ""), ("prestop", 300, "-drain"), ("prestop", 30, "-drain-30s"))
    for kind, window, suffix in kinds:
        for name, (targets, text) in signals.items():
            def make(targets: dict[str, float] = targets, window: int = window
                     ) -> Autoscaler:
                return Autoscaler(policy(targets, down_window=window), 1,
                                  footing.max_relays, StormOptions(enabled=False))
            how = ("pods stop at once" if kind == "delete"
                   else "deleted pods drain in preStop")
            out.append(PolicySetup(
                name + suffix, make, interval=footing.interval, scale_in=kind,
                description=f"{text}, scaleDown window {window} s, {how}"))
    return out


def traces(slo_calls: int, seed: int) -> list[Trace]:
    """Sized in relays of the calibrated capacity (``slo_calls`` each): a background of
    1.3 relays' worth of calls; the storm adds about 4.5 relays' worth within 60 s, the
    flash crowd about 4, the reconnect waves 2 + 2 and the failover 4 at once plus 1.5
    over 7 minutes; the busy hour grows to about 4 over 10 minutes."""
    background = round(1.3 * slo_calls)
    scale = slo_calls / 229
    subscribers = round(4.5 * slo_calls / 0.25)
    return [
        reconnect_storm(seed, subscribers=subscribers, share=0.25, window=60,
                        background=background),
        flash_crowd(seed, peak_rate=8.0 * scale, background=background),
        reconnect_waves(seed, subscribers=subscribers, background=background,
                        waves=((60, 0.11, 20), (150, 0.11, 45))),
        regional_failover(seed, moved=round(4 * slo_calls), window=20,
                          extra_rate=3.0 * scale, hold=420, background=background),
        diurnal_ramp(seed, peak_rate=6.0 * scale, ramp=600, background=background),
    ]


def run_seed(model: RelayModel, footing: Footing, seed: int, second_interval: int | None
             ) -> list[list[SimResult]]:
    """Per trace of ``seed``: every policy's result, the oracle last (picklable inputs,
    for a worker process)."""
    slo_calls = model.slo_sessions(SLO_RTT_MS, SLO_LOSS)
    chosen = [*baselines(slo_calls, footing), ours(slo_calls, footing, footing.interval)]
    if second_interval is not None:
        chosen.append(ours(slo_calls, footing, second_interval))
    config = footing.config(seed)
    return [[*(simulate(trace, model, s, config) for s in chosen),
             oracle(trace, slo_calls, config.min_replicas)]
            for trace in traces(slo_calls, seed)]


@dataclass
class Row:
    """One policy on one trace, over the seeds."""

    policy: str
    results: list[SimResult]

    def median(self, value: Callable[[SimResult], float]) -> float:
        return statistics.median(value(r) for r in self.results)

    def spread(self, value: Callable[[SimResult], float]) -> tuple[float, float, float]:
        values = [value(r) for r in self.results]
        return min(values), statistics.median(values), max(values)

    @property
    def draining(self) -> bool:
        return self.policy.endswith(("-drain", "-drain-30s"))


def replay(model: RelayModel, footing: Footing, seeds: Iterable[int],
           second_interval: int | None = 1, workers: int = 2
           ) -> list[tuple[list[Trace], list[Row]]]:
    """Per trace: (its trace for each seed, one row per policy)."""
    seeds = list(seeds)
    slo_calls = model.slo_sessions(SLO_RTT_MS, SLO_LOSS)
    with ProcessPoolExecutor(workers) as pool:
        per_seed = list(pool.map(run_seed, [model] * len(seeds), [footing] * len(seeds),
                                 seeds, [second_interval] * len(seeds)))
    out = []
    for index, _ in enumerate(per_seed[0]):
        runs = [results[index] for results in per_seed]
        rows = [Row(name, [run[i] for run in runs])
                for i, name in enumerate(r.policy for r in runs[0])]
        out.append(([traces(slo_calls, seed)[index] for seed in seeds], rows))
    return out


def ratio(a: float, b: float) -> float:
    if b == 0:
        return 0.0 if a == 0 else float("inf")
    return a / b


def best_draining(rows: list[Row]) -> Row:
    """The draining baseline with the fewest SLO-violation seconds, then relay-seconds
    (medians over the seeds)."""
    return min((r for r in rows if r.draining),
               key=lambda r: (r.median(lambda x: x.slo_violation_seconds),
                              r.median(lambda x: x.replica_seconds)))


@dataclass(frozen=True)
class Verdict:
    """Ours against the best draining baseline and the oracle on one trace (medians)."""

    trace: str
    violation: float
    replica: float
    pods: float
    cut: float
    oracle: float

    @property
    def ok(self) -> bool:
        return (self.violation <= GOAL_VIOLATION_RATIO and self.replica <= GOAL_REPLICA_RATIO
                and self.cut == 0 and self.oracle <= GOAL_ORACLE_RATIO)


def verdict(trace: str, rows: list[Row], name: str = "ours") -> Verdict:
    mine = next(r for r in rows if r.policy == name)
    best = best_draining(rows)
    bound = next(r for r in rows if r.policy == "oracle")
    return Verdict(
        trace,
        violation=ratio(mine.median(lambda r: r.slo_violation_seconds),
                        best.median(lambda r: r.slo_violation_seconds)),
        replica=ratio(mine.median(lambda r: r.replica_seconds),
                      best.median(lambda r: r.replica_seconds)),
        pods=ratio(mine.median(lambda r: r.pod_seconds), best.median(lambda r: r.pod_seconds)),
        cut=mine.median(lambda r: r.allocations_cut),
        oracle=ratio(mine.median(lambda r: r.replica_seconds),
                     bound.median(lambda r: r.replica_seconds)))


def spread_text(values: tuple[float, float, float]) -> str:
    low, mid, high = values
    return f"{low:.0f}/{mid:.0f}/{high:.0f}"


HEADER = (f"    {'policy':<23}{'SLO-viol s':>13}{'CPU relay-s':>18}{'pod-s':>7}{'cut':>6}"
          f"{'peak':>5}{'resizes':>8}{'viol x':>7}{'CPU x':>7}{'pod x':>7}{'CPU/or':>7}"
          f"{'pod/or':>7}")


def table(rows: list[Row], only: Callable[[Row], bool] = lambda _r: True) -> list[str]:
    """One line per policy: min/median/max over the seeds for SLO-violation seconds and
    CPU-weighted relay-seconds, medians for the rest; ratios (of medians) to the best
    draining baseline and to the oracle."""
    best = best_draining(rows)
    bound = next(r for r in rows if r.policy == "oracle")
    lines = [HEADER]
    for row in rows:
        if not only(row):
            continue
        viol = row.median(lambda r: r.slo_violation_seconds)
        cpu = row.median(lambda r: r.replica_seconds)
        pods = row.median(lambda r: r.pod_seconds)
        lines.append(
            f"    {row.policy + (' *' if row is best else ''):<23}"
            f"{spread_text(row.spread(lambda r: r.slo_violation_seconds)):>13}"
            f"{spread_text(row.spread(lambda r: r.replica_seconds)):>18}{pods:>7.0f}"
            f"{row.median(lambda r: r.allocations_cut):>6.0f}"
            f"{row.median(lambda r: r.peak_relays):>5.0f}"
            f"{row.median(lambda r: r.resizes):>8.0f}"
            f"{ratio(viol, best.median(lambda r: r.slo_violation_seconds)):>7.2f}"
            f"{ratio(cpu, best.median(lambda r: r.replica_seconds)):>7.2f}"
            f"{ratio(pods, best.median(lambda r: r.pod_seconds)):>7.2f}"
            f"{ratio(cpu, bound.median(lambda r: r.replica_seconds)):>7.2f}"
            f"{ratio(pods, bound.median(lambda r: r.pod_seconds)):>7.2f}")
    return lines


def describe(model: RelayModel, footing: Footing) -> list[str]:
    slo_calls = model.slo_sessions(SLO_RTT_MS, SLO_LOSS)
    chosen = [*baselines(slo_calls, footing), ours(slo_calls, footing, footing.interval)]
    return [f"  {s.name:<21}{s.description}" for s in chosen]

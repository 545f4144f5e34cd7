"""The run's report: ``report.json``, ``timeseries.csv``, PNG plots and the final table."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from turnstorm import ideal
from turnstorm.errors import TurnstormError
from turnstorm.localmode.series import COLUMNS, Row

IDEAL = ideal.LIMITS
PHASES = ("fixed", "autoscaled")
PLOTS = {"load": "load-relays.png", "rtt": "rtt.png", "loss": "loss-jitter.png",
         "overview": "overview.png"}


def table_rows(phases: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The comparison table: one row per metric with the ideal and each phase's value."""

    def get(phase: str, *keys: str) -> Any:
        value: Any = phases.get(phase, {})
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    specs: list[tuple[str, str, tuple[str, ...], str, Callable[[Any], bool] | None]] = [
        ("end-to-end latency p99", ideal.LATENCY_P99.text, ("media", "rtt_ms", "p99"), "ms",
         ideal.LATENCY_P99.met),
        ("packet loss", ideal.LOSS.text, ("media", "loss_pct"), "%", ideal.LOSS.met),
        ("jitter (std)", ideal.JITTER.text, ("media", "delay_std_ms"), "ms", ideal.JITTER.met),
        ("relay overhead", ideal.RELAY_OVERHEAD.text, ("media", "relay_overhead_ms"), "ms",
         ideal.RELAY_OVERHEAD.met),
        ("relay-seconds used", "", ("scaling", "relay_seconds"), "s", None),
        ("allocations cut", "0", ("allocations_cut",), "", lambda v: v == 0),
    ]
    rows = []
    for label, bound, keys, unit, ok in specs:
        row: dict[str, Any] = {"metric": label, "ideal": bound}
        for phase in PHASES:
            value = get(phase, *keys)
            row[phase] = value
            row[f"{phase}_ok"] = None if ok is None or value is None else bool(ok(value))
        row["unit"] = unit
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any], phase: str) -> str:
        value = row[phase]
        if value is None:
            return "n/a"
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        unit = f" {row['unit']}" if row["unit"] else ""
        mark = {True: "", False: " ✗", None: ""}[row[f"{phase}_ok"]]
        return f"{text}{unit}{mark}"

    header = ["metric", "ideal", "fixed pool", "autoscaled"]
    body = [[r["metric"], r["ideal"] or "-", cell(r, "fixed"), cell(r, "autoscaled")]
            for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(4)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
              for line in body]
    return "\n".join(lines)


def write_json(path: str, report: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf8") as handle:
        json.dump(report, handle, indent=2, sort_keys=True)
        handle.write("\n")


def write_csv(path: str, rows: Sequence[Row]) -> None:
    with open(path, "w", newline="", encoding="utf8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for row in rows:
            data = row.as_dict()
            writer.writerow(["" if data[c] is None else data[c] for c in COLUMNS])


def _series(rows: Sequence[Row], phase: str, column: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        if row.phase != phase:
            continue
        value = getattr(row, column)
        if value is not None:
            xs.append(row.phase_time_s)
            ys.append(float(value))
    return xs, ys


STYLE = {"fixed": {"color": "tab:red", "linestyle": "--", "label": "fixed pool"},
         "autoscaled": {"color": "tab:blue", "linestyle": "-", "label": "autoscaled"}}


def _plot_load(ax_users: Any, ax_relays: Any, rows: Sequence[Row]) -> None:
    xs, ys = _series(rows, "autoscaled", "users")
    if not xs:
        xs, ys = _series(rows, "fixed", "users")
    ax_users.plot(xs, ys, color="tab:gray", label="users (both phases)")
    ax_users.set_ylabel("users")
    twin = ax_users.twinx()
    for phase in PHASES:
        px, py = _series(rows, phase, "offered_pps")
        twin.plot(px, py, alpha=0.6, linewidth=1, **STYLE[phase])
    twin.set_ylabel("offered packets/s")
    ax_users.set_title("load")
    ax_users.legend(loc="upper left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)
    for phase in PHASES:
        px, py = _series(rows, phase, "relays_active")
        ax_relays.step(px, py, where="post", **STYLE[phase])
    dx, dy = _series(rows, "autoscaled", "relays_draining")
    ax_relays.step(dx, dy, where="post", color="tab:orange", label="draining (autoscaled)")
    wx, wy = _series(rows, "autoscaled", "desired")
    ax_relays.step(wx, wy, where="post", color="tab:green", linestyle=":",
                   label="desired (autoscaled)")
    ax_relays.set_ylabel("relays")
    ax_relays.set_title("relays in rotation")
    ax_relays.legend(loc="upper right", fontsize=8)


def _plot_rtt(ax: Any, rows: Sequence[Row]) -> None:
    for phase in PHASES:
        style = STYLE[phase]
        px, py = _series(rows, phase, "rtt_p99_ms")
        ax.plot(px, py, color=style["color"], linestyle=style["linestyle"],
                label=f"p99 {style['label']}")
        px, py = _series(rows, phase, "rtt_p50_ms")
        ax.plot(px, py, color=style["color"], linestyle=style["linestyle"], alpha=0.4,
                label=f"p50 {style['label']}")
    ax.axhline(150, color="black", linewidth=1, label="150 ms (ideal p99)")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylim(bottom=0)  # RTTs are positive: no empty negative half of the symlog axis
    ax.set_ylabel("media RTT, ms")
    ax.set_title("end-to-end latency (per second)")
    ax.legend(loc="upper right", fontsize=8)


def _plot_loss(ax_loss: Any, ax_jitter: Any, rows: Sequence[Row]) -> None:
    for phase in PHASES:
        px, py = _series(rows, phase, "loss_pct")
        ax_loss.plot(px, py, **STYLE[phase])
        px, py = _series(rows, phase, "jitter_ms")
        ax_jitter.plot(px, py, **STYLE[phase])
    ax_loss.axhline(1, color="black", linewidth=1, label="1 % (ideal)")
    ax_loss.set_ylabel("loss, %")
    ax_loss.set_title("packet loss (per second)")
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_jitter.axhline(20, color="black", linewidth=1, label="20 ms (ideal)")
    ax_jitter.set_ylabel("delay std, ms")
    ax_jitter.set_title("jitter (per second)")
    ax_jitter.legend(loc="upper right", fontsize=8)


def write_plots(directory: str, rows: Sequence[Row], title: str) -> dict[str, str]:
    """The PNGs (matplotlib, Agg backend); returns plot name -> file name."""
    try:
        import matplotlib
    except ImportError:
        raise TurnstormError("the plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(figure: Any, name: str) -> None:
        for ax in figure.axes:
            ax.set_xlabel("seconds into the phase")
            ax.grid(True, alpha=0.3)
        figure.suptitle(title, fontsize=10)
        figure.tight_layout()
        figure.savefig(os.path.join(directory, PLOTS[name]), dpi=100)
        plt.close(figure)

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    _plot_load(top, bottom, rows)
    save(figure, "load")
    figure, ax = plt.subplots(figsize=(9, 4.5))
    _plot_rtt(ax, rows)
    save(figure, "rtt")
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    _plot_loss(top, bottom, rows)
    save(figure, "loss")
    figure, axes = plt.subplots(2, 2, figsize=(13, 8))
    _plot_load(axes[0][0], axes[1][0], rows)
    _plot_rtt(axes[0][1], rows)
    _plot_loss(axes[1][1], _OverviewJitter(), rows)
    save(figure, "overview")
    return dict(PLOTS)


class _OverviewJitter:
    """Swallows the jitter panel in the overview figure (four panels are enough)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def write_report(directory: str, report: dict[str, Any], rows: Sequence[Row],
                 title: str) -> dict[str, str]:
    try:
        os.makedirs(directory, exist_ok=True)
        files = {"report": "report.json", "timeseries": "timeseries.csv"}
        write_csv(os.path.join(directory, files["timeseries"]), rows)
        files.update({f"plot_{k}": v for k, v in write_plots(directory, rows, title).items()})
        report["files"] = files
        write_json(os.path.join(directory, files["report"]), report)
    except OSError as exc:
        raise TurnstormError(f"cannot write the report to {directory}: "
                             f"{exc.strerror or exc}") from None
    return files

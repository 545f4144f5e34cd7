"""Live progress: a rich panel on a terminal, plain lines otherwise (logs, CI, pipes)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from turnstorm.localmode.control import PoolStatus
from turnstorm.localmode.series import Row

PLAIN_EVERY = 5.0
"""Seconds between plain progress lines (scaling events are printed as they happen)."""


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} %"


class Progress:
    """Shows phase, users, offered rate, RTT p99, loss, relays and the last decision."""

    def __init__(self, stream: TextIO | None = None, rich: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.rich = self.stream.isatty() if rich is None else rich
        self._live: Any = None
        self._last_plain = -PLAIN_EVERY
        self._events_seen = 0
        self.phase_label = ""

    def start_phase(self, label: str, duration: float) -> None:
        self.phase_label = label
        self._last_plain = -PLAIN_EVERY
        self._events_seen = 0
        self.line(f"phase {label}: storm for {duration:g} s")
        if self.rich:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self.stream)
            self._live = Live(console=console, auto_refresh=False, transient=False)
            self._live.start()

    def end_phase(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def line(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def update(self, row: Row, status: PoolStatus, events: list[Any]) -> None:
        for event in events[self._events_seen:]:
            self.line(f"  [{event.time:5.1f} s] scaling: {event.text}")
        self._events_seen = len(events)
        if self._live is not None:
            self._live.update(self._panel(row, status), refresh=True)
            return
        if row.phase_time_s - self._last_plain >= PLAIN_EVERY:
            self._last_plain = row.phase_time_s
            self.line(f"  [{row.phase_time_s:5.1f} s] {self.phase_label}: users {row.users:4d}"
                      f"  offered {row.offered_pps:7.0f} pps  rtt p99 {_ms(row.rtt_p99_ms)}"
                      f"  loss {_pct(row.loss_pct)}  relays {status.ready} ready /"
                      f" {status.draining} draining (desired {status.desired})")

    def _panel(self, row: Row, status: PoolStatus) -> Any:
        from rich.panel import Panel
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        p99 = row.rtt_p99_ms
        p99_style = "red" if p99 is not None and p99 >= 150 else "green"
        loss = row.loss_pct
        loss_style = "red" if loss is not None and loss >= 1 else "green"
        table.add_row("phase", f"{self.phase_label}  ({row.phase_time_s:.0f} s)")
        table.add_row("users", str(row.users))
        table.add_row("offered rate", f"{row.offered_pps:.0f} packets/s")
        table.add_row("RTT p50 / p99", f"{_ms(row.rtt_p50_ms)} / [{p99_style}]{_ms(p99)}"
                                       f"[/{p99_style}]  (ideal < 150 ms)")
        table.add_row("loss", f"[{loss_style}]{_pct(loss)}[/{loss_style}]  (ideal < 1 %)")
        table.add_row("relays", f"{status.ready} ready, {status.draining} draining, "
                                f"desired {status.desired}, {status.allocations} allocations"
                                + ("" if status.cpu_percent is None
                                   else f", CPU {status.cpu_percent:.0f} % of limit"))
        table.add_row("last decision", status.last_decision or "-")
        return Panel(table, title="turnstorm run", expand=False)

"""The "Media" tab of Locust's web UI: the live media table per target.

Two views of the same rows (RTT p50/p95/p99/p99.9, RFC 3550 jitter, delay std, loss,
relay overhead, packets), both from :meth:`LoadgenState.cumulative`:

- a tab in Locust's own React UI (``/?tab=media``): Locust's ``extended_tabs`` /
  ``extended_tables`` template arguments, with the rows added to each ``/stats/requests``
  poll as ``extended_stats``;
- a Flask blueprint serving ``/media`` (a plain HTML table that refreshes itself every
  2 s; no JavaScript needed) and ``/media.json``.
"""

from __future__ import annotations

import html
import json
from typing import Any

from flask import Blueprint, Response, jsonify, request

TAB_KEY = "media"
COLUMNS = (
    ("target", "Target"), ("p50", "RTT p50 (ms)"), ("p95", "RTT p95 (ms)"),
    ("p99", "RTT p99 (ms)"), ("p999", "RTT p99.9 (ms)"), ("jitter", "Jitter (ms)"),
    ("std", "Delay std (ms)"), ("loss", "Loss (%)"), ("overhead", "Relay overhead (ms)"),
    ("sent", "Sent"), ("received", "Received"),
)
"""Column key (single words: Locust's UI camel-cases keys) and title."""


def media_rows(environment: Any) -> list[dict[str, Any]]:
    """One row per target from everything measured so far (live calls included)."""
    state = getattr(environment, "turnstorm", None)
    if state is None:
        return []
    rows = []
    for target, stats in sorted(state.cumulative().media.items()):
        summary = stats.as_dict()
        rtt = summary["rtt_ms"]
        rows.append({
            "target": target, "p50": rtt["p50"], "p95": rtt["p95"], "p99": rtt["p99"],
            "p999": rtt["p999"], "jitter": summary["jitter_ms"],
            "std": summary["delay_std_ms"], "loss": summary["loss_pct"],
            "overhead": summary["relay_overhead_ms"],
            "sent": summary["packets"]["sent"], "received": summary["packets"]["received"],
        })
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row[key]))}</td>" for key, _ in COLUMNS)
        + "</tr>" for row in rows)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta http-equiv='refresh' content='2'><title>turnstorm media</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}"
        "td:first-child{text-align:left}</style></head><body><h1>Media per target</h1>"
        f"<table id='media'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        "<p><a href='./'>Locust UI</a></p></body></html>")


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def install_media_tab(environment: Any) -> None:
    """Add the tab to ``environment.web_ui`` (create the web UI first)."""
    web_ui = environment.web_ui
    blueprint = Blueprint("turnstorm_media", __name__)

    @blueprint.route("/media")
    def media_page() -> Response:
        return Response(render_table(media_rows(environment)), mimetype="text/html")

    @blueprint.route("/media.json")
    def media_json() -> Response:
        return jsonify(media_rows(environment))

    web_ui.app.register_blueprint(blueprint)
    web_ui.template_args["extended_tabs"] = [{"title": "Media", "key": TAB_KEY}]
    web_ui.template_args["extended_tables"] = [
        {"key": TAB_KEY, "structure": [{"key": key, "title": title} for key, title in COLUMNS]}]

    @web_ui.app.after_request  # type: ignore[untyped-decorator]
    def add_media_rows(response: Response) -> Response:
        if request.path != "/stats/requests" or not response.is_json:
            return response
        data = response.get_json()
        data["extended_stats"] = [{"key": TAB_KEY, "data": media_rows(environment)}]
        response.set_data(json.dumps(data))
        return response

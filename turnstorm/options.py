"""Command-line options that more than one command takes, defined once."""

from __future__ import annotations

import argparse

DEFAULT_WEB_PORT = 8089
"""Locust's own default web UI port."""


def add_workers(parser: argparse.ArgumentParser, help: str) -> None:
    """``--workers N``: local Locust worker processes (default 0: none)."""
    parser.add_argument("--workers", type=int, default=0, metavar="N", help=help)


def add_web(parser: argparse.ArgumentParser, help: str) -> None:
    """``--web [PORT]``: Locust's web UI with the Media tab (PORT defaults to 8089)."""
    parser.add_argument("--web", type=int, nargs="?", const=DEFAULT_WEB_PORT, metavar="PORT",
                        help=help)

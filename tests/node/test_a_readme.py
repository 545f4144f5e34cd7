"""The README's one-machine Kubernetes section, command by command, against the node
(named to run first: it installs the chart the way a user does, and the later tests'
``helm upgrade --install`` takes the release over). The node's own up and down lines are
what the session fixture does with the same code."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

from turnstorm.testing.node import Node

ROOT = Path(__file__).resolve().parents[2]
NODE_LINES = ("make image cluster-up", "make cluster-down")


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- node-readme-commands -->\n```sh\n(.*?)```", text, re.DOTALL)
    assert block, "the README's node commands block"
    commands, current = [], ""
    for line in block.group(1).splitlines():
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def test_readme_commands_work_as_written(node: Node, tmp_path: Path) -> None:
    commands = readme_commands()
    assert commands[0] == NODE_LINES[0] and commands[-1] == NODE_LINES[1]
    env = {**os.environ, "HELM_CACHE_HOME": str(tmp_path / "helm-cache"),
           "HELM_CONFIG_HOME": str(tmp_path / "helm-config"),
           "HELM_DATA_HOME": str(tmp_path / "helm-data")}
    script = "set -euo pipefail\ncd " + str(ROOT) + "\n" + "\n".join(
        f"echo {shlex.quote('+ ' + c[:70])} >&2\n{c}" for c in commands[1:-1]) + "\n"
    try:
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                              env=env, timeout=600, check=False, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        # the probe's table: an allocation on the relay pod and the relayed echo
        assert "relayed" in done.stdout.lower() or "relay" in done.stdout.lower(), done.stdout
        assert "turnpool.turnstorm.io/voice-relay created" in done.stdout
    finally:
        pid = ROOT / "echo.pid"
        if pid.exists():  # a failed run left the README's echo peer running
            subprocess.run(["kill", pid.read_text().strip()], check=False)
        for leftover in ("echo.pid", "secret.txt"):
            (ROOT / leftover).unlink(missing_ok=True)
        node.kubectl("delete", "turnpool", "voice-relay", "--wait=false", check=False)
        node.kubectl("delete", "secret", "voice-relay-auth", check=False)

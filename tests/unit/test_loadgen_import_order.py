"""Locust before kopf/kubernetes: the only order that works in one process."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import turnstorm

ROOT = Path(turnstorm.__file__).parent


def python(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LOCUST_SKIP_MONKEY_PATCH"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False, env=env)


def modules(package: str) -> list[str]:
    path = ROOT / package.removeprefix("turnstorm.").replace(".", "/")
    return [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(path)])]


def test_locust_then_kopf_then_kubernetes_works() -> None:
    done = python("import locust, kopf, kubernetes, gevent.monkey\n"
                  "assert gevent.monkey.is_module_patched('socket')\n"
                  "print('ok')")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_loadgen_modules_never_load_kopf_or_kubernetes() -> None:
    names = modules("turnstorm.loadgen")
    assert "turnstorm.loadgen.users" in names
    code = ("import sys\n"
            f"for name in {names!r}:\n"
            "    __import__(name)\n"
            "    bad = {'kopf', 'kubernetes'} & set(sys.modules)\n"
            "    assert not bad, (name, bad)\n"
            "import kopf, kubernetes\n"
            "print('ok')")
    done = python(code)
    assert done.returncode == 0, done.stderr[-2000:]


def test_operator_modules_never_load_locust() -> None:
    code = ("import sys\n"
            f"for name in {modules('turnstorm.operator')!r}:\n"
            "    __import__(name)\n"
            "    assert 'locust' not in sys.modules, name\n"
            "print('ok')")
    done = python(code)
    assert done.returncode == 0, done.stderr[-2000:]

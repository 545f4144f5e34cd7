"""Modules are where git has them: the linked folders (``turnstorm/operator`` ->
``operator/``, ``turnstorm/loadgen`` -> ``loadgen/``) are imported from their real
paths, so tracebacks and import tools name the files git tracks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LIST_FILES = """
import json, pkgutil, importlib, sys
package = importlib.import_module(sys.argv[1])
names = [sys.argv[1]] + [f"{sys.argv[1]}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
print(json.dumps({name: importlib.import_module(name).__file__ for name in names}))
"""


def tracked() -> set[str]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return set(out.split())


@pytest.mark.parametrize(("package", "folder"), [("turnstorm.loadgen", "loadgen"),
                                                 ("turnstorm.operator", "operator"),
                                                 ("turnstorm.proto", "turnstorm/proto")])
def test_every_module_file_is_a_git_path(package: str, folder: str) -> None:
    out = subprocess.run([sys.executable, "-c", LIST_FILES, package], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    files = json.loads(out)
    git = tracked()
    assert len(files) > 3
    for name, path in files.items():
        if path is None:  # the operator folder: a namespace portion, no __init__.py
            continue
        relative = Path(path).relative_to(ROOT).as_posix()
        assert relative.startswith(f"{folder}/"), (name, relative)
        assert relative in git, (name, relative)


def test_the_standard_operator_module_is_untouched() -> None:
    out = subprocess.run([sys.executable, "-c", "import turnstorm.operator.render, operator;"
                          "print(operator.__file__)"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert not out.strip().startswith(str(ROOT))

"""turnstorm: reproduce CGNAT storms against STUN/TURN relay pools and scale out of them."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType

__version__ = "0.1.0"

_PACKAGES = (f"{__name__}.operator", f"{__name__}.loadgen")
"""Subpackages whose folders live at the top of a checkout (``operator/``, ``loadgen/``),
reached through links in this folder (``turnstorm/operator`` -> ``../operator``)."""


class _LinkedFolders(importlib.abc.MetaPathFinder):
    """Imports the modules of the linked subpackages from the folders the links name, so
    that their ``__file__`` (tracebacks, coverage) is the path git tracks, not the link's.
    ``turnstorm.operator`` itself, a namespace portion with no file, keeps the link in its
    ``__path__``: import tools that walk the package from there name its modules right.
    In an installed wheel the folders are real: nothing changes."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        parent, _, name = fullname.rpartition(".")
        if parent == __name__ and name == "loadgen":  # a regular package: its __init__.py
            search = [os.path.dirname(os.path.realpath(os.path.join(entry, name)))
                      for entry in __path__]
        elif parent in _PACKAGES and path is not None:  # a module of either
            search = [os.path.realpath(entry) for entry in path]
        else:
            return None
        if search == list(path or __path__):
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, search)


if not any(isinstance(finder, _LinkedFolders) for finder in sys.meta_path):
    sys.meta_path.insert(0, _LinkedFolders())

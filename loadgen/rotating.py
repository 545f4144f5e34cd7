"""The loadgen's Locust users, with every call sent to a relay of the current rotation
(the local mode's users).

Importing this module imports Locust (gevent monkey-patching): only the phase child
(:mod:`turnstorm.loadgen.phase`) and Locust worker processes (``module:class`` specs)
import it.

Hook used: :class:`~turnstorm.loadgen.users.TurnSessionUser` runs one call per task in
``_call`` and keeps ``self.target`` for that call; this subclass sets ``self.target``
from :func:`~turnstorm.loadgen.rotation.shared_rotation` before each call. Users are
numbered per phase from 0 and seeded with the run's seed, so both phases replay the same
subscribers (:envvar:`TURNSTORM_LOCAL_SEED` carries the seed to worker processes).
"""

from __future__ import annotations

import itertools
import os
import random
from typing import Any

from turnstorm.loadgen.rotation import SEED_ENV, shared_rotation
from turnstorm.loadgen.users import StunBindingUser, TurnSessionUser
from turnstorm.uri import ServerUri

_numbers = itertools.count()


def reset_numbers() -> None:
    """Number the next phase's users from 0 again (same seed: same subscribers)."""
    global _numbers
    _numbers = itertools.count()


def _renumber(user: Any) -> None:
    number = next(_numbers)
    user.renumber(number, random.Random(f"{os.environ.get(SEED_ENV, '0')}:{number}"))
    target = shared_rotation().pick()
    if target is not None:
        user.target = target


class RotatingTurnUser(TurnSessionUser):
    """TURN calls; each call goes to the least busy relay in rotation."""

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        _renumber(self)
        self._held: ServerUri | None = None

    def _call(self) -> None:
        self.target = self._held = shared_rotation().claim(self.target)
        super()._call()

    def _end_call(self) -> None:
        try:
            super()._end_call()
        finally:
            if self._held is not None:
                shared_rotation().release(self._held)
                self._held = None


class RotatingBindingUser(StunBindingUser):
    """STUN Binding users; each picks a relay in rotation when it starts."""

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        _renumber(self)

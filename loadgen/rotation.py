"""The pool's rotation as the load generator sees it: which relays new calls may use.

The loadgen's users pick their relay once, when the user starts
(``targets[number % len(targets)]``), and keep it for every call. In the local mode the
autoscaler adds and drains relays while the users run, so every *call* picks again:
the relay in rotation with the fewest calls of this process in progress (a
least-connections balancer, like IPVS ``lc``), ties broken round-robin. With a *fill*
(the pool's ``placement: pack``), the oldest relay in rotation (the rotation lists relays
in start order) with fewer than its share of ``fill`` calls of this process in progress
comes first, skipping the relays the controller marks *full* (saturated on a signal other
than allocations, see :func:`turnstorm.policy.saturated`); least-connections once every
relay is that full. Each of ``processes``
Locust processes runs about the same share of the users, so its share of ``fill`` is
``fill / processes`` (rounded down, at least 1).

The orchestrator publishes the rotation with :meth:`Rotation.publish`; in the same
process the users see it at once. Locust worker processes (``--workers``) find it in a
JSON file named by the environment variable :data:`ROTATION_ENV` (written atomically,
re-read when it changes).
"""

from __future__ import annotations

import json
import os
import tempfile

from turnstorm.uri import ServerUri, parse_uri

ROTATION_ENV = "TURNSTORM_ROTATION_FILE"
SEED_ENV = "TURNSTORM_LOCAL_SEED"
"""The run's seed for the users of every phase (see :mod:`turnstorm.loadgen.rotating`)."""


class Rotation:
    """Relays in rotation plus this process's calls in progress per relay."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._uris: list[ServerUri] = []
        self.fill: float | None = None
        """Calls of this process a relay is packed with before the next one is used."""
        self.full: frozenset[str] = frozenset()
        """Relays (URIs) packing skips: saturated whatever their call count."""
        self._stamp: tuple[int, int, int] | None = None
        self.active: dict[str, int] = {}
        self._turn = 0

    def publish(self, uris: list[str], fill: float | None = None, processes: int = 1,
                full: frozenset[str] = frozenset()) -> None:
        """The relays in rotation, oldest first; ``fill``: pack each with that many calls
        (split over ``processes`` Locust processes) before the next, skipping ``full``;
        None: spread."""
        self._uris = [parse_uri(u) for u in uris]
        # rounded down: the processes together never pack a relay beyond ``fill``
        self.fill = None if fill is None else max(1, int(fill // max(1, processes)))
        self.full = frozenset(str(parse_uri(u)) for u in full)
        if self.path is None:
            return
        directory = os.path.dirname(self.path) or "."
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".rotation-")
        with os.fdopen(fd, "w", encoding="utf8") as handle:
            json.dump({"relays": uris, "fill": self.fill, "full": sorted(self.full)}, handle)
        os.replace(temporary, self.path)
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def current(self) -> list[ServerUri]:
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp and self.path is not None:
            try:
                with open(self.path, encoding="utf8") as handle:
                    data = json.load(handle)
                uris = [parse_uri(u) for u in data["relays"]]
                fill = None if data.get("fill") is None else float(data["fill"])
                full = frozenset(str(parse_uri(u)) for u in data.get("full", []))
                # all or nothing: a bad file leaves the previous rotation whole
                self._uris, self.fill, self.full = uris, fill, full
                self._stamp = stamp
            except (OSError, ValueError, KeyError, TypeError):
                pass  # half-visible update: keep the previous rotation
        return self._uris

    def pick(self) -> ServerUri | None:
        uris = self.current()
        if not uris:
            return None
        if self.fill is not None:
            for uri in uris:
                key = str(uri)
                if key not in self.full and self.active.get(key, 0) < self.fill:
                    return uri
        self._turn += 1
        n = len(uris)
        best = min(range(n), key=lambda i: (self.active.get(str(uris[i]), 0),
                                            (i - self._turn) % n))
        return uris[best]

    def claim(self, fallback: ServerUri) -> ServerUri:
        """:meth:`pick` a relay for a new call (``fallback`` when the rotation is empty)
        and count the call on it (:meth:`release` it when the call ends)."""
        uri = self.pick() or fallback
        self.acquire(uri)
        return uri

    def acquire(self, uri: ServerUri) -> None:
        key = str(uri)
        self.active[key] = self.active.get(key, 0) + 1

    def release(self, uri: ServerUri) -> None:
        key = str(uri)
        left = self.active.get(key, 0) - 1
        if left > 0:
            self.active[key] = left
        else:
            self.active.pop(key, None)

    def reset(self) -> None:
        self.active.clear()
        self._turn = 0


_shared: Rotation | None = None


def shared_rotation() -> Rotation:
    """The process's rotation (file from :data:`ROTATION_ENV` when set)."""
    global _shared
    if _shared is None:
        _shared = Rotation(os.environ.get(ROTATION_ENV) or None)
    return _shared

"""``IceSessionUser``: real ICE agents through the relay, driven from gevent.

The agents live in the ICE service subprocess (:mod:`turnstorm.loadgen.ice`, asyncio);
this module only writes jobs to its stdin and reads results from its stdout with gevent's
cooperative subprocess pipes. One service per generator process, started on first use
and stopped with the test.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from typing import Any

import gevent
from gevent import subprocess as gsubprocess
from gevent.event import AsyncResult
from locust import task

from turnstorm import children
from turnstorm.errors import TurnstormError
from turnstorm.loadgen.ice import SESSION_TIMEOUT
from turnstorm.loadgen.users import _RelayUser
from turnstorm.proto.credentials import Credentials

HOLD_SECONDS = 3.0
"""How long a connected pair is kept (consent checks run meanwhile)."""
CONSENT_INTERVAL = 1.0
"""Seconds between consent checks in the service (aioice's default is 5)."""


class IceSessionFailed(TurnstormError):
    """An ICE session did not reach a consented, relayed, working pair."""


class IceService:
    """The client side of one ICE service process."""

    def __init__(self, consent_interval: float = CONSENT_INTERVAL) -> None:
        self.process = gsubprocess.Popen(
            [sys.executable, "-m", "turnstorm.loadgen.ice", "--consent-interval",
             str(consent_interval)], stdin=gsubprocess.PIPE, stdout=gsubprocess.PIPE)
        self._ids = itertools.count()
        self._waiting: dict[int, AsyncResult] = {}
        self._reader = gevent.spawn(self._read)

    def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        for line in stdout:
            result = json.loads(line)
            waiter = self._waiting.pop(result["id"], None)
            if waiter is not None:
                waiter.set(result)
        for waiter in self._waiting.values():
            waiter.set_exception(IceSessionFailed("the ICE service exited"))
        self._waiting.clear()

    def session(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Submit one session and wait (this greenlet only) for its result."""
        number = next(self._ids)
        waiter = AsyncResult()
        self._waiting[number] = waiter
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write((json.dumps({**job, "id": number}) + "\n").encode())
        stdin.flush()
        try:
            result: dict[str, Any] = waiter.get(timeout=timeout)
        except gevent.Timeout:
            raise IceSessionFailed(f"no ICE result within {timeout:g} s") from None
        finally:
            self._waiting.pop(number, None)
        return result

    def close(self) -> None:
        if self.process.poll() is None:
            if self.process.stdin is not None:
                self.process.stdin.close()  # the service finishes its sessions and exits
            children.reap(self.process, SESSION_TIMEOUT)
        self._reader.kill(block=False)


def ice_service(environment: Any) -> IceService:
    """The process-wide service, started on first use and closed when the test stops."""
    service: IceService | None = getattr(environment, "_turnstorm_ice", None)
    if service is None:
        service = environment._turnstorm_ice = IceService()

        def stop(**_kwargs: Any) -> None:
            environment._turnstorm_ice = None
            service.close()

        environment.events.test_stop.add_listener(stop)
    return service


class IceSessionUser(_RelayUser):
    """One ICE session after another: gather a relayed candidate from the target, check
    connectivity to a peer agent, hold the pair under consent freshness, close."""

    hold: float = HOLD_SECONDS

    def wait_time(self) -> float:
        return float(self.state.config.call_gap)

    @task
    def session(self) -> None:
        config = self.state.config
        if config.secret is None:
            raise TurnstormError("IceSessionUser needs the relay's shared secret")
        credentials = Credentials.ephemeral(config.secret, f"{config.user_prefix}ice"
                                            f"{self.number}", time.time())
        job = {"turn_host": self.target.host, "turn_port": self.target.port,
               "username": credentials.username, "password": credentials.password,
               "hold": self.hold}
        started = time.perf_counter()
        try:
            result = ice_service(self.environment).session(
                job, SESSION_TIMEOUT + self.hold + 5)
        except IceSessionFailed as exc:
            self.fire("ICE", "Connect", time.perf_counter() - started, exception=exc)
            self.state.count("ice_failed")
            return
        self._report(result)

    def _report(self, result: dict[str, Any]) -> None:
        if "gather_s" in result:
            self.fire("ICE", "Gather", result["gather_s"])
        if not result.get("ok"):
            self.state.count("ice_failed")
            error = IceSessionFailed(result.get("error") or (
                f"pair {result.get('local_type')}->{result.get('remote_type')}, data "
                f"{result.get('data')}, consent checks {result.get('consent_checks')}"))
            self.fire("ICE", "Connect", result.get("connect_s", 0.0), exception=error)
            return
        self.state.count("ice_connected")
        self.fire("ICE", "Connect", result["connect_s"])
        # the Consent event's length is the number of consent checks the peer answered
        self.fire("ICE", "Consent", self.hold, length=result["consent_checks"])


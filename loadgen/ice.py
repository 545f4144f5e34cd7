"""Real ICE sessions (aioice) through the relay pool, kept out of the gevent world.

aioice is asyncio; Locust is gevent. The two never share a process (this module imports
asyncio only inside its functions, so the Locust side can import its constants): the
agents run in an ICE service subprocess (``python -m turnstorm.loadgen.ice``, plain
asyncio, no gevent patching) and :class:`IceSessionUser` talks to it over pipes, one JSON
line per session each way, waiting on a gevent ``AsyncResult`` (the receiving greenlet
reads the pipe cooperatively).

One session, in the service:

1. agent A (controlling, ``TransportPolicy.RELAY``) gathers a relayed candidate from the
   target with TURN REST credentials; agent B (controlled, the peer) gathers host
   candidates on 127.0.0.1 (the service binds host candidates to loopback only);
2. B learns only A's relayed candidate, A learns B's host candidates, both run their
   connectivity checks; A's nominated pair must use its relayed candidate;
3. a datagram each way over the nominated pair;
4. the pair is held ``hold`` seconds with RFC 7675 consent checks every
   ``consent_interval`` seconds (aioice's default is 5 s; the service shortens it so a
   short run sees several); B counts the checks it answers;
5. both agents close (A's allocation is released).

The user fires ``ICE``/``Gather``, ``ICE``/``Connect`` and ``ICE``/``Consent`` request
events and counts ``ice_connected`` / ``ice_failed``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

SESSION_TIMEOUT = 20.0
"""Seconds one session may take in the service, on top of its hold time."""


# -- the service (asyncio, its own process) -------------------------------------------------


async def ice_session(job: dict[str, Any]) -> dict[str, Any]:
    """Run one session (see the module docstring); never raises."""
    import asyncio

    import aioice

    result: dict[str, Any] = {"id": job["id"], "ok": False}
    controlling = aioice.Connection(
        ice_controlling=True, components=1, use_ipv6=False,
        turn_server=(job["turn_host"], int(job["turn_port"])),
        turn_username=job["username"], turn_password=job["password"],
        transport_policy=aioice.TransportPolicy.RELAY)
    peer = aioice.Connection(ice_controlling=False, components=1, use_ipv6=False)
    consent = {"checks": 0, "connected": False}
    answer = peer.request_received

    def counting(message: Any, addr: Any, protocol: Any, *rest: Any) -> None:
        if consent["connected"]:
            consent["checks"] += 1
        answer(message, addr, protocol, *rest)

    peer.request_received = counting  # type: ignore[method-assign]
    try:
        started = time.perf_counter()
        await asyncio.gather(controlling.gather_candidates(), peer.gather_candidates())
        result["gather_s"] = time.perf_counter() - started
        relayed = [c for c in controlling.local_candidates if c.type == "relay"]
        if not relayed:
            result["error"] = "no relayed candidate gathered"
            return result
        for candidate in relayed:
            await peer.add_remote_candidate(candidate)
        for candidate in peer.local_candidates:
            await controlling.add_remote_candidate(candidate)
        await peer.add_remote_candidate(None)
        await controlling.add_remote_candidate(None)
        controlling.remote_username, controlling.remote_password = (
            peer.local_username, peer.local_password)
        peer.remote_username, peer.remote_password = (
            controlling.local_username, controlling.local_password)
        started = time.perf_counter()
        await asyncio.gather(controlling.connect(), peer.connect())
        result["connect_s"] = time.perf_counter() - started
        pair = controlling._nominated[1]
        result["local_type"] = pair.local_candidate.type
        result["relayed"] = [pair.local_candidate.host, pair.local_candidate.port]
        result["remote_type"] = pair.remote_candidate.type
        consent["connected"] = True
        await controlling.send(b"ping")
        ping = await asyncio.wait_for(peer.recv(), 2)
        await peer.send(b"pong")
        pong = await asyncio.wait_for(controlling.recv(), 2)
        result["data"] = ping == b"ping" and pong == b"pong"
        await asyncio.sleep(float(job["hold"]))
        result["consent_checks"] = consent["checks"]
        result["consent_alive"] = bool(controlling._nominated)
        result["ok"] = (result["local_type"] == "relay" and result["data"]
                        and result["consent_alive"] and consent["checks"] > 0)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        await asyncio.gather(controlling.close(), peer.close(), return_exceptions=True)
    return result


async def serve_stdio(consent_interval: float) -> None:
    """Read jobs (JSON lines) from stdin, write results (JSON lines) to stdout."""
    import asyncio

    import aioice.ice

    aioice.ice.CONSENT_INTERVAL = consent_interval  # type: ignore[assignment]
    # host candidates on loopback only: the generator talks to loopback and nothing else
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks: set[asyncio.Task[None]] = set()

    async def run(job: dict[str, Any]) -> None:
        try:
            result = await asyncio.wait_for(ice_session(job),
                                            SESSION_TIMEOUT + float(job["hold"]))
        except TimeoutError:
            result = {"id": job["id"], "ok": False, "error": "session timed out"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()

    while line := await reader.readline():
        task = asyncio.create_task(run(json.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m turnstorm.loadgen.ice")
    parser.add_argument("--consent-interval", type=float, default=1.0,
                        help="seconds between RFC 7675 consent checks (default 1)")
    args = parser.parse_args(argv)
    import asyncio

    asyncio.run(serve_stdio(args.consent_interval))
    return 0


if __name__ == "__main__":
    sys.exit(main())

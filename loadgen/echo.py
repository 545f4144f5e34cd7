"""A UDP echo peer: the far end that relayed media bounces off.

Standalone it is a plain blocking loop (one process, one core, no event loop overhead):

    python -m turnstorm.loadgen.echo --host 127.0.0.1 --port 0

prints ``echo listening on HOST:PORT`` once bound and echoes until SIGTERM/SIGINT, then
prints the datagram count. Inside a gevent process, :func:`spawn_echo` runs the same loop
on a gevent socket as one greenlet.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from turnstorm.lifeline import bind_to_parent
from turnstorm.proto.stun import Address

RECV_SIZE = 65535
SOCKET_BUFFER = 4 * 1024 * 1024


@dataclass
class EchoCounter:
    echoed: int = 0


def open_socket(host: str, port: int, sock_module: Any = socket) -> Any:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = sock_module.socket(family, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):  # the kernel caps it; the default still works
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    sock.bind((host, port))
    return sock


def echo_loop(sock: Any, counter: EchoCounter) -> None:
    """Echo every datagram back to its sender until the socket is closed."""
    recvfrom = sock.recvfrom
    sendto = sock.sendto
    while True:
        try:
            data, addr = recvfrom(RECV_SIZE)
        except OSError:
            if sock.fileno() < 0:
                return
            continue  # an ICMP error from an earlier send; keep serving
        try:
            sendto(data, addr)
        except OSError:
            continue  # the sender is gone; dropping is what a real peer does
        counter.echoed += 1


def spawn_echo(host: str = "127.0.0.1", port: int = 0) -> tuple[Any, Address, EchoCounter]:
    """Start a gevent echo peer; returns (greenlet, bound address, counter).

    Stop it with ``greenlet.kill()``; the socket is closed with it.
    """
    import gevent
    from gevent import socket as gsocket

    sock = open_socket(host, port, gsocket)
    counter = EchoCounter()

    def run() -> None:
        try:
            echo_loop(sock, counter)
        finally:
            sock.close()

    bound = sock.getsockname()
    return gevent.spawn(run), (bound[0], bound[1]), counter


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m turnstorm.loadgen.echo",
                                     description="UDP echo peer for relayed media.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default: any free)")
    args = parser.parse_args(argv)
    parent = bind_to_parent()  # a generator killed with SIGKILL leaves no echo peer behind
    if parent.gone:
        return 0  # the parent was gone before the death signal was armed
    sock = open_socket(args.host, args.port)
    counter = EchoCounter()
    host, port = sock.getsockname()[:2]

    def stop(signum: int, frame: object) -> None:
        # once: a parent's death may signal again (see turnstorm.lifeline.die_with_parent)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, stop)
        print(f"echo listening on {host}:{port}", flush=True)
        echo_loop(sock, counter)
    except (KeyboardInterrupt, BrokenPipeError):  # stopped, or the parent already gone
        pass
    finally:
        sock.close()
    with contextlib.suppress(BrokenPipeError):  # a dead parent reads nothing
        print(f"echoed {counter.echoed} datagrams", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

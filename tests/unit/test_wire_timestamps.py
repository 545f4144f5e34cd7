"""The generator's client stamps each datagram with its kernel arrival time, not with the
moment the event loop got round to reading it."""

from __future__ import annotations

import os

os.environ.setdefault("LOCUST_SKIP_MONKEY_PATCH", "1")

import socket
import time

import gevent

from turnstorm.loadgen.wire import UdpClient, clock


def test_arrival_time_is_the_kernels_while_the_hub_is_busy() -> None:
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    client = UdpClient(peer.getsockname())
    arrivals: list[tuple[int, float]] = []
    client.on_channel_data = lambda channel, payload, at: arrivals.append((channel, at))
    try:
        client.send_raw(b"hello")  # lets the peer learn the client's address
        _, address = peer.recvfrom(64)
        gevent.sleep(0)
        sent = clock()
        peer.sendto(b"\x40\x00\x00\x04ping", address)  # ChannelData 0x4000, 4 bytes
        time.sleep(0.05)  # the hub is blocked: nothing reads the socket meanwhile
        blocked_until = clock()
        deadline = blocked_until + 2
        while not arrivals and clock() < deadline:
            gevent.sleep(0.001)
        assert arrivals, "the datagram never reached the handler"
        channel, at = arrivals[0]
        assert channel == 0x4000
        assert sent <= at + 0.001  # stamped when it arrived...
        assert at - sent < 0.01  # ...not 50 ms later, when the hub read it
        assert blocked_until - sent >= 0.05
    finally:
        client.close()
        peer.close()

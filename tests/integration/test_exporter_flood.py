"""UDP receive-buffer errors and socket drops rise when a CPU-capped relay is flooded.

The relay runs in a cgroup capped at 5 % of a core (like a tiny pod limit), one relay
thread; a raw UDP socket sends it STUN Binding requests as fast as it can for at most
2 s (bounded count). The kernel queues what coturn cannot read and drops the rest; the
exporter must show it per relay (socket drops, rx queue) and netns-wide (RcvbufErrors).
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import require
from turnstorm.proto import stun
from turnstorm.relay.cgroup import CgroupError, CpuCgroup
from turnstorm.relay.collector import RelayCollector, collector_values
from turnstorm.relay.process import LocalRelay, loopback_relay_config, stun_ready

pytestmark = pytest.mark.integration

FLOOD_SECONDS = 2.0
FLOOD_MAX_PACKETS = 400_000


@pytest.fixture
def capped_relay(turnserver_bin: str) -> Iterator[LocalRelay]:
    config = loopback_relay_config(relay_threads=1)
    cgroup = CpuCgroup(f"flood-{secrets.token_hex(4)}", 0.05)
    try:
        cgroup.create()
    except CgroupError as exc:
        require(False, f"CPU cgroup unavailable: {exc}")
    try:
        with LocalRelay(config, secrets.token_urlsafe(24)) as relay:
            assert relay.pid is not None
            cgroup.add(relay.pid)
            yield relay
    finally:
        cgroup.remove()


def flood(host: str, port: int, collector: RelayCollector) -> tuple[int, int]:
    """Send Binding requests for FLOOD_SECONDS (at most FLOOD_MAX_PACKETS); return the
    packets sent and the largest rx queue (bytes) seen on the relay's sockets."""
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST).encode()
    sent = peak = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        sock.setblocking(False)
        deadline = time.monotonic() + FLOOD_SECONDS
        while sent < FLOOD_MAX_PACKETS and time.monotonic() < deadline:
            for _ in range(500):
                try:
                    sock.send(request)
                    sent += 1
                except BlockingIOError:
                    break
                except ConnectionRefusedError:  # an ICMP error from an earlier datagram
                    continue
            if sent % 20_000 < 500:
                peak = max(peak, int(collector_values(collector).get("rx_queue_bytes", 0)))
    return sent, peak


def test_flooded_capped_relay_drops_datagrams(capped_relay: LocalRelay) -> None:
    relay = capped_relay
    collector = RelayCollector("flooded", None, relay.pid, cache_seconds=0.0)
    before = collector_values(collector)
    sent, peak_queue = flood(relay.host, relay.port, collector)
    time.sleep(0.2)
    after = collector_values(collector)
    drops = after["socket_drops_total"] - before["socket_drops_total"]
    rcvbuf = after["udp_rcvbuf_errors_total"] - before["udp_rcvbuf_errors_total"]
    print(f"sent {sent} Binding requests in <= {FLOOD_SECONDS:g} s; relay socket drops "
          f"+{drops:.0f}, netns RcvbufErrors +{rcvbuf:.0f}, peak rx queue {peak_queue} B, "
          f"relay CPU {after['cpu_seconds_total'] - before['cpu_seconds_total']:.2f} s")
    assert sent > 10_000
    assert drops > 0, "the relay's sockets dropped nothing"
    # Socket drops here are receive-buffer overflows; the namespace counter includes them.
    assert rcvbuf >= drops
    assert peak_queue > 0
    # The relay still answers once the flood stops.
    time.sleep(0.5)
    assert stun_ready(relay.host, relay.port, timeout=2.0)

"""A real kernel CGNAT in network namespaces (root only), and a driver that runs behind it.

:class:`KernelCgnat` builds three namespaces and two veth pairs, nothing else::

    ts-sub-<id>                 ts-nat-<id>                          ts-relay-<id>
    100.64.0.10..  <-- veth --> 100.64.0.1 | 198.18.0.1  <-- veth --> 198.18.1.1 coturn
    (subscribers)               nft SNAT to 198.18.0.1:LO-HI         198.18.1.2 echo peer
                                conntrack UDP timeouts short

Subscribers sit in 100.64.0.0/24 (RFC 6598, what carrier NATs hand out); the NAT's outside
and the relay are in 198.18.0.0/15 (RFC 2544 benchmarking). The subscriber namespace only
has a route to 198.18.0.0/15 through the NAT; no namespace is connected to the machine's
own interfaces. The NAT has ``ports`` outside ports (port exhaustion beyond that) and a
UDP conntrack timeout of ``timeout`` seconds (mapping expiry). coturn allows exactly the
echo peer's address. Everything is deleted on :meth:`close` (also after a failure).

:func:`drive` is what runs inside the subscriber namespace (``python -m
turnstorm.loadgen.kernelnat`` with the JSON job on stdin): one gevent ``UdpClient`` per
subscriber address, each allocating through the NAT. Scenarios:

- ``expiry``: allocate, bind a channel to the echo peer, echo one packet, stay idle for
  ``idle`` seconds, then Refresh. A NAT that forgot the mapping gives the subscriber a new
  outside port, so the relay answers 437 (Allocation Mismatch), or 441 (Wrong
  Credentials) when that port last carried another subscriber's still-live allocation;
  the driver then re-allocates from a new socket (a new mapping) and echoes again.
- ``exhaust``: every subscriber allocates at once; with more subscribers than NAT ports
  the surplus' packets are dropped by the NAT and their allocations time out.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from turnstorm import children
from turnstorm.coturnconf import RelayConfig, render
from turnstorm.errors import TurnstormError

SUBSCRIBER_NET = "100.64.0"
NAT_INSIDE = "100.64.0.1"
NAT_OUTSIDE = "198.18.0.1"
RELAY_ADDRESS = "198.18.1.1"
PEER_ADDRESS = "198.18.1.2"
RELAY_PORT = 3478
PEER_PORT = 9000
FIRST_SUBSCRIBER = 10


class NetnsError(TurnstormError):
    """A namespace, link, rule or process of the kernel CGNAT could not be set up."""


def missing_tools() -> list[str]:
    """Commands the kernel CGNAT needs that are not installed."""
    return [tool for tool in ("ip", "nft", "turnserver") if shutil.which(tool) is None]


def _run(*command: str, stdin: str | None = None) -> str:
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=30,
                          check=False)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


@dataclass
class KernelCgnat:
    """Three namespaces, SNAT with ``ports`` outside ports and ``timeout`` s UDP mappings."""

    subscribers: int
    ports: int
    timeout: int
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    port_min: int = 40000
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    workdir: str = ""

    @property
    def sub(self) -> str:
        return f"ts-sub-{self.tag}"

    @property
    def nat(self) -> str:
        return f"ts-nat-{self.tag}"

    @property
    def relay(self) -> str:
        return f"ts-relay-{self.tag}"

    @property
    def sources(self) -> list[str]:
        return [f"{SUBSCRIBER_NET}.{FIRST_SUBSCRIBER + i}" for i in range(self.subscribers)]

    @property
    def port_range(self) -> tuple[int, int]:
        return self.port_min, self.port_min + self.ports - 1

    def __enter__(self) -> KernelCgnat:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(self) -> None:
        if not 0 < self.subscribers <= 200 or not 0 < self.ports <= 1000 or self.timeout < 1:
            raise NetnsError("kernel CGNAT needs 1-200 subscribers, 1-1000 ports, timeout >= 1")
        for name in (self.sub, self.nat, self.relay):
            _run("ip", "netns", "add", name)
            self.namespaces.append(name)
            self.ip(name, "link", "set", "lo", "up")
        inside, sub_if = f"tsn{self.tag}", f"tss{self.tag}"
        outside, relay_if = f"tso{self.tag}", f"tsr{self.tag}"
        _run("ip", "link", "add", sub_if, "netns", self.sub, "type", "veth", "peer", "name",
             inside, "netns", self.nat)
        _run("ip", "link", "add", outside, "netns", self.nat, "type", "veth", "peer", "name",
             relay_if, "netns", self.relay)
        for address in self.sources:
            self.ip(self.sub, "addr", "add", f"{address}/24", "dev", sub_if)
        self.ip(self.nat, "addr", "add", f"{NAT_INSIDE}/24", "dev", inside)
        self.ip(self.nat, "addr", "add", f"{NAT_OUTSIDE}/23", "dev", outside)
        for address in (RELAY_ADDRESS, PEER_ADDRESS):
            self.ip(self.relay, "addr", "add", f"{address}/23", "dev", relay_if)
        for namespace, link in ((self.sub, sub_if), (self.nat, inside), (self.nat, outside),
                                (self.relay, relay_if)):
            self.ip(namespace, "link", "set", link, "up")
        self.ip(self.sub, "route", "add", "198.18.0.0/15", "via", NAT_INSIDE)
        self.exec(self.nat, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        low, high = self.port_range
        self.exec(self.nat, "nft", "-f", "-", stdin=(
            "table ip turnstorm_cgnat {\n"
            " chain postrouting {\n"
            "  type nat hook postrouting priority srcnat; policy accept;\n"
            f"  ip saddr {SUBSCRIBER_NET}.0/24 oifname \"{outside}\" meta l4proto udp "
            f"snat to {NAT_OUTSIDE}:{low}-{high}\n"
            " }\n"
            "}\n"))
        for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
            self.exec(self.nat, "sysctl", "-qw", f"net.netfilter.{key}={self.timeout}")
        self.start_relay()

    def ip(self, namespace: str, *args: str) -> None:
        _run("ip", "-n", namespace, *args)

    def exec(self, namespace: str, *command: str, stdin: str | None = None) -> str:
        return _run("ip", "netns", "exec", namespace, *command, stdin=stdin)

    def spawn(self, namespace: str, *command: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(["ip", "netns", "exec", namespace, *command],
                                   start_new_session=True, **kwargs)
        self.processes.append(process)
        return process

    def start_relay(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="turnstorm-kernelnat-")
        config = RelayConfig(
            realm="turnstorm.cgnat", listening_ips=[RELAY_ADDRESS], relay_ip=RELAY_ADDRESS,
            listening_port=RELAY_PORT, tcp=False, min_port=50000, max_port=50999,
            allowed_peers=[f"{PEER_ADDRESS}/32"], hide_software=False,
            log_file=os.path.join(self.workdir, "turnserver.log"),
            pid_file=os.path.join(self.workdir, "turnserver.pid"),
            userdb=os.path.join(self.workdir, "turndb"))
        path = os.path.join(self.workdir, "turnserver.conf")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(render(config, secret=self.secret))
        turnserver = shutil.which("turnserver") or "turnserver"
        self.spawn(self.relay, turnserver, "-c", path, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        echo = self.spawn(self.relay, sys.executable, "-m", "turnstorm.loadgen.echo", "--host",
                          PEER_ADDRESS, "--port", str(PEER_PORT), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE)
        assert echo.stdout is not None
        if not echo.stdout.readline().startswith(b"echo listening on"):
            raise NetnsError("the echo peer did not start in the relay namespace")
        self.exec(self.relay, sys.executable, "-c", (
            "import sys, time\n"
            "from turnstorm.relay.process import stun_ready\n"
            "deadline = time.monotonic() + 10\n"
            f"while not stun_ready({RELAY_ADDRESS!r}, {RELAY_PORT}):\n"
            "    if time.monotonic() > deadline:\n"
            "        sys.exit('turnserver did not answer STUN within 10 s')\n"
            "    time.sleep(0.05)\n"))

    def drive(self, scenario: str, *, idle: float = 0.0, timeout: float = 25.0,
              policy: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run :func:`drive` in the subscriber namespace; its JSON result."""
        job = {"scenario": scenario, "relay": [RELAY_ADDRESS, RELAY_PORT],
               "peer": [PEER_ADDRESS, PEER_PORT], "sources": self.sources,
               "secret": self.secret, "idle": idle, "policy": policy or {}}
        done = subprocess.run(
            ["ip", "netns", "exec", self.sub, sys.executable, "-m",
             "turnstorm.loadgen.kernelnat"], input=json.dumps(job), capture_output=True,
            text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise NetnsError(f"the driver failed: {done.stderr.strip()[-2000:]}")
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def conntrack_udp_entries(self) -> int:
        """UDP conntrack entries in the NAT namespace now."""
        text = self.exec(self.nat, "cat", "/proc/net/nf_conntrack") if os.path.exists(
            "/proc/net/nf_conntrack") else ""
        return sum(1 for line in text.splitlines() if " udp " in f" {line} ")

    def close(self) -> None:
        children.stop(*self.processes, group=True)
        for process in self.processes:
            if process.stdout is not None:
                process.stdout.close()
        self.processes.clear()
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False,
                           timeout=30)
        self.namespaces.clear()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = ""


# -- the driver (runs inside the subscriber namespace) --------------------------------------


def drive(job: dict[str, Any]) -> dict[str, Any]:
    import gevent

    from turnstorm.loadgen.wire import UdpClient
    from turnstorm.proto.credentials import Credentials
    from turnstorm.proto.transaction import RetransmitPolicy

    relay = (job["relay"][0], int(job["relay"][1]))
    peer = (job["peer"][0], int(job["peer"][1]))
    policy = RetransmitPolicy(**{"rto": 0.2, "rc": 4, "rm": 4, **job["policy"]})

    def subscriber(index: int, source: str) -> dict[str, Any]:
        credentials = Credentials.ephemeral(job["secret"], f"sub{index}", time.time())
        clients: list[Any] = []

        def connect() -> Any:
            clients.append(UdpClient(relay, credentials=credentials, local=(source, 0),
                                     policy=policy))
            return clients[-1]

        try:
            return _session(connect, peer, job["scenario"], float(job["idle"]))
        finally:
            clients[-1].release_and_close(timeout=2)
            for client in clients[:-1]:
                client.close()

    greenlets = [gevent.spawn(subscriber, i, s) for i, s in enumerate(job["sources"])]
    gevent.joinall(greenlets)
    return {"subscribers": [g.value if g.successful() else {"error": repr(g.exception)}
                            for g in greenlets]}


def _session(connect: Any, peer: tuple[str, int], scenario: str,
             idle: float) -> dict[str, Any]:
    """One subscriber's story (see the module docstring); ``connect()`` opens a new socket."""
    from turnstorm.errors import AllocationMismatch, WrongCredentials

    client = connect()
    result: dict[str, Any] = {"source": list(client.local_address)}
    try:
        allocation, _ = client.allocate()
    except Exception as exc:
        result["allocate"] = type(exc).__name__
        return result
    result["allocate"] = "ok"
    result["mapped"] = list(allocation.mapped)
    result["echo"] = _echo(client, peer)
    if scenario != "expiry":
        return result
    gevent_sleep(idle)
    try:
        client.refresh(600)
        result["refresh"] = "ok"
        return result
    except (AllocationMismatch, WrongCredentials) as exc:
        # 437: the new outside port has no allocation. 441: it has one, made by another
        # subscriber whose expired mapping held this port before (a CGN reusing ports
        # without a hold-down hands over relay state).
        result["refresh"] = str(exc.code)
    # like a real client: a new socket (a new mapping) and a new allocation
    for attempt in range(1, 6):
        client = connect()
        try:
            allocation, _ = client.allocate()
        except (AllocationMismatch, WrongCredentials):
            continue  # that port's old allocation is still there: try another mapping
        result["reallocated"] = list(allocation.mapped)
        result["reconnects"] = attempt
        result["echo_after"] = _echo(client, peer)
        break
    return result


def _echo(client: Any, peer: tuple[str, int]) -> bool:
    """Bind a channel to ``peer`` (with its permission) and echo one packet through it."""
    from gevent.event import Event

    client.create_permission(peer)
    channel, _ = client.channel_bind(peer)
    back = Event()
    client.on_channel_data = lambda number, payload, at: back.set()
    client.send_channel(channel, b"turnstorm-kernelnat")
    return bool(back.wait(2.0))


def gevent_sleep(seconds: float) -> None:
    import gevent

    gevent.sleep(seconds)


def main(argv: Sequence[str] | None = None) -> int:
    job = json.loads(sys.stdin.read())
    print(json.dumps(drive(job)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

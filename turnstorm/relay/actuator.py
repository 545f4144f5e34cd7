"""The process actuator of the local mode: a pool of real coturn relays on loopback.

Addressing (chosen): **one loopback address per relay, the same listening port on all**.
Relay ``k`` gets the next free address of 127.0.0.2, 127.0.0.3, ... (an address whose
listening port is taken by someone else is skipped). Because every relay owns its address,
all relays use the same relay-port range (``min_port``-``max_port``, below the kernel's
ephemeral range) without overlapping: coturn binds relay sockets on its ``relay-ip``. The
admin CLI of each relay listens on its own port of 127.0.0.1 with a random password.

Each relay runs coturn with the rendered secure config (:mod:`turnstorm.coturnconf`) and
is moved into its own CPU-capped cgroup (:mod:`turnstorm.relay.cgroup`), like a pod limit, so
adding relays adds real capacity even on a small machine.

Rotation and drain: the pool's *rotation* is the list of relay URIs handed to new
clients (:meth:`LocalPool.rotation`). :meth:`LocalPool.drain` takes a relay out of it and
also sets a coturn-level guard: the CLI command ``aas HOST:PORT`` (alternate server)
makes the drained relay answer every new Allocate with ``300 Try Alternate`` naming a
relay still in rotation, while the existing allocations keep refreshing, binding
channels and relaying (measured on coturn 4.6.1, which has no drain mode). Undraining
deletes the alternate again (``das``). :meth:`LocalPool.remove` stops a relay; the
allocations it still held are counted in :attr:`LocalPool.allocations_cut`.

Everything (processes, cgroups, metrics endpoint) is released by :meth:`LocalPool.close`,
on context exit and, for pools left open, at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import secrets
import socket
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from turnstorm.errors import TurnstormError
from turnstorm.policy import Applied, Decision, RelaySample
from turnstorm.relay.cgroup import CgroupError, CpuCgroup
from turnstorm.relay.collector import Exporter, RelayCollector, collector_values
from turnstorm.relay.coturncli import CoturnCli, CoturnCliError
from turnstorm.relay.process import LocalRelay, free_port, loopback_relay_config
from turnstorm.signals import SignalTracker

DEFAULT_MIN_PORT = 24000
DEFAULT_MAX_PORT = 24999
FIRST_HOST = 2
LAST_HOST = 254

_live_pools: weakref.WeakSet[LocalPool] = weakref.WeakSet()


class PoolError(TurnstormError):
    """The local pool cannot do what was asked."""


@dataclass
class PoolRelay:
    """One relay of the pool."""

    name: str
    relay: LocalRelay
    cli: CoturnCli
    collector: RelayCollector
    cgroup: CpuCgroup | None = None
    draining: bool = False
    drain_started: float | None = None
    alternate: str | None = None
    """``HOST:PORT`` given to coturn's ``aas`` while draining."""
    cpu_factor: float = 1.0
    """CPU cap now, as a factor of the pool's ``cpus`` (vertical resizing)."""

    @property
    def host(self) -> str:
        return self.relay.host

    @property
    def port(self) -> int:
        return self.relay.port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def uri(self) -> str:
        return f"turn:{self.host}:{self.port}?transport=udp"

    @property
    def pid(self) -> int | None:
        return self.relay.pid


def _port_free(host: str, port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


@dataclass(eq=False)
class LocalPool:
    """Starts, drains and stops coturn relays on 127.0.0.x; applies policy decisions."""

    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    cpus: float | None = 0.5
    """CPU limit per relay in cores (None: no cgroup)."""
    port: int | None = None
    """Listening port shared by all relays (default: one free on 127.0.0.2)."""
    min_port: int = DEFAULT_MIN_PORT
    max_port: int = DEFAULT_MAX_PORT
    prefix: str = "relay"
    cgroup_prefix: str = field(default_factory=lambda: f"pool-{secrets.token_hex(4)}")
    relay_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra :class:`~turnstorm.coturnconf.RelayConfig` fields for every relay."""
    metrics: tuple[str, int] | None = None
    """Serve every relay's metrics on this ``(host, port)`` (port 0: any)."""
    clock: Callable[[], float] = time.monotonic
    relays: dict[str, PoolRelay] = field(default_factory=dict)
    allocations_cut: int = 0
    """Allocations that were still live on relays when they were removed."""
    events: list[str] = field(default_factory=list)
    """What the pool did, in order (one line each)."""

    def __post_init__(self) -> None:
        self._counter = 0
        self._exporter: Exporter | None = None
        self._tracker = SignalTracker(cpu_limit_cores=self.cpus,
                                      drops_source="socket_drops_total")
        _live_pools.add(self)

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> LocalPool:
        if self.metrics is not None and self._exporter is None:
            self._exporter = Exporter([], *self.metrics).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def metrics_url(self) -> str | None:
        return self._exporter.url if self._exporter is not None else None

    def _log(self, text: str) -> None:
        self.events.append(text)

    def _next_host(self) -> str:
        used = {r.host for r in self.relays.values()}
        for last in range(FIRST_HOST, LAST_HOST + 1):
            host = f"127.0.0.{last}"
            if host in used:
                continue
            if self.port is None:
                self.port = free_port(host)
                return host
            if _port_free(host, self.port):
                return host
        raise PoolError(f"no loopback address 127.0.0.{FIRST_HOST}-{LAST_HOST} has port "
                        f"{self.port} free")

    def start_relay(self, name: str | None = None) -> PoolRelay:
        """Start one relay (in rotation once it answers STUN)."""
        if name is None:
            while f"{self.prefix}-{self._counter}" in self.relays:
                self._counter += 1
            name = f"{self.prefix}-{self._counter}"
            self._counter += 1
        if name in self.relays:
            raise PoolError(f"relay {name!r} exists already")
        host = self._next_host()
        password = secrets.token_urlsafe(18)
        config = loopback_relay_config(
            host, port=self.port, min_port=self.min_port, max_port=self.max_port,
            cli_port=free_port("127.0.0.1"), cli_password=password,
            **self.relay_overrides)
        assert config.cli_port is not None
        relay = LocalRelay(config, self.secret)
        cgroup = None
        if self.cpus is not None:
            cgroup = CpuCgroup(f"{self.cgroup_prefix}-{name}", self.cpus).create()
        try:
            relay.start()
            if cgroup is not None:
                assert relay.pid is not None
                cgroup.add(relay.pid)
        except BaseException:
            relay.stop()
            if cgroup is not None:
                cgroup.remove()
            raise
        cli = CoturnCli("127.0.0.1", config.cli_port, password)
        member = PoolRelay(name, relay, cli, RelayCollector(name, cli, relay.pid), cgroup)
        self.relays[name] = member
        if self._exporter is not None:
            self._exporter.registry.register(member.collector)
        self._log(f"started {name} on {member.address}"
                  + (f" capped at {self.cpus:g} CPU" if cgroup else ""))
        return member

    def get(self, name: str) -> PoolRelay:
        try:
            return self.relays[name]
        except KeyError:
            raise PoolError(f"no relay named {name!r} in the pool") from None

    def in_rotation(self) -> list[PoolRelay]:
        return [r for r in self.relays.values() if not r.draining]

    def rotation(self) -> list[str]:
        """URIs handed to new clients: every relay that is not draining."""
        return [r.uri for r in self.in_rotation()]

    def rotation_addresses(self) -> list[tuple[str, int]]:
        return [(r.host, r.port) for r in self.in_rotation()]

    # -- drain ----------------------------------------------------------------------------

    def _pick_alternate(self, exclude: str) -> PoolRelay | None:
        candidates = [r for r in self.in_rotation() if r.name != exclude]
        return candidates[0] if candidates else None

    def _set_alternate(self, member: PoolRelay) -> None:
        target = self._pick_alternate(member.name)
        wanted = target.address if target is not None else None
        if wanted == member.alternate:
            return
        try:
            if member.alternate is not None:
                member.cli.delete_alternate_server(member.alternate)
                member.alternate = None
            if wanted is not None:
                member.cli.add_alternate_server(wanted)
                member.alternate = wanted
        except CoturnCliError as exc:
            self._log(f"{member.name}: alternate-server guard not set: {exc}")

    def drain(self, name: str, now: float | None = None) -> None:
        """Out of rotation; new Allocates get 300 Try Alternate (when another relay is in
        rotation). Existing allocations are untouched."""
        member = self.get(name)
        if member.draining:
            return
        member.draining = True
        member.drain_started = self.clock() if now is None else now
        self._set_alternate(member)
        # Relays already draining towards this one need another target.
        for other in self.relays.values():
            if other.draining and other.alternate == member.address:
                self._set_alternate(other)
        self._log(f"draining {name} (alternate {member.alternate or 'none'})")

    def undrain(self, name: str) -> None:
        member = self.get(name)
        if not member.draining:
            return
        if member.alternate is not None:
            with contextlib.suppress(CoturnCliError):
                member.cli.delete_alternate_server(member.alternate)
            member.alternate = None
        member.draining = False
        member.drain_started = None
        for other in self.relays.values():
            if other.draining and other.alternate is None:
                self._set_alternate(other)
        self._log(f"undrained {name}")

    def allocations(self, name: str) -> int:
        """Current allocations of relay ``name`` (coturn CLI ``pc``, not cached)."""
        return self.get(name).cli.total_allocations()

    def remove(self, name: str) -> int:
        """Stop relay ``name`` and remove its cgroup; returns the allocations it cut."""
        member = self.relays.pop(name, None)
        if member is None:
            raise PoolError(f"no relay named {name!r} in the pool")
        cut = 0
        try:
            cut = member.cli.total_allocations()
        except CoturnCliError:
            cut = 0
        self.allocations_cut += cut
        if self._exporter is not None:
            with contextlib.suppress(KeyError):
                self._exporter.registry.unregister(member.collector)
        member.cli.close()
        try:
            member.relay.stop()
        finally:
            if member.cgroup is not None:
                member.cgroup.remove()
            self._tracker.forget(name)
        for other in self.relays.values():
            if other.draining and other.alternate == member.address:
                self._set_alternate(other)
        self._log(f"removed {name} ({cut} allocations cut)")
        return cut

    # -- policy ---------------------------------------------------------------------------

    def samples(self, now: float) -> list[RelaySample]:
        """Policy input for every relay, from its collector (coturn CLI and kernel)."""
        samples = []
        for member in self.relays.values():
            values = collector_values(member.collector)
            signals = self._tracker.update(member.name, now, values)
            port_capacity = self.max_port - self.min_port + 1
            samples.append(RelaySample(
                name=member.name, ready=values.get("up", 0.0) >= 1.0, signals=signals,
                draining=member.draining, drain_started=member.drain_started,
                port_capacity=port_capacity, cpu_factor=member.cpu_factor))
        return samples

    def resize(self, name: str, factor: float) -> None:
        """Set one relay's CPU cap to ``factor`` times the pool's, in place: the relay
        and its allocations carry on (vertical resizing, as a pod resized in place)."""
        member = self.get(name)
        if member.cgroup is None or self.cpus is None:
            raise PoolError("resizing a relay needs a CPU-capped pool (cpus)")
        if not (math.isfinite(factor) and factor > 0):
            raise PoolError(f"CPU factor must be positive, not {factor!r}")
        member.cgroup.set_cpus(self.cpus * factor)
        self._log(f"resized {name} from {member.cpu_factor:.0%} to {factor:.0%} of "
                  f"{self.cpus:g} CPU")
        member.cpu_factor = factor

    def apply(self, decision: Decision, now: float | None = None) -> Applied:
        """Carry out a :class:`~turnstorm.policy.Decision`: undrain, drain, remove, start
        the relays it still asks for, then resize (a relay that cannot be resized is
        logged and keeps its CPU)."""
        now = self.clock() if now is None else now
        done = Applied(undrained=[], drained=[], removed=[], started=[], resized=[])
        for name in decision.undrain:
            self.undrain(name)
            done["undrained"].append(name)
        for name in decision.drain:
            self.drain(name, now)
            done["drained"].append(name)
        for name in decision.remove:
            if name in self.relays:
                self.remove(name)
                done["removed"].append(name)
        for _ in range(decision.scale_up):
            done["started"].append(self.start_relay().name)
        for name, factor in decision.resize.items():
            if name in self.relays and self.relays[name].cgroup is not None:
                try:
                    self.resize(name, factor)
                except TurnstormError as exc:  # one relay's cgroup: the others carry on
                    self._log(f"could not resize {name}: {exc}")
                    continue
                done["resized"].append(name)
        return done

    # -- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every relay, remove every cgroup and the metrics endpoint. Idempotent;
        keeps going past individual failures and raises the first one at the end."""
        first: BaseException | None = None
        for name in list(self.relays):
            try:
                self.remove(name)
            except (TurnstormError, OSError) as exc:
                first = first or exc
        if self._exporter is not None:
            self._exporter.close()
            self._exporter = None
        _live_pools.discard(self)
        if first is not None:
            raise first

    def __iter__(self) -> Iterator[PoolRelay]:
        return iter(list(self.relays.values()))


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_live_pools):
        with contextlib.suppress(TurnstormError, OSError, CgroupError):
            pool.close()

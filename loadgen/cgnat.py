"""An emulated carrier-grade NAT population (RFC 4787, RFC 6888), pure with explicit ``now``.

Subscribers sit behind G gateways. Each gateway has one outside address (locally a
127.x.y.z address, so the relay sees distinct source addresses), a port quota (the ports
it may hand out) and a UDP mapping timeout. A subscriber's outbound packet creates or
refreshes its mapping ``subscriber -> (gateway address, port)``; a mapping idle longer
than the timeout expires and its port returns to the pool. The next packet then gets a
new port: a new 5-tuple for the relay, which is what forces re-binding and
re-allocation (and the 437 Allocation Mismatch errors when a client refreshes an
allocation it made from the old 5-tuple). With every port mapped, new subscribers fail
(:class:`PortQuotaExhausted`), as on a real CGN.

The load generator binds each subscriber's UDP socket to its mapping, so the relay sees
exactly the tuples a real CGN would produce.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from turnstorm.errors import TurnstormError

DEFAULT_BASE_ADDRESS = "127.100.0.1"
DEFAULT_PORT_MIN = 40000
RFC4787_MIN_TIMEOUT = 120.0
"""RFC 4787 REQ-5: a UDP mapping timer must not expire in less than two minutes (the
emulation allows shorter ones, to model non-compliant CGNs and to keep tests fast)."""


class PortQuotaExhausted(TurnstormError):
    """Every port of a gateway is held by a live mapping."""


@dataclass(frozen=True)
class Gateway:
    """One NAT gateway: outside address, port range, mapping timeout."""

    address: str
    port_min: int
    port_max: int
    timeout: float
    """Seconds a mapping lives without outbound traffic."""
    hold: float = 0.0
    """Seconds an expired mapping's port stays unusable before it is handed out again
    (a port hold-down: reusing a port at once hands the new subscriber the relay state
    of the old one, e.g. a 437 for its Allocate)."""

    def __post_init__(self) -> None:
        if not 0 < self.port_min <= self.port_max < 65536:
            raise ValueError(f"gateway {self.address}: port range {self.port_min}-"
                             f"{self.port_max} is invalid")
        if self.timeout <= 0 or self.hold < 0:
            raise ValueError(f"gateway {self.address}: mapping timeout must be positive "
                             "and the port hold-down not negative")

    @property
    def quota(self) -> int:
        return self.port_max - self.port_min + 1


@dataclass
class Mapping:
    """A live subscriber -> (address, port) binding on one gateway."""

    subscriber: int
    gateway: int
    address: str
    port: int
    created: float
    last_used: float


@dataclass
class _GatewayState:
    gateway: Gateway
    ports: dict[int, Mapping] = field(default_factory=dict)
    """Port -> the mapping holding it (possibly expired, reclaimed lazily)."""
    cursor: int = 0


@dataclass
class PopulationStats:
    mappings_created: int = 0
    mappings_expired: int = 0
    remaps: int = 0
    """Subscribers that got a new port after their previous mapping expired."""
    exhausted: int = 0
    """Mapping attempts refused because the gateway had no free port."""


class Population:
    """Subscribers spread over gateways (subscriber ``n`` sits behind gateway ``n % G``)."""

    def __init__(self, gateways: list[Gateway]) -> None:
        if not gateways:
            raise ValueError("a CGNAT population needs at least one gateway")
        self.gateways = [_GatewayState(g) for g in gateways]
        self.mappings: dict[int, Mapping] = {}
        self.stats = PopulationStats()
        self._expired_subscribers: set[int] = set()

    @classmethod
    def build(
        cls,
        gateways: int,
        quota: int,
        timeout: float = RFC4787_MIN_TIMEOUT,
        *,
        hold: float = 0.0,
        base_address: str = DEFAULT_BASE_ADDRESS,
        port_min: int = DEFAULT_PORT_MIN,
    ) -> Population:
        """``gateways`` gateways on consecutive addresses from ``base_address``, each
        handing out ports ``port_min .. port_min + quota - 1``."""
        if gateways < 1 or quota < 1:
            raise ValueError("a CGNAT population needs gateways >= 1 and quota >= 1")
        base = ipaddress.ip_address(base_address)
        return cls([Gateway(str(base + i), port_min, port_min + quota - 1, timeout, hold)
                    for i in range(gateways)])

    def gateway_of(self, subscriber: int) -> int:
        return subscriber % len(self.gateways)

    def _alive(self, mapping: Mapping, now: float) -> bool:
        return now - mapping.last_used < self.gateways[mapping.gateway].gateway.timeout

    def lookup(self, subscriber: int, now: float) -> Mapping | None:
        """The subscriber's live mapping, or None (no traffic yet, or it expired)."""
        mapping = self.mappings.get(subscriber)
        if mapping is None:
            return None
        if not self._alive(mapping, now):
            self._expire(mapping)
            return None
        return mapping

    def map(self, subscriber: int, now: float) -> Mapping:
        """An outbound packet from ``subscriber`` at ``now``: its (new or refreshed) mapping.

        Raises :class:`PortQuotaExhausted` when a new mapping is needed and the gateway has
        no free port.
        """
        mapping = self.lookup(subscriber, now)
        if mapping is not None:
            mapping.last_used = now
            return mapping
        state = self.gateways[self.gateway_of(subscriber)]
        port = self._free_port(state, now)
        if port is None:
            self.stats.exhausted += 1
            gateway = state.gateway
            raise PortQuotaExhausted(
                f"CGNAT gateway {gateway.address}: all {gateway.quota} ports are mapped "
                f"(ports {gateway.port_min}-{gateway.port_max})")
        mapping = Mapping(subscriber, self.gateway_of(subscriber), state.gateway.address, port,
                          now, now)
        state.ports[port] = mapping
        self.mappings[subscriber] = mapping
        self.stats.mappings_created += 1
        if subscriber in self._expired_subscribers:
            self._expired_subscribers.discard(subscriber)
            self.stats.remaps += 1
        return mapping

    def touch(self, subscriber: int, now: float) -> bool:
        """Outbound traffic on an existing mapping; False when it had already expired."""
        mapping = self.lookup(subscriber, now)
        if mapping is None:
            return False
        mapping.last_used = now
        return True

    def expire(self, now: float) -> list[int]:
        """Expire every idle mapping now; returns the subscribers that lost theirs."""
        expired = [m for m in self.mappings.values() if not self._alive(m, now)]
        for mapping in expired:
            self._expire(mapping)
        return [m.subscriber for m in expired]

    def in_use(self, gateway: int, now: float) -> int:
        """Live mappings on ``gateway`` at ``now``."""
        return sum(1 for m in self.gateways[gateway].ports.values() if self._alive(m, now))

    def _expire(self, mapping: Mapping) -> None:
        """Forget the subscriber's mapping; its port is reclaimed by :meth:`_free_port`
        once the hold-down has passed."""
        if self.mappings.get(mapping.subscriber) is mapping:
            del self.mappings[mapping.subscriber]
            self._expired_subscribers.add(mapping.subscriber)
            self.stats.mappings_expired += 1

    def _free_port(self, state: _GatewayState, now: float) -> int | None:
        """The next free port after the cursor (ports rotate: a just-freed port is reused
        last), reclaiming expired holders whose hold-down has passed."""
        gateway = state.gateway
        for step in range(gateway.quota):
            offset = (state.cursor + step) % gateway.quota
            port = gateway.port_min + offset
            holder = state.ports.get(port)
            if holder is not None and not self._alive(holder, now):
                self._expire(holder)
                if now >= holder.last_used + gateway.timeout + gateway.hold:
                    del state.ports[port]
                    holder = None
            if holder is None:
                state.cursor = (offset + 1) % gateway.quota
                return port
        return None

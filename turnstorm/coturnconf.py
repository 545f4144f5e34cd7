"""Render ``turnserver.conf`` for coturn. Pure: data in, text out.

Secure by default: ``use-auth-secret`` always on, peers in private, CGNAT, loopback,
link-local and cloud-metadata ranges denied unless explicitly allowed, quotas set,
multicast peers off, the CLI bound to loopback with a password or off. The shared
secret is only written when the caller asks (a private local file); in Kubernetes it is
passed from a Secret at start-up and never lands in a ConfigMap.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from turnstorm.errors import TurnstormError

DEFAULT_DENIED_PEERS: tuple[str, ...] = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)
"""Peer ranges a relay must not reach by default: RFC 1918, CGNAT (RFC 6598), loopback,
link-local (which holds cloud metadata at 169.254.169.254), ULA."""

EPHEMERAL_PORTS = (32768, 60999)


class RelayConfigError(TurnstormError, ValueError):
    """A relay configuration that would be insecure or cannot work (a ValueError too, as
    it always was)."""


@dataclass
class RelayConfig:
    """Everything that goes into one relay's ``turnserver.conf``."""

    realm: str
    """Authentication realm (REALM attribute)."""
    listening_ips: list[str] = field(default_factory=lambda: ["0.0.0.0"])
    """Addresses the STUN/TURN listener binds."""
    relay_ip: str | None = None
    """Address relayed transport addresses are allocated on (default: coturn's choice)."""
    external_ip: str | None = None
    """Public address advertised in XOR-RELAYED-ADDRESS when behind 1:1 NAT."""
    listening_port: int = 3478
    """UDP and TCP listener port."""
    tls_port: int | None = None
    """TLS/DTLS listener port; None disables TLS and DTLS."""
    tcp: bool = True
    """Accept TURN over TCP on the listening port."""
    min_port: int = 49152
    """First relay port."""
    max_port: int = 65535
    """Last relay port."""
    denied_peers: list[str] = field(default_factory=lambda: list(DEFAULT_DENIED_PEERS))
    """Peer CIDRs relaying to which is refused (403)."""
    allowed_peers: list[str] = field(default_factory=list)
    """Peer CIDRs explicitly allowed; they are removed from the denied list."""
    user_quota: int = 10
    """Concurrent allocations per username."""
    total_quota: int = 2000
    """Concurrent allocations per relay."""
    max_bps: int = 0
    """Bytes/s per session (0: unlimited)."""
    bps_capacity: int = 0
    """Bytes/s for the whole relay (0: unlimited)."""
    stale_nonce: int = 600
    """Nonce lifetime, seconds."""
    max_allocate_lifetime: int = 3600
    """Largest LIFETIME granted, seconds."""
    cli_port: int | None = None
    """Telnet admin CLI port on 127.0.0.1; None turns the CLI off."""
    cli_password: str | None = None
    """CLI password (required when the CLI is on)."""
    relay_threads: int | None = None
    """coturn relay threads (default: one per CPU)."""
    hide_software: bool = True
    """Omit the SOFTWARE attribute (do not advertise the version)."""
    log_file: str = "stdout"
    """Where coturn logs."""
    pid_file: str | None = None
    """coturn pid file."""
    userdb: str | None = None
    """coturn's SQLite database (unused with use-auth-secret, but coturn opens it)."""
    extra: list[str] = field(default_factory=list)
    """Raw extra lines, appended verbatim (reviewed by whoever sets them)."""

    def validate(self) -> None:
        if not 0 < self.min_port <= self.max_port <= 65535:
            raise RelayConfigError(f"relay port range {self.min_port}-{self.max_port} is invalid")
        if self.cli_port is not None and not self.cli_password:
            raise RelayConfigError("the coturn CLI needs a password when it is on")
        if not self.realm:
            raise RelayConfigError("realm must not be empty")
        # one line per option: a value carrying whitespace or a control character could
        # end its line and add options of its own (an open relay, a secret in a ConfigMap)
        values = {"realm": self.realm, "relay_ip": self.relay_ip,
                  "external_ip": self.external_ip, "cli_password": self.cli_password,
                  "log_file": self.log_file, "pid_file": self.pid_file, "userdb": self.userdb}
        values.update({f"listening_ips[{i}]": v for i, v in enumerate(self.listening_ips)})
        values.update({f"denied_peers[{i}]": v for i, v in enumerate(self.denied_peers)})
        values.update({f"allowed_peers[{i}]": v for i, v in enumerate(self.allowed_peers)})
        for name, value in values.items():
            if value is not None and (not value.isprintable() or any(c.isspace()
                                                                    for c in value)):
                raise RelayConfigError(f"{name} {value!r} contains whitespace or a control "
                                  "character")
        for name in ("relay_ip", "external_ip"):
            value = getattr(self, name)
            if value is not None:
                try:
                    ipaddress.ip_address(value)
                except ValueError:
                    raise RelayConfigError(f"{name} {value!r} is not an IP address") from None
        for quota, name in ((self.user_quota, "user_quota"), (self.total_quota, "total_quota")):
            if quota <= 0:
                raise RelayConfigError(f"{name} must be positive (0 would mean unlimited)")


def cidr_to_range(cidr: str) -> str:
    """coturn takes peer ranges as ``first-last``, not CIDR."""
    try:
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise RelayConfigError(f"{cidr!r} is not a CIDR network") from None
    if network.num_addresses == 1:
        return str(network.network_address)
    return f"{network.network_address}-{network.broadcast_address}"


def effective_denied(denied: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """Denied networks, less those wholly inside an allowed one.

    A narrower allowance inside a denied range needs no carving: coturn checks
    ``allowed-peer-ip`` before ``denied-peer-ip`` (verified on the wire by the tests).
    """
    allowed_nets = [ipaddress.ip_network(a, strict=False) for a in allowed]
    result = []
    for entry in denied:
        net = ipaddress.ip_network(entry, strict=False)
        if not any(net.version == hole.version and net.subnet_of(hole)  # type: ignore[arg-type]
                   for hole in allowed_nets):
            result.append(str(net))
    return result


def render(config: RelayConfig, *, secret: str | None = None) -> str:
    """The ``turnserver.conf`` text. ``secret`` is written only when given."""
    config.validate()
    lines = ["# rendered by turnstorm; edit the TurnPool, not this file"]
    lines += [f"listening-ip={ip}" for ip in config.listening_ips]
    if config.relay_ip:
        lines.append(f"relay-ip={config.relay_ip}")
    if config.external_ip:
        lines.append(f"external-ip={config.external_ip}")
    lines.append(f"listening-port={config.listening_port}")
    if config.tls_port is None:
        lines += ["no-tls", "no-dtls"]
    else:
        lines.append(f"tls-listening-port={config.tls_port}")
    if not config.tcp:
        lines.append("no-tcp")
    lines += [
        f"min-port={config.min_port}",
        f"max-port={config.max_port}",
        "use-auth-secret",
        f"realm={config.realm}",
        "fingerprint",
        "no-multicast-peers",
        "no-tcp-relay",
        f"stale-nonce={config.stale_nonce}",
        f"max-allocate-lifetime={config.max_allocate_lifetime}",
        f"user-quota={config.user_quota}",
        f"total-quota={config.total_quota}",
    ]
    if config.max_bps:
        lines.append(f"max-bps={config.max_bps}")
    if config.bps_capacity:
        lines.append(f"bps-capacity={config.bps_capacity}")
    allowed = list(config.allowed_peers)
    if any(ipaddress.ip_network(a, strict=False).is_loopback for a in allowed):
        lines.append("allow-loopback-peers")
    lines += [f"denied-peer-ip={cidr_to_range(c)}"
              for c in effective_denied(config.denied_peers, allowed)]
    lines += [f"allowed-peer-ip={cidr_to_range(c)}" for c in allowed]
    if config.cli_port is None:
        lines.append("no-cli")
    else:
        lines += ["cli-ip=127.0.0.1", f"cli-port={config.cli_port}",
                  f"cli-password={config.cli_password}"]
    if config.relay_threads:
        lines.append(f"relay-threads={config.relay_threads}")
    if config.hide_software:
        lines.append("no-software-attribute")
    lines += [f"log-file={config.log_file}", "simple-log", "no-stdout-log"
              if config.log_file != "stdout" else "new-log-timestamp"]
    if config.pid_file:
        lines.append(f"pidfile={config.pid_file}")
    if config.userdb:
        lines.append(f"userdb={config.userdb}")
    if secret is not None:
        if "\n" in secret or not secret:
            raise RelayConfigError("the shared secret must be one non-empty line")
        lines.append(f"static-auth-secret={secret}")
    lines += config.extra
    return "\n".join(lines) + "\n"

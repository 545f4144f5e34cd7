"""STUN/TURN URIs (RFC 7064, RFC 7065) and the target allow-list.

turnstorm only sends traffic to loopback unless the user names more targets: a load
generator pointed at someone else's relay by a typo is an attack.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from turnstorm.errors import TurnstormError

DEFAULT_PORTS = {"stun": 3478, "turn": 3478, "stuns": 5349, "turns": 5349}
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class UriError(TurnstormError):
    """A STUN/TURN URI that cannot be used."""


class TargetNotAllowed(TurnstormError):
    """A target outside loopback that the user did not allow."""


class HostPortError(ValueError):
    """A ``HOST:PORT`` that does not parse; :attr:`problem` says what is wrong, so that
    each caller words it for its own option."""

    BRACKETS = "brackets"
    NO_PORT = "no port"
    HOST = "host"
    PORT = "port"

    def __init__(self, problem: str, host: str) -> None:
        super().__init__(f"{problem}: {host!r}")
        self.problem = problem
        self.host = host


def split_host_port(text: str, default_port: int | None = None, *,
                    localhost: bool = False) -> tuple[str, int]:
    """``IPv4:PORT``, ``[IPv6]:PORT`` or, with ``default_port``, the address alone (an
    IPv6 address alone needs no brackets). The host is an IP literal; with ``localhost``
    the name ``localhost`` stands for 127.0.0.1. Raises :class:`HostPortError`."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise HostPortError(HostPortError.BRACKETS, host)
        port_text = rest[1:]
    elif text.count(":") > 1:
        host, port_text = text, ""
    else:
        host, _, port_text = text.partition(":")
    if not port_text:
        if default_port is None:
            raise HostPortError(HostPortError.NO_PORT, host)
        port_text = str(default_port)
    if localhost and host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise HostPortError(HostPortError.HOST, host) from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise HostPortError(HostPortError.PORT, host)
    return host, int(port_text)


def parse_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or (with a default port) a bare host; ValueError
    with the option-neutral message."""
    try:
        return split_host_port(text, default_port)
    except HostPortError as exc:
        raise ValueError({
            HostPortError.BRACKETS: f"{text!r}: unbalanced brackets",
            HostPortError.NO_PORT: f"{text!r} needs a port, as HOST:PORT",
            HostPortError.HOST: f"{text!r}: {exc.host!r} is not an IP address",
            HostPortError.PORT: f"{text!r}: port must be 1-65535",
        }[exc.problem]) from None


@dataclass(frozen=True)
class ServerUri:
    scheme: str
    host: str
    port: int
    transport: str

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}:{host}:{self.port}?transport={self.transport}"


def parse_uri(text: str) -> ServerUri:
    """Parse ``turn:127.0.0.1:3478?transport=udp`` and friends.

    Hosts must be IP literals (or ``localhost``): names would need DNS, and the
    allow-list is about addresses.
    """
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        raise UriError(f"invalid URI {text!r}: expected stun:HOST[:PORT] or "
                       "turn:HOST[:PORT][?transport=udp|tcp]")
    if scheme in ("stuns", "turns"):
        raise UriError(f"invalid URI {text!r}: TLS ({scheme}:) is not supported yet")
    rest, _, query = rest.partition("?")
    transport = "udp"
    if query:
        key, _, value = query.partition("=")
        if key != "transport" or value.lower() not in ("udp", "tcp"):
            raise UriError(f"invalid URI {text!r}: the only query is transport=udp or "
                           "transport=tcp")
        transport = value.lower()
    if not rest.startswith("[") and rest.count(":") > 1:
        raise UriError(f"invalid URI {text!r}: put IPv6 addresses in brackets, "
                       "turn:[::1]:3478")
    try:
        host, port = split_host_port(rest, DEFAULT_PORTS[scheme], localhost=True)
    except HostPortError as exc:
        raise UriError(f"invalid URI {text!r}: " + {
            HostPortError.BRACKETS: "bad IPv6 literal",
            HostPortError.HOST: f"host {exc.host!r} is not an IP address",
            HostPortError.PORT: "port must be 1-65535",
        }[exc.problem]) from None
    return ServerUri(scheme, host, port, transport)


def check_target(host: str, allowed: Iterable[str] = ()) -> None:
    """Raise :class:`TargetNotAllowed` unless ``host`` is loopback or in ``allowed``.

    ``allowed`` holds addresses or CIDR networks the user named (``--allow-target``);
    every entry is checked, so a typo is reported even when an earlier entry matches.
    """
    networks = []
    for entry in allowed:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise TargetNotAllowed(f"--allow-target {entry!r} is not an address or "
                                   "CIDR network") from None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise TargetNotAllowed(f"target {host!r} is not an IP address") from None
    if any(address in net for net in LOOPBACK):
        return
    if any(address in network for network in networks):
        return
    raise TargetNotAllowed(
        f"target {host} is not on loopback; name it with --allow-target {host} "
        "if you own it"
    )

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
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise UriError(f"invalid URI {text!r}: bad IPv6 literal")
        port_text = port_text[1:]
    elif rest.count(":") > 1:
        raise UriError(f"invalid URI {text!r}: put IPv6 addresses in brackets, "
                       "turn:[::1]:3478")
    else:
        host, _, port_text = rest.partition(":")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UriError(f"invalid URI {text!r}: host {host!r} is not an IP address") from None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise UriError(f"invalid URI {text!r}: port must be 1-65535")
        port = int(port_text)
    else:
        port = DEFAULT_PORTS[scheme]
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

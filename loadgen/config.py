"""What the Locust users need to know: targets, credentials, peer, session shape, bounds.

Pure data (no gevent). ``turnstorm storm`` builds a :class:`LoadgenConfig` directly; a
plain ``locust -f`` run builds it from the command-line options that
:mod:`turnstorm.loadgen.users` registers (see :func:`config_from_options`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from turnstorm.errors import TurnstormError
from turnstorm.probe import load_secret as read_secret
from turnstorm.proto.stun import Address
from turnstorm.proto.transaction import RetransmitPolicy
from turnstorm.uri import HostPortError, ServerUri, check_target, parse_uri, split_host_port

DEFAULT_MAX_PPS = 20000.0
"""Packets per second per generator process unless the user asks for another bound."""


CGNAT_KEY = "cgnat_gateways"
"""Key of a worker's share of the emulated CGNAT gateways in the JSON config it reads."""


class ConfigError(TurnstormError):
    """A load generator setting that cannot be used."""


@dataclass(frozen=True)
class SessionLength:
    """A distribution of call lengths in seconds: ``fixed:S``, ``uniform:A-B`` or ``exp:MEAN``
    (exponential, capped at 10x the mean so a run stays bounded)."""

    kind: str
    low: float
    high: float

    @classmethod
    def parse(cls, text: str) -> SessionLength:
        kind, _, spec = text.partition(":")
        if not spec:  # a bare number is a fixed length
            kind, spec = "fixed", text
        try:
            if kind == "uniform":
                low_text, _, high_text = spec.partition("-")
                low, high = float(low_text), float(high_text)
            elif kind in ("fixed", "exp"):
                low = high = float(spec)
            else:
                raise ValueError
        except ValueError:
            raise ConfigError(f"session length {text!r}: expected fixed:S, uniform:A-B or "
                              "exp:MEAN (seconds)") from None
        if not 0 < low <= high:
            raise ConfigError(f"session length {text!r}: lengths must be positive, A <= B")
        return cls(kind, low, high)

    def sample(self, rng: random.Random) -> float:
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high)
        if self.kind == "exp":
            return min(rng.expovariate(1 / self.low), 10 * self.low)
        return self.low


@dataclass
class LoadgenConfig:
    """Settings shared by every user in one generator process."""

    targets: list[ServerUri]
    """Relays to load; users are spread over them round-robin."""
    secret: str | None = None
    """coturn ``static-auth-secret`` for TURN REST credentials (TURN users need it)."""
    peer: Address | None = None
    """UDP echo peer behind the relay (TURN users need it)."""
    session_length: SessionLength = field(default_factory=lambda: SessionLength("fixed", 30, 30))
    """Length of one call."""
    call_gap: float = 1.0
    """Seconds a TURN user waits between calls."""
    frame_interval: float = 0.020
    """Media packet spacing, seconds (20 ms: 50 packets/s)."""
    frame_bytes: int = 640
    """Media payload size (20 ms of 16 kHz 16-bit PCM)."""
    binding_interval: float = 0.0
    """Seconds between Binding requests of one STUN user (0: flood; 15-30: keepalives)."""
    crowd_size: int = 1000
    """Idle subscribers one ``IdleSubscribersUser`` holds (keepalives every
    ``binding_interval`` seconds)."""
    crowd_transport: str = "auto"
    """How the crowd's subscribers get their 5-tuples: ``sockets``, ``raw`` or ``auto``
    (see :mod:`turnstorm.loadgen.keepalive`)."""
    flood_window: int = 0
    """Binding requests a flooding STUN user keeps in flight, sent in GSO batches and
    logged in bulk (0: one transaction at a time, one request event each)."""
    summary_interval: float = 1.0
    """Seconds between the MEDIA summary events one TURN user fires."""
    echo_grace: float = 0.5
    """Seconds to wait for echoes still in flight when a call ends."""
    lifetime: int = 600
    """Requested allocation LIFETIME, seconds."""
    allocation_refresh: float = 540.0
    """Refresh the allocation this many seconds after it was (re)freshed."""
    permission_refresh: float = 240.0
    """Refresh the permission (CreatePermission) this often; permissions live 300 s."""
    channel_refresh: float = 540.0
    """Refresh the channel binding this often; channels live 600 s."""
    max_pps: float = DEFAULT_MAX_PPS
    """Upper bound on packets sent per second by this process (requests and media)."""
    policy: RetransmitPolicy = field(default_factory=RetransmitPolicy)
    """Retransmission of requests (RFC 8489 defaults)."""
    user_prefix: str = "storm"
    """REST username prefix; a user number is appended."""
    no_backoff_fraction: float = 0.0
    """Fraction of users whose requests are retransmitted every RTO without doubling it
    (non-compliant clients; see the ``retransmit-amplification`` shape)."""

    def __post_init__(self) -> None:
        if not self.targets:
            raise ConfigError("at least one --target is needed")
        if not (math.isfinite(self.max_pps) and self.max_pps > 0):
            raise ConfigError("--max-pps must be a positive number (the bound is never off)")
        if not (math.isfinite(self.binding_interval) and self.binding_interval >= 0):
            raise ConfigError("--binding-interval must be 0 or a positive number of seconds")
        if self.crowd_size < 1:
            raise ConfigError("--crowd-size must be at least 1")
        if self.crowd_transport not in ("auto", "sockets", "raw"):
            raise ConfigError(f"--crowd-transport must be auto, sockets or raw, not "
                              f"{self.crowd_transport!r}")
        if self.flood_window < 0:
            raise ConfigError("--flood-window must be 0 or more")
        if not 0 <= self.no_backoff_fraction <= 1:
            raise ConfigError("the no-backoff fraction must be between 0 and 1")
        if self.frame_interval <= 0 or self.frame_bytes < 12:
            raise ConfigError("media frames need a positive interval and at least 12 bytes")

    @property
    def media_pps(self) -> float:
        return 1 / self.frame_interval




def parse_peer(text: str) -> Address:
    """``IP:PORT`` or ``[IPv6]:PORT`` (an IP literal: the peer is allow-list checked)."""
    try:
        return split_host_port(text)
    except HostPortError as exc:
        raise ConfigError(f"peer {text!r}: " + {
            HostPortError.BRACKETS: "unbalanced brackets; expected IP:PORT or [IPv6]:PORT",
            HostPortError.NO_PORT: "expected IP:PORT",
            HostPortError.HOST: f"{exc.host!r} is not an IP address (give the peer as an "
                                "IP literal)",
            HostPortError.PORT: "expected IP:PORT",
        }[exc.problem]) from None


def parse_targets(texts: Sequence[str], allowed: Sequence[str] = ()) -> list[ServerUri]:
    """Parse and allow-list-check each target; only UDP is supported by the generator."""
    targets = []
    for text in texts:
        uri = parse_uri(text)
        check_target(uri.host, allowed)
        if uri.transport != "udp":
            raise ConfigError(f"target {text!r}: the load generator speaks UDP only")
        targets.append(uri)
    return targets


def config_from_options(options: Any) -> LoadgenConfig:
    """Build the config from Locust's parsed options (``--turn-*``) or the environment
    variables ``TURNSTORM_TARGETS`` (comma-separated), ``TURNSTORM_SECRET_FILE``,
    ``TURNSTORM_PEER``, ``TURNSTORM_SESSION``, ``TURNSTORM_MAX_PPS``,
    ``TURNSTORM_ALLOW_TARGETS``."""
    def option(name: str, env: str, default: str = "") -> str:
        value = getattr(options, name, None) if options is not None else None
        return str(value) if value not in (None, "") else os.environ.get(env, default)

    targets = [t for t in option("turn_targets", "TURNSTORM_TARGETS").split(",") if t]
    allowed = [a for a in option("turn_allow_targets", "TURNSTORM_ALLOW_TARGETS").split(",")
               if a]
    secret_file = option("turn_secret_file", "TURNSTORM_SECRET_FILE")
    peer = option("turn_peer", "TURNSTORM_PEER")
    parsed_peer = parse_peer(peer) if peer else None
    if parsed_peer is not None:
        check_target(parsed_peer[0], allowed)
    return LoadgenConfig(
        targets=parse_targets(targets, allowed),
        secret=read_secret(secret_file) if secret_file else None,
        peer=parsed_peer,
        session_length=SessionLength.parse(option("turn_session", "TURNSTORM_SESSION", "30")),
        max_pps=float(option("turn_max_pps", "TURNSTORM_MAX_PPS", str(DEFAULT_MAX_PPS))),
    )


def config_to_dict(config: LoadgenConfig) -> dict[str, Any]:
    """A JSON-safe form of ``config`` (it carries the secret: never put it on a command
    line; worker processes read it from stdin)."""
    data = dataclasses.asdict(config)
    data["targets"] = [str(t) for t in config.targets]
    data["peer"] = list(config.peer) if config.peer is not None else None
    return data


def config_from_dict(data: dict[str, Any]) -> LoadgenConfig:
    """The inverse of :func:`config_to_dict` (targets were allow-list checked already)."""
    fields = dict(data)
    fields["targets"] = [parse_uri(t) for t in data["targets"]]
    fields["peer"] = tuple(data["peer"]) if data["peer"] is not None else None
    fields["session_length"] = SessionLength(**data["session_length"])
    fields["policy"] = RetransmitPolicy(**data["policy"])
    return LoadgenConfig(**fields)

"""Run real ``turnserver`` (coturn) processes on loopback.

Used by the local mode, the integration tests and the benchmarks. Each relay gets a
private directory holding its rendered config (mode 0600: it carries the secret), log,
pid file and user database, all removed on stop.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from turnstorm import children, lifeline
from turnstorm.coturnconf import RelayConfig, render
from turnstorm.errors import TurnstormError
from turnstorm.proto import stun

INSTALL_HINT = "install coturn: sudo apt-get install coturn (Debian/Ubuntu)"


class RelayStartError(TurnstormError):
    """A relay process did not come up."""


def find_turnserver() -> str:
    path = shutil.which("turnserver") or (
        "/usr/bin/turnserver" if os.access("/usr/bin/turnserver", os.X_OK) else None
    )
    if path is None:
        raise RelayStartError(f"turnserver not found; {INSTALL_HINT}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` (outside the ephemeral range's
    likely reuse window is not guaranteed: callers retry on bind failure)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(family, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
            return port
    raise RelayStartError(f"no free UDP+TCP port on {host}")


def stun_ready(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when a Binding request to ``host:port`` over UDP gets a response."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(request.encode(), (host, port))
            data = sock.recv(2048)
        except OSError:
            return False
    try:
        return stun.parse(data).transaction_id == request.transaction_id
    except stun.StunParseError:
        return False


@dataclass
class LocalRelay:
    """One coturn process. ``config`` is completed with paths and ports on start."""

    config: RelayConfig
    secret: str
    workdir: str = ""
    process: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)
    preexec: object = None

    @property
    def host(self) -> str:
        return self.config.listening_ips[0]

    @property
    def port(self) -> int:
        return self.config.listening_port

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 10.0) -> None:
        binary = find_turnserver()
        self.workdir = tempfile.mkdtemp(prefix="turnstorm-relay-")
        # the relay runs in a session of its own, named by its config path: undone by the
        # guard of a process that dies without stopping it (see turnstorm.lifeline)
        lifeline.track("dir", self.workdir)
        cfg = self.config
        cfg.log_file = os.path.join(self.workdir, "turnserver.log")
        cfg.pid_file = os.path.join(self.workdir, "turnserver.pid")
        cfg.userdb = os.path.join(self.workdir, "turndb")
        conf_path = os.path.join(self.workdir, "turnserver.conf")
        fd = os.open(conf_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(render(cfg, secret=self.secret))
        self.process = subprocess.Popen(
            [binary, "-c", conf_path, *self.extra_args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RelayStartError(
                    f"turnserver on {self.host}:{self.port} exited with code "
                    f"{self.process.returncode}: {tail}"
                )
            if stun_ready(self.host, self.port):
                return
            time.sleep(0.05)
        tail = self.log_tail()
        self.stop()
        raise RelayStartError(f"turnserver on {self.host}:{self.port} did not answer STUN "
                              f"within {timeout:g} s: {tail}")

    def log_tail(self, lines: int = 3) -> str:
        path = self.config.log_file
        try:
            with open(path, encoding="utf8", errors="replace") as handle:
                text = handle.read().strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in text[-lines:]) or "(empty log)"

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL; removes the work directory."""
        if self.process is not None:
            children.stop(self.process, timeout=timeout, group=True)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            lifeline.untrack(self.workdir)
            self.workdir = ""

    def __enter__(self) -> LocalRelay:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def loopback_relay_config(
    host: str = "127.0.0.1",
    *,
    realm: str = "turnstorm.local",
    port: int | None = None,
    min_port: int = 20000,
    max_port: int = 20999,
    allow_loopback_peers: bool = True,
    **overrides: object,
) -> RelayConfig:
    """A secure relay config for loopback; loopback peers allowed only when asked
    (the local echo peer lives there)."""
    config = RelayConfig(
        realm=realm,
        listening_ips=[host],
        relay_ip=host,
        listening_port=port or free_port(host),
        min_port=min_port,
        max_port=max_port,
        allowed_peers=(["127.0.0.0/8"] if allow_loopback_peers and ":" not in host
                       else ["::1/128"] if allow_loopback_peers else []),
        hide_software=False,
    )
    for name, value in overrides.items():
        if not hasattr(config, name):
            raise TypeError(f"RelayConfig has no field {name!r}")
        setattr(config, name, value)
    return config

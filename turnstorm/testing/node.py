"""A real single-node Kubernetes cluster on this machine, for the node test tier.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy
(nftables mode) from cached Go builds (``scripts/build-control-plane.sh``,
``scripts/build-node.sh``), containerd 2.x with Debian's runc, Debian's CNI bridge
plugin, and turnstorm's own images imported from ``scripts/build-images.sh`` (no
registry is ever asked: images are ``localhost/...`` and the sandbox image is pinned).

Addresses stay inside 198.19.0.0/16, the node tier's half of the benchmarking range
198.18.0.0/15 (the kernel-NAT tests use 198.18.0.0/16 inside namespaces of their own):
pods in :data:`POD_CIDR` on the bridge :data:`BRIDGE`, Services in :data:`SERVICE_CIDR`,
the node (apiserver, kubelet, NodePorts) at :data:`NODE_IP` on the same bridge. Nothing
is masqueraded, pods get no default route, a blackhole route holds the whole range
and an nftables guard table drops the range on every other interface.

Everything the node writes lives under its root (default ``/var/lib/turnstorm-node``)
except what the parts insist on (``/var/lib/kubelet/device-plugins``,
``/var/log/containers``, ``/var/lib/cni``, ``/run/containerd``); ``up`` records what it
creates or changes (those paths, sysctls, routes, nft tables, cgroups, PIDs) in
``state.json`` first, and ``down`` undoes exactly that, also after a crash: ``up``
starts with ``down`` of any state it finds. :func:`leftovers` lists what of a node is
still on the machine (a test asserts it is empty after ``down``).

Command line (also ``scripts/cluster.sh``)::

    python -m turnstorm.testing.node up      # prints the kubeconfig path
    python -m turnstorm.testing.node down
    python -m turnstorm.testing.node status  # leftovers, one a line
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from turnstorm.testing.controlplane import ControlPlaneError, build_binaries

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
DEFAULT_ROOT = Path(os.environ.get("TURNSTORM_NODE_ROOT", "/var/lib/turnstorm-node"))

NODE_NAME = "tsnode"
BRIDGE = "tsbr0"
CLUSTER_RANGE = "198.19.0.0/16"
"""The node tier's sub-range of 198.18.0.0/15; the kernel-NAT tests keep 198.18.0.0/16."""
GUARDED_RANGE = "198.18.0.0/15"
POD_CIDR = "198.19.16.0/24"
POD_GATEWAY = "198.19.16.1"
SERVICE_CIDR = "198.19.32.0/24"
KUBERNETES_SERVICE_IP = "198.19.32.1"
NODE_IP = "198.19.255.1"
APISERVER_PORT = 6443
GUARD_TABLE = "turnstorm_node_guard"
KUBE_PROXY_TABLES = ("ip kube-proxy", "ip6 kube-proxy")
CGROUP_ROOT = "turnstorm-node"
CGROUP_FS = Path("/sys/fs/cgroup")

SYSCTLS = (
    # the bridge plugin turns forwarding on; the kubelet sets its kernel tunables
    "net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding",
    "net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables",
    "vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
    "net/netfilter/nf_conntrack_max",
)
OUTSIDE_PATHS = (
    # written by the parts whatever their root directory says
    "/var/lib/kubelet", "/var/log/containers", "/var/log/pods", "/var/lib/cni",
    "/run/containerd", "/run/nri",
)
COMPONENTS = ("etcd", "kube-apiserver", "containerd", "kube-controller-manager",
              "kube-scheduler", "kubelet", "kube-proxy")


class NodeError(RuntimeError):
    """The node could not be brought up or torn down; the message says which part."""


def _run(*args: str, check: bool = True, stdin: str | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, check=False,
                            input=stdin, timeout=timeout)
    if check and result.returncode != 0:
        raise NodeError(f"{' '.join(args[:4])} failed: {result.stderr.strip()[-400:]}")
    return result


def _script(name: str, *args: str) -> Path:
    """The last stdout line of one of the cache-building scripts (its output dir)."""
    result = subprocess.run([str(SCRIPTS / name), *args], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-5:])
        raise NodeError(f"scripts/{name} failed: {tail}")
    return Path(result.stdout.strip().splitlines()[-1])


def node_bin_dir(build: bool = True) -> Path:
    return _script("build-node.sh", *(() if build else ("--print-dir",)))


def images_dir(build: bool = True) -> Path:
    return _script("build-images.sh", *(() if build else ("--print-dir",)))


def read_images(directory: Path) -> dict[str, Path]:
    """Image name -> OCI archive, from the index ``scripts/build-images.sh`` writes."""
    index = directory / "images.txt"
    if not index.exists():
        raise NodeError(f"no image index at {index}: run make image")
    images: dict[str, Path] = {}
    for line in index.read_text().splitlines():
        name, _, archive = line.partition(" ")
        images[name] = Path(archive)
    return images


def image_named(images: dict[str, Path], repository: str) -> str:
    """The one image of ``repository`` (e.g. ``localhost/turnstorm``) in the index."""
    for name in images:
        if name.rpartition(":")[0] == repository:
            return name
    raise NodeError(f"no {repository} image in the index: run make image")


def _read_sysctl(key: str) -> str | None:
    try:
        return (Path("/proc/sys") / key).read_text().strip()
    except OSError:
        return None


def _write_sysctl(key: str, value: str) -> None:
    with contextlib.suppress(OSError):
        (Path("/proc/sys") / key).write_text(value)


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _pids_running(binaries: Iterable[str | Path], root: Path) -> list[int]:
    """Processes of these binaries that belong to the node at ``root`` (their command
    line names a path under it: the apiserver-only tier runs the same binaries)."""
    wanted = {str(b) for b in binaries}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        if _exe(int(entry.name)).removesuffix(" (deleted)") not in wanted:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(root) in cmdline:
            found.append(int(entry.name))
    return found


def _stop_pids(pids: Iterable[int], grace: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL whatever is left."""
    pending = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            status = Path(f"/proc/{pid}/stat")
            try:
                state = status.read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                state = "gone"
            if state in ("gone", "Z"):
                pending.remove(pid)
        time.sleep(0.1)
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _mounts_under(root: Path) -> list[str]:
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == str(root) or point.startswith(f"{root}/"):
                points.append(point)
    return points


def _cgroup_dirs() -> list[Path]:
    return [c / CGROUP_ROOT for c in sorted(CGROUP_FS.iterdir())
            if (c / CGROUP_ROOT).is_dir()] if CGROUP_FS.is_dir() else []


def _nft_tables() -> set[str]:
    result = _run("nft", "list", "tables", check=False)
    return {line.removeprefix("table ").strip() for line in result.stdout.splitlines()
            if line.startswith("table ")}


def _remove_kube_iptables(before: set[str]) -> None:
    """The kubelet's iptables chains (KUBE-FIREWALL, KUBE-KUBELET-CANARY, ...): tables
    that did not exist before the node are deleted whole, in the others every KUBE-
    chain and every rule that jumps to one goes (iptables-restore of the rest)."""
    for family, save, restore in (("ip", "iptables-save", "iptables-restore"),
                                  ("ip6", "ip6tables-save", "ip6tables-restore")):
        if shutil.which(save) is None:
            continue
        for table in ("filter", "nat", "mangle", "raw"):
            name = f"{family} {table}"
            if name not in _nft_tables():
                continue
            if name not in before:
                _run("nft", "delete", "table", family, table, check=False)
                continue
            text = _run(save, "-t", table, check=False).stdout
            if "KUBE-" in text:
                kept = "".join(line + "\n" for line in text.splitlines() if "KUBE-" not in line)
                _run(restore, "-T", table, stdin=kept, check=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def real_interfaces() -> list[str]:
    """Interfaces that lead out of the machine: everything but loopback, the node's
    bridge and the pods' veths."""
    names = []
    for entry in sorted(Path("/sys/class/net").iterdir()):
        name = entry.name
        if name in ("lo", BRIDGE) or name.startswith("veth"):
            continue
        names.append(name)
    return names


def leftovers(root: Path = DEFAULT_ROOT, bin_dirs: Iterable[Path] = ()) -> list[str]:
    """What of a node is on this machine now: processes, mounts, the bridge, nft tables,
    routes, cgroups, its root. Empty when no node runs and none left anything behind."""
    found: list[str] = []
    binaries = [d / b for d in bin_dirs for b in
                (*COMPONENTS, "containerd-shim-runc-v2")]
    found += [f"process {pid} ({_exe(pid)})" for pid in _pids_running(binaries, root)]
    found += [f"mount {point}" for point in _mounts_under(root)]
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        found.append(f"bridge {BRIDGE}")
    tables = _nft_tables()
    found += [f"nft table {t}" for t in (f"inet {GUARD_TABLE}", *KUBE_PROXY_TABLES)
              if t in tables]
    for save in ("iptables-save", "ip6tables-save"):
        if shutil.which(save):
            chains = {line.split()[0][1:] for line in _run(save, check=False).stdout.splitlines()
                      if line.startswith(":KUBE-")}
            found += [f"{save.removesuffix('-save')} chain {c}" for c in sorted(chains)]
    routes = _run("ip", "route", "show", "table", "all", check=False).stdout
    found += [f"route {line.strip()}" for line in routes.splitlines()
              if "198.19." in line or GUARDED_RANGE in line]
    found += [f"cgroup {c}" for c in _cgroup_dirs()]
    if root.exists():
        found.append(f"directory {root}")
    state = _read_state(root)
    for path in state.get("created_paths", []):
        if Path(path).exists():
            found.append(f"file {path}")
    return found


def _read_state(root: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads((root / "state.json").read_text())
        return state
    except (OSError, ValueError):
        return {}


@dataclass
class Node:
    """One single-node cluster; ``up()`` / ``down()`` or a ``with`` block."""

    root: Path = DEFAULT_ROOT
    control_plane_bin: Path | None = None
    node_bin: Path | None = None
    images: Path | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))
    timings: list[float] = field(default_factory=list)
    """Seconds each step of the last ``up`` took (network, pki, cgroups, control plane,
    containerd, images, node)."""

    # -- paths -----------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://{NODE_IP}:{APISERVER_PORT}"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    def _bin(self, name: str) -> str:
        assert self.control_plane_bin is not None and self.node_bin is not None
        for directory in (self.node_bin, self.control_plane_bin):
            if (directory / name).exists():
                return str(directory / name)
        raise NodeError(f"no {name} binary in {self.node_bin} or {self.control_plane_bin}")

    # -- state -----------------------------------------------------------------------
    def _save_state(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.root / "state.json")

    def _note(self, key: str, value: Any) -> None:
        """Record a change before making it, so a crash in between is still undone."""
        self.state.setdefault(key, [])
        if value not in self.state[key]:
            self.state[key].append(value)
        self._save_state()

    @classmethod
    def running(cls, root: Path = DEFAULT_ROOT) -> Node | None:
        """The node ``up`` started (here or in another process), if it still runs."""
        state = _read_state(root)
        pid = state.get("pids", {}).get("kube-apiserver")
        if not pid or Path(_exe(pid)).name != "kube-apiserver" or "images" not in state:
            return None
        node_bin, control_plane_bin = (Path(d) for d in state["bin_dirs"])
        node = cls(root=root, control_plane_bin=control_plane_bin, node_bin=node_bin,
                   images=Path(state["images"]))
        node.state = state
        return node if node.kubectl("get", "--raw", "/readyz", check=False
                                    ).returncode == 0 else None

    # -- up --------------------------------------------------------------------------
    def up(self, timeout: float = 180.0) -> None:
        if os.geteuid() != 0:
            raise NodeError("the node tier needs root (bridges, mounts, cgroups, nftables)")
        for tool in ("nft", "ip", "openssl", "runc"):
            if shutil.which(tool) is None:
                raise NodeError(f"{tool} not found (scripts/bootstrap.sh test installs it)")
        if not Path("/usr/lib/cni/bridge").exists():
            raise NodeError("no CNI bridge plugin in /usr/lib/cni "
                            "(apt-get install containernetworking-plugins)")
        self.down()
        try:
            self.control_plane_bin = self.control_plane_bin or build_binaries()
        except ControlPlaneError as exc:
            raise NodeError(str(exc)) from exc
        self.node_bin = self.node_bin or node_bin_dir()
        self.images = self.images or images_dir()
        self.state = {"root": str(self.root), "bin_dirs": [str(self.node_bin),
                                                             str(self.control_plane_bin)],
                      "images": str(self.images),
                      "sysctls": {k: _read_sysctl(k) for k in SYSCTLS},
                      "created_paths": [p for p in OUTSIDE_PATHS if not Path(p).exists()],
                      "nft_before": sorted(_nft_tables()),
                      "pids": {}}
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self._save_state()
        try:
            for step in (self._network, self._pki, self._cgroups,
                         lambda: self._start_control_plane(timeout),
                         lambda: self._start_containerd(timeout), self._import_images,
                         lambda: self._start_node(timeout)):
                began = time.monotonic()
                step()
                self.timings.append(time.monotonic() - began)
        except BaseException:
            self.down()
            raise

    def _network(self) -> None:
        self._note("links", BRIDGE)
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{POD_GATEWAY}/24", "dev", BRIDGE)
        _run("ip", "addr", "add", f"{NODE_IP}/32", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for route in (f"blackhole {GUARDED_RANGE}", f"{SERVICE_CIDR} dev {BRIDGE}"):
            self._note("routes", route)
            _run("ip", "route", "add", *route.split())
        self._note("nft_tables", f"inet {GUARD_TABLE}")
        real = ", ".join(f'"{name}"' for name in real_interfaces()) or '"none"'
        rules = "".join(
            f"  chain {hook} {{ type filter hook {hook} priority -10; policy accept;\n"
            f"    {direction} {{ {real} }} ip daddr {GUARDED_RANGE} counter drop\n"
            f"    {direction} {{ {real} }} ip saddr {GUARDED_RANGE} counter drop\n  }}\n"
            for hook, direction in (("output", "oifname"), ("forward", "oifname"),
                                    ("input", "iifname")))
        _run("nft", "-f", "-", stdin=f"table inet {GUARD_TABLE} {{\n{rules}}}\n")
        for table in KUBE_PROXY_TABLES:
            self._note("nft_tables", table)

    def _pki(self) -> None:
        pki = self.pki
        pki.mkdir(parents=True, exist_ok=True)

        def openssl(*args: str) -> None:
            _run("openssl", *args)

        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=turnstorm-node-ca", "-keyout", str(pki / "ca.key"),
                "-out", str(pki / "ca.crt"))
        self._cert("apiserver", "/CN=kube-apiserver", sans=[
            f"IP:{NODE_IP}", f"IP:{KUBERNETES_SERVICE_IP}", "IP:127.0.0.1",
            "DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local", "DNS:localhost"], server=True)
        self._cert("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet",
                   sans=[], server=False)
        self._cert("kubelet", f"/CN={NODE_NAME}", sans=[f"IP:{NODE_IP}",
                                                      f"DNS:{NODE_NAME}"], server=True)
        self._cert("front-proxy-client", "/CN=front-proxy-client", sans=[], server=False)
        openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
        openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
        users = {
            "admin": ("admin", "system:masters"),
            "kubelet": (f"system:node:{NODE_NAME}", "system:nodes"),
            "kube-proxy": ("system:kube-proxy", ""),
            "kube-controller-manager": ("system:kube-controller-manager", ""),
            "kube-scheduler": ("system:kube-scheduler", ""),
        }
        tokens = {name: (self.admin_token if name == "admin" else secrets.token_hex(16))
                  for name in users}
        lines = []
        for name, (user, group) in users.items():
            lines.append(f'{tokens[name]},{user},{name}-uid' + (f',"{group}"' if group else ""))
            path = self.kubeconfig if name == "admin" else pki / f"{name}.kubeconfig"
            self._write_kubeconfig(path, tokens[name])
        (pki / "tokens.csv").write_text("\n".join(lines) + "\n")
        for entry in pki.iterdir():
            entry.chmod(0o600)

    def _cert(self, name: str, subject: str, sans: list[str], server: bool) -> None:
        pki = self.pki
        extensions = pki / f"{name}.ext"
        usage = "serverAuth" if server else "clientAuth"
        text = f"extendedKeyUsage={usage}\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        if sans:
            text += f"subjectAltName={','.join(sans)}\n"
        extensions.write_text(text)
        _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
             "-keyout", str(pki / f"{name}.key"), "-out", str(pki / f"{name}.csr"))
        _run("openssl", "x509", "-req", "-in", str(pki / f"{name}.csr"), "-CA",
             str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"), "-CAcreateserial",
             "-days", "2", "-extfile", str(extensions), "-out", str(pki / f"{name}.crt"))

    def _write_kubeconfig(self, path: Path, token: str) -> None:
        path.write_text(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: node\n  cluster:\n"
            f"    server: {self.server}\n    certificate-authority: {self.pki / 'ca.crt'}\n"
            f"users:\n- name: user\n  user:\n    token: {token}\n"
            "contexts:\n- name: node\n  context:\n    cluster: node\n    user: user\n"
            "    namespace: default\ncurrent-context: node\n")
        path.chmod(0o600)

    def _cgroups(self) -> None:
        for hierarchy in sorted(CGROUP_FS.iterdir()):
            if not (hierarchy / "cgroup.procs").exists() or hierarchy.name == "unified":
                continue
            target = hierarchy / CGROUP_ROOT
            self._note("cgroups", str(target))
            target.mkdir(exist_ok=True)
            if hierarchy.name == "cpuset":  # a cpuset cgroup needs its cpus and mems
                for key in ("cpuset.cpus", "cpuset.mems"):
                    (target / key).write_text((hierarchy / key).read_text())

    def _spawn(self, name: str, args: list[str]) -> None:
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes[name] = process
        self.state["pids"][name] = process.pid
        self._save_state()

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise NodeError(f"{name} exited with {process.returncode}: {self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 4) -> str:
        try:
            text = (self.root / "logs" / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def _wait(self, what: str, predicate: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(Exception):
                if predicate():
                    return
            time.sleep(0.25)
        raise NodeError(f"{what} not ready within {timeout:g} s")

    def _start_control_plane(self, timeout: float) -> None:
        pki, etcd_port, peer_port = self.pki, _free_port(), _free_port()
        self._spawn("etcd", [
            self._bin("etcd"), "--name=node", f"--data-dir={self.root / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=node=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync=true", "--log-level=warn"])
        self._spawn("kube-apiserver", [
            self._bin("kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--bind-address={NODE_IP}", f"--advertise-address={NODE_IP}",
            f"--secure-port={APISERVER_PORT}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--requestheader-client-ca-file={pki / 'ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--authorization-mode=Node,RBAC", f"--token-auth-file={pki / 'tokens.csv'}",
            "--enable-admission-plugins=NodeRestriction",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true"])
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))

        def ready() -> bool:
            request = urllib.request.Request(f"{self.server}/readyz", headers={
                "Authorization": f"Bearer {self.admin_token}"})
            with urllib.request.urlopen(request, timeout=2, context=context) as response:
                return bool(response.read().strip() == b"ok")

        self._wait("kube-apiserver", ready, timeout)
        def common(name: str) -> list[str]:
            kubeconfig = pki / f"{name}.kubeconfig"
            return [f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
                    f"--authorization-kubeconfig={kubeconfig}", "--leader-elect=false",
                    "--bind-address=127.0.0.1"]

        cm = "kube-controller-manager"
        self._spawn(cm, [self._bin(cm), *common(cm),
                         f"--secure-port={_free_port()}",
                         f"--service-account-private-key-file={pki / 'sa.key'}",
                         f"--root-ca-file={pki / 'ca.crt'}",
                         f"--service-cluster-ip-range={SERVICE_CIDR}",
                         "--use-service-account-credentials=true"])
        sched = "kube-scheduler"
        self._spawn(sched, [self._bin(sched), *common(sched),
                            f"--secure-port={_free_port()}"])

    def _start_containerd(self, timeout: float) -> None:
        base = self.root / "containerd"
        (base / "root").mkdir(parents=True, exist_ok=True)
        cni = self.root / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-turnstorm.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "turnstorm-node", "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
                 "hairpinMode": True,
                 "ipam": {"type": "host-local", "dataDir": str(cni / "ipam"),
                          "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
                          # the node's range only: no default route out of a pod
                          "routes": [{"dst": CLUSTER_RANGE}]}},
                {"type": "loopback"}]}, indent=1))
        images = read_images(self._images_dir())
        sandbox = image_named(images, "localhost/turnstorm-pause")
        config = f"""version = 3
root = "{base / 'root'}"
state = "{base / 'state'}"
disabled_plugins = ["io.containerd.nri.v1.nri", "io.containerd.tracing.processor.v1.otlp",
                    "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{base / 'containerd.sock.ttrpc'}"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{sandbox}"
[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_unprivileged_ports = true
  enable_unprivileged_icmp = true
  cdi_spec_dirs = []
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      disable_pause_image_pull = true
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{shutil.which('runc')}"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{cni / 'net.d'}"
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
"""
        (base / "config.toml").write_text(config)
        self._spawn("containerd", [self._bin("containerd"), "--config",
                                   str(base / "config.toml")])
        self._wait("containerd", lambda: self.ctr("version").returncode == 0, timeout)

    def _images_dir(self) -> Path:
        assert self.images is not None
        return self.images

    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return _run(self._bin("ctr"), "--address", str(self.containerd_socket),
                    "--namespace", "k8s.io", *args, check=False, timeout=timeout)

    def _import_images(self) -> None:
        for name, archive in read_images(self._images_dir()).items():
            result = self.ctr("images", "import", "--no-unpack", str(archive))
            if result.returncode != 0:
                raise NodeError(f"importing {name} from {archive}: {result.stderr.strip()}")
            listed = self.ctr("images", "list", "--quiet").stdout.split()
            if name not in listed:
                raise NodeError(f"{archive} did not import as {name} (got {listed})")

    def _start_node(self, timeout: float) -> None:
        pki, kubelet_dir = self.pki, self.root / "kubelet"
        kubelet_dir.mkdir(exist_ok=True)
        (self.root / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        (self.root / "kubelet.yaml").write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": NODE_IP, "port": 10250, "readOnlyPort": 0, "healthzPort": 0,
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP_ROOT}",
            "failCgroupV1": False, "failSwapOn": False,
            "podLogsDirectory": str(self.root / "pod-logs"),
            "resolvConf": str(self.root / "resolv.conf"), "clusterDomain": "cluster.local",
            "tlsCertFile": str(pki / "kubelet.crt"),
            "tlsPrivateKeyFile": str(pki / "kubelet.key"),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(pki / "ca.crt")}},
            "authorization": {"mode": "AlwaysAllow"},
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False, "maxPods": 110,
            "syncFrequency": "5s", "fileCheckFrequency": "5s",
            "nodeStatusUpdateFrequency": "5s",
            "protectKernelDefaults": False, "localStorageCapacityIsolation": True,
        }, indent=1))
        self._spawn("kubelet", [
            self._bin("kubelet"), f"--config={self.root / 'kubelet.yaml'}",
            f"--kubeconfig={pki / 'kubelet.kubeconfig'}", f"--root-dir={kubelet_dir}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", "--v=1"])
        (self.root / "kube-proxy.yaml").write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration", "mode": "nftables",
            "clientConnection": {"kubeconfig": str(pki / "kube-proxy.kubeconfig")},
            "hostnameOverride": NODE_NAME, "bindAddress": NODE_IP,
            "clusterCIDR": POD_CIDR, "nodePortAddresses": [f"{NODE_IP}/32"],
            "healthzBindAddress": f"127.0.0.1:{_free_port()}",
            "metricsBindAddress": f"127.0.0.1:{_free_port()}",
            # 0: leave the machine's conntrack sysctls as they are
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
        }, indent=1))
        self._spawn("kube-proxy", [self._bin("kube-proxy"),
                                   f"--config={self.root / 'kube-proxy.yaml'}"])

        def node_ready() -> bool:
            out = self.kubectl("get", "node", NODE_NAME, "-o",
                               "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                               check=False)
            return out.stdout.strip() == "True"

        self._wait("node", node_ready, timeout)

        def default_account() -> bool:
            return self.kubectl("get", "serviceaccount", "default", check=False
                                ).returncode == 0

        self._wait("the default ServiceAccount", default_account, timeout)

    def kubectl(self, *args: str, check: bool = True, input_text: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self._bin("kubectl"), f"--kubeconfig={self.kubeconfig}",
                                 *args], capture_output=True, text=True, check=False,
                                input=input_text, timeout=timeout)
        if check and result.returncode != 0:
            raise NodeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    # -- down ------------------------------------------------------------------------
    def down(self) -> None:
        """Undo everything recorded in ``state.json`` (this run's or a crashed one's)."""
        state = self.state or _read_state(self.root)
        bin_dirs = [Path(d) for d in state.get("bin_dirs", [])]
        for name in ("kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager"):
            self._stop_component(name, state)
        binaries = [d / "containerd-shim-runc-v2" for d in bin_dirs]
        self._stop_component("containerd", state)
        _stop_pids(_pids_running(binaries, self.root), grace=2)
        self._kill_cgroups({**state, "cgroups": sorted(
            {*state.get("cgroups", []), *(str(c) for c in _cgroup_dirs())})})
        for name in ("kube-apiserver", "etcd"):
            self._stop_component(name, state)
        # anything else still running from the node's binaries (a crashed run's parts)
        _stop_pids(_pids_running([d / b for d in bin_dirs for b in COMPONENTS], self.root),
                   grace=5)
        for point in sorted(_mounts_under(self.root), key=len, reverse=True):
            _run("umount", "-l", point, check=False)
        for table in state.get("nft_tables", []):
            if table in _nft_tables():
                _run("nft", "delete", "table", *table.split(), check=False)
        # (a state from before nft_before was recorded: keep the tables, drop KUBE- chains)
        _remove_kube_iptables(set(state.get("nft_before", _nft_tables())))
        for route in state.get("routes", []):
            _run("ip", "route", "del", *route.split(), check=False)
        for link in state.get("links", []):
            _run("ip", "link", "del", link, check=False)
        for veth in self._orphan_veths():
            _run("ip", "link", "del", veth, check=False)
        for key, value in state.get("sysctls", {}).items():
            if value is not None and _read_sysctl(key) != value:
                _write_sysctl(key, value)
        for path in state.get("created_paths", []):
            if Path(path).is_dir() and not Path(path).is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    Path(path).unlink()
        shutil.rmtree(self.root, ignore_errors=True)
        self.processes.clear()
        self.state = {}

    def _stop_component(self, name: str, state: dict[str, Any]) -> None:
        process = self.processes.get(name)
        if process is not None:
            _stop_pids([process.pid])
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(1)
            return
        pid = state.get("pids", {}).get(name)
        if pid and Path(_exe(pid)).name == name:
            _stop_pids([pid])

    @staticmethod
    def _kill_cgroups(state: dict[str, Any]) -> None:
        """Kill every process left in the node's cgroups (containers whose shim died),
        then remove the cgroups bottom-up."""
        for _attempt in range(20):
            pids: set[int] = set()
            for cgroup in state.get("cgroups", []):
                for procs in Path(cgroup).rglob("cgroup.procs"):
                    with contextlib.suppress(OSError, ValueError):
                        pids.update(int(p) for p in procs.read_text().split())
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        for cgroup in state.get("cgroups", []):
            base = Path(cgroup)
            if not base.is_dir():
                continue
            for directory in sorted((*(p for p in base.rglob("*") if p.is_dir()), base),
                                    key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    directory.rmdir()

    @staticmethod
    def _orphan_veths() -> list[str]:
        """Host ends of pod veths whose bridge is gone (their netns outlived the pod)."""
        found = []
        for entry in Path("/sys/class/net").iterdir():
            if entry.name.startswith("veth") and not (entry / "master").exists():
                found.append(entry.name)
        return found

    def __enter__(self) -> Node:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m turnstorm.testing.node",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help=f"the node's directory (default {DEFAULT_ROOT})")
    args = parser.parse_args(argv)
    node = Node(root=args.root)
    try:
        if args.action == "up":
            node.up()
            steps = ("network", "pki", "cgroups", "control plane", "containerd", "images",
                     "node")
            print("node: up: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in
                                           zip(steps, node.timings, strict=False)),
                  file=sys.stderr)
            print(node.kubeconfig)
        elif args.action == "down":
            node.down()
        else:
            state = _read_state(args.root)
            for line in leftovers(args.root, [Path(d) for d in state.get("bin_dirs", [])]):
                print(line)
    except NodeError as exc:
        print(f"node: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

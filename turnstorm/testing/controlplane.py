
"""A real Kubernetes test control plane: etcd + kube-apiserver on loopback, no kubelet.

Binaries come from ``scripts/build-control-plane.sh`` (built from Go modules and cached
under ``~/.cache/turnstorm/control-plane``). Objects are real; nothing runs Pods, so
tests assert on API objects (owner references, status, replicas, annotations).
"""

from __future__ import annotations

import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from turnstorm import children

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-control-plane.sh"


class ControlPlaneError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cached_bin_dir() -> Path:
    out = subprocess.run([str(BUILD_SCRIPT), "--print-dir"], capture_output=True, text=True,
                         check=True)
    return Path(out.stdout.strip())


def build_binaries() -> Path:
    """Build (or reuse) the binaries; raises with the script's stderr tail on failure."""
    result = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-5:])
        raise ControlPlaneError(f"building the control plane failed: {tail}")
    return Path(result.stdout.strip().splitlines()[-1])


@dataclass
class ControlPlane:
    bin_dir: Path
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="turnstorm-k8s-")))
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    port: int = 0
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def kubectl_path(self) -> str:
        return str(self.bin_dir / "kubectl")

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        self.names.append(name)
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(process)
        return process

    def start(self, timeout: float = 90.0) -> None:
        d = self.workdir
        etcd_port, peer_port = _free_port(), _free_port()
        self.port = _free_port()
        self._spawn("etcd", [
            str(self.bin_dir / "etcd"), "--name=test", f"--data-dir={d / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=test=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync=true", "--log-level=warn",
        ])
        subprocess.run(["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"],
                       check=True, capture_output=True)  # the service-account signing key
        subprocess.run(["openssl", "rsa", "-in", str(d / "sa.key"), "-pubout", "-out",
                        str(d / "sa.pub")], check=True, capture_output=True)
        (d / "tokens.csv").write_text(f'{self.token},admin,admin-uid,"system:masters"\n')
        self._spawn("kube-apiserver", [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}", f"--cert-dir={d / 'certs'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            "--authorization-mode=RBAC", f"--token-auth-file={d / 'tokens.csv'}",
            "--service-cluster-ip-range=10.0.0.0/24",  # a virtual range; nothing routes it
            "--endpoint-reconciler-type=none",
            "--disable-admission-plugins=ServiceAccount",
        ])
        self._write_kubeconfig()
        self._wait_ready(timeout)

    def _write_kubeconfig(self) -> None:
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            "clusters:\n- name: test\n  cluster:\n"
            f"    server: {self.url}\n    insecure-skip-tls-verify: true\n"
            "users:\n- name: admin\n  user:\n"
            f"    token: {self.token}\n"
            "contexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n"
            "    namespace: default\n"
            "current-context: test\n"
        )
        self.kubeconfig.chmod(0o600)

    def _wait_ready(self, timeout: float) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, process in zip(self.names, self.processes, strict=True):
                if process.poll() is not None:
                    log = (self.workdir / f"{name}.log").read_text(errors="replace")
                    tail = " | ".join(log.strip().splitlines()[-3:])
                    self.stop()
                    raise ControlPlaneError(f"{name} exited with {process.returncode}: {tail}")
            request = urllib.request.Request(f"{self.url}/readyz",
                                             headers={"Authorization": f"Bearer {self.token}"})
            try:
                with urllib.request.urlopen(request, timeout=2, context=context) as response:
                    if response.read().strip() == b"ok":
                        return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.25)
        self.stop()
        raise ControlPlaneError(f"kube-apiserver not ready within {timeout:g} s: {last}")

    def kubectl(self, *args: str, check: bool = True, input_text: str | None = None
                ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.kubectl_path, f"--kubeconfig={self.kubeconfig}", *args],
            check=False, capture_output=True, text=True, input=input_text, timeout=60,
        )
        if check and result.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def stop(self) -> None:
        for process in reversed(self.processes):
            children.stop(process, timeout=10, group=True)
        self.processes.clear()
        self.names.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

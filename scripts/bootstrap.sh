#!/usr/bin/env bash
# Set up everything turnstorm needs on a Debian-like machine, idempotently.
#   scripts/bootstrap.sh run    what `make run` needs: venv + runtime deps + coturn
#   scripts/bootstrap.sh test   what `make test` needs: + dev deps + test services' binaries,
#                               the node tier's binaries and images
#   scripts/bootstrap.sh image  what `make image` needs: an image builder and mmdebstrap
# Missing system packages are installed with apt-get when running as root; otherwise the
# exact command to run is printed (tests then skip what they cannot run, except in CI).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE="${1:-run}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
say() { printf 'bootstrap: %s\n' "$*"; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

# --- Python ---------------------------------------------------------------------------
command -v "$PYTHON" >/dev/null || die "python3 not found; install Python 3.11 or newer"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "Python 3.11+ needed, found $("$PYTHON" --version 2>&1)"

# --- system packages ------------------------------------------------------------------
# gcc + python3-dev build the native media engine (turnstorm/_mediapump.c) at install;
# without them the load generator falls back to its pure-Python media pump.
APT_RUN=(coturn gcc python3-dev)
# the node tier: Debian's runc, CNI plugins and nft/iptables beside the Go-built parts;
# buildah + mmdebstrap build the images without a registry or a daemon
APT_IMAGE=(buildah mmdebstrap skopeo)
APT_NODE=(runc containernetworking-plugins iptables conntrack "${APT_IMAGE[@]}")
APT_TEST=(coturn gcc python3-dev prometheus iproute2 nftables openssl chromium "${APT_NODE[@]}")
case "$MODE" in
  test) packages=("${APT_TEST[@]}") ;;
  image) packages=("${APT_IMAGE[@]}") ;;
  *) packages=("${APT_RUN[@]}") ;;
esac
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    say "not a Debian-like system: install ${missing[*]} with your package manager"
  elif [ "$(id -u)" = 0 ]; then
    say "installing ${missing[*]} (apt-get)"
    # Debian's coturn starts a system relay on 3478 where an init system runs; ours
    # use random loopback ports, so both can coexist.
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
  else
    say "missing system packages: ${missing[*]}"
    say "install them with: sudo apt-get install ${missing[*]}"
    [ "${CI:-}" = true ] && die "CI needs ${missing[*]}"
  fi
fi

[ "$MODE" = image ] && { say "ready (image)"; exit 0; }

# --- virtualenv ---------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
extra=loadgen,operator
[ "$MODE" = test ] && extra=dev
stamp="$VENV/.turnstorm-$MODE-$(cat pyproject.toml turnstorm/_mediapump.c | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  say "installing Python dependencies ($extra)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[$extra]"
  touch "$stamp"
fi
# --- the k8s test tier's control plane (kube-apiserver, etcd, kubectl from Go modules) ---
if [ "$MODE" = test ]; then
  if command -v go >/dev/null; then
    say "control plane: $(scripts/build-control-plane.sh --print-dir)"
    scripts/build-control-plane.sh >/dev/null
    # the node tier: kubelet, kube-proxy, scheduler, controller-manager, containerd
    say "node: $(scripts/build-node.sh --print-dir) (cold: about 15 minutes)"
    scripts/build-node.sh >/dev/null
    say "images: $(scripts/build-images.sh --print-dir)"
    scripts/build-images.sh >/dev/null
  elif [ "${CI:-}" = true ]; then
    die "CI needs Go to build the test control plane and node (kube-apiserver, etcd, kubectl, kubelet, containerd)"
  else
    say "Go not found: the k8s and node test tiers will be skipped (install Go 1.26+ to run them)"
  fi
fi

say "ready ($MODE)"

#!/usr/bin/env bash
# Build (once, then cache) the node tier's binaries from Go modules:
#   tools/k8s/go.mod         kubelet, kube-proxy, kube-controller-manager, kube-scheduler
#   tools/containerd/go.mod  containerd, containerd-shim-runc-v2, ctr (containerd 2.x)
# (The sandbox image's pause binary is scripts/build-images.sh's.)
# runc, the CNI plugins, nft and iptables come from Debian packages (the bootstrap
# installs them). The control plane (kube-apiserver, etcd, kubectl) is
# scripts/build-control-plane.sh's.
#
# Usage:
#   scripts/build-node.sh              # build if needed; prints the bin dir
#   scripts/build-node.sh --print-dir  # only print the bin dir
#   scripts/build-node.sh --force      # rebuild even if cached
#
# stdout is exactly one line, the bin directory:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/turnstorm/node/<k8s>-containerd<ver>/bin
# A cold build takes about 15 minutes on 2 cores (the kubelet's dependency graph is
# the largest); later builds reuse the Go build cache.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
K8S_MODDIR="$ROOT/tools/k8s"
CTRD_MODDIR="$ROOT/tools/containerd"

# shellcheck source=scripts/go-build-lib.sh
. "$ROOT/scripts/go-build-lib.sh"
K8S_VERSION="$(modversion "$K8S_MODDIR/go.mod" k8s.io/kubernetes)"
CTRD_VERSION="$(modversion "$CTRD_MODDIR/go.mod" github.com/containerd/containerd/v2)"
if [[ -z "$K8S_VERSION" || -z "$CTRD_VERSION" ]]; then
    echo "build-node: cannot read versions from tools/{k8s,containerd}/go.mod" >&2
    exit 1
fi

CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/turnstorm/node"
OUT_DIR="$CACHE_ROOT/${K8S_VERSION#v}-containerd${CTRD_VERSION#v}"
BIN_DIR="$OUT_DIR/bin"

parse_build_args build-node 2,19 "$@"

K8S_BINS=(kubelet kube-proxy kube-controller-manager kube-scheduler)
k8s_ok() {
    local b
    for b in "${K8S_BINS[@]}"; do binary_ok "$BIN_DIR/$b" "Kubernetes $K8S_VERSION" || return 1; done
}
ctrd_ok() {
    binary_ok "$BIN_DIR/containerd" "$CTRD_VERSION" && [[ -x "$BIN_DIR/containerd-shim-runc-v2" ]] \
        && [[ -x "$BIN_DIR/ctr" ]]
}
all_ok() { k8s_ok && ctrd_ok; }

use_cache_or_lock all_ok "node $K8S_VERSION, containerd $CTRD_VERSION"

go_env
build() { go_build "$@"; }
stamps="$(k8s_stamps "$K8S_VERSION")"

if [[ $force -eq 1 ]] || ! k8s_ok; then
    for b in "${K8S_BINS[@]}"; do
        if [[ $force -eq 1 ]] || ! binary_ok "$BIN_DIR/$b" "Kubernetes $K8S_VERSION"; then
            log "building $b $K8S_VERSION..."
            build "$K8S_MODDIR" "k8s.io/kubernetes/cmd/$b" "$b" "$stamps"
        fi
    done
    k8s_ok || { log "a node binary does not report $K8S_VERSION"; exit 1; }
fi
if [[ $force -eq 1 ]] || ! ctrd_ok; then
    ctags="no_btrfs no_devmapper no_zfs no_aufs no_dynamic_plugins"
    cstamp="-X github.com/containerd/containerd/v2/version.Version=$CTRD_VERSION"
    cstamp+=" -X github.com/containerd/containerd/v2/version.Package=github.com/containerd/containerd/v2"
    for b in containerd containerd-shim-runc-v2 ctr; do
        log "building $b $CTRD_VERSION..."
        build "$CTRD_MODDIR" "github.com/containerd/containerd/v2/cmd/$b" "$b" "$cstamp" "$ctags"
    done
    ctrd_ok || { log "containerd does not report $CTRD_VERSION"; exit 1; }
fi

log "ready: $("$BIN_DIR/kubelet" --version), $("$BIN_DIR/containerd" --version)"
echo "$BIN_DIR"

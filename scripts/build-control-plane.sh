#!/usr/bin/env bash
# Build (once, then cache) a real Kubernetes test control plane:
# kube-apiserver + etcd, compiled from Go modules pinned in
#   tools/k8s/go.mod   (k8s.io/kubernetes, staging repos replaced)
#   tools/etcd/go.mod  (go.etcd.io/etcd/server/v3)
# No kubelet, no controllers: enough for envtest-style operator tests.
#
# Usage:
#   scripts/build-control-plane.sh              # build if needed; prints bin dir
#   scripts/build-control-plane.sh --print-dir  # only print the bin dir
#   scripts/build-control-plane.sh --force      # rebuild even if cached
#
#   BIN=$(scripts/build-control-plane.sh | tail -1)
#
# Progress goes to stderr; stdout is exactly one line, the bin directory:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/turnstorm/control-plane/<k8s>-etcd<etcd>/bin
# A cold build of kube-apiserver takes several minutes on 2 cores (see
# tools/k8s/NOTES.md); later builds reuse the Go build cache.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
K8S_MODDIR="$ROOT/tools/k8s"
ETCD_MODDIR="$ROOT/tools/etcd"

# shellcheck source=scripts/go-build-lib.sh
. "$ROOT/scripts/go-build-lib.sh"
K8S_VERSION="$(modversion "$K8S_MODDIR/go.mod" k8s.io/kubernetes)"        # e.g. v1.37.2
ETCD_VERSION="$(modversion "$ETCD_MODDIR/go.mod" go.etcd.io/etcd/server/v3)" # e.g. v3.6.16
if [[ -z "$K8S_VERSION" || -z "$ETCD_VERSION" ]]; then
    echo "build-control-plane: cannot read versions from tools/{k8s,etcd}/go.mod" >&2
    exit 1
fi

CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/turnstorm/control-plane"
OUT_DIR="$CACHE_ROOT/${K8S_VERSION#v}-etcd${ETCD_VERSION#v}"
BIN_DIR="$OUT_DIR/bin"

parse_build_args build-control-plane 2,18 "$@"

k8s_ok() { binary_ok "$BIN_DIR/kube-apiserver" "Kubernetes $K8S_VERSION"; }
kubectl_ok() {
    [[ -x "$BIN_DIR/kubectl" ]] || return 1
    local out
    out="$("$BIN_DIR/kubectl" version --client 2>&1)" || return 1
    [[ "$out" == *"Client Version: $K8S_VERSION"* ]]
}
etcd_ok() { binary_ok "$BIN_DIR/etcd" "etcd Version: ${ETCD_VERSION#v}"; }

all_ok() { k8s_ok && etcd_ok && kubectl_ok; }
use_cache_or_lock all_ok "kube-apiserver $K8S_VERSION, etcd $ETCD_VERSION"

go_env
build() { go_build "$@"; }

if [[ $force -eq 1 ]] || ! etcd_ok; then
    log "building etcd $ETCD_VERSION (takes about a minute)..."
    build "$ETCD_MODDIR" go.etcd.io/etcd/server/v3 etcd ""
    etcd_ok || { log "etcd does not report version $ETCD_VERSION"; exit 1; }
fi

stamps="$(k8s_stamps "$K8S_VERSION")"

if [[ $force -eq 1 ]] || ! k8s_ok; then
    log "building kube-apiserver $K8S_VERSION (takes several minutes)..."
    build "$K8S_MODDIR" k8s.io/kubernetes/cmd/kube-apiserver kube-apiserver "$stamps"
    k8s_ok || { log "kube-apiserver does not report version $K8S_VERSION"; exit 1; }
fi

# kubectl from the same release: tests drive the apiserver the way users do.
if [[ $force -eq 1 ]] || ! kubectl_ok; then
    log "building kubectl $K8S_VERSION (takes a few minutes)..."
    build "$K8S_MODDIR" k8s.io/kubernetes/cmd/kubectl kubectl "$stamps"
    kubectl_ok || { log "kubectl does not report version $K8S_VERSION"; exit 1; }
fi

log "ready: $("$BIN_DIR/kube-apiserver" --version), $("$BIN_DIR/etcd" --version | head -1)"
echo "$BIN_DIR"

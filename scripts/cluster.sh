#!/usr/bin/env bash
# A single-node Kubernetes cluster on this machine (the node test tier's), from the
# binaries and images the build scripts cache under ~/.cache/turnstorm:
#   scripts/cluster.sh up       start it (tears down a crashed one first); prints the
#                               kubeconfig path: export KUBECONFIG=$(scripts/cluster.sh up)
#   scripts/cluster.sh down     stop it and undo everything it changed on the machine
#   scripts/cluster.sh status   what of a node is on the machine now (empty: nothing)
# Needs root. Addresses: pods 198.19.16.0/24, Services 198.19.32.0/24, node 198.19.255.1
# (turnstorm/testing/node.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
[[ -x $PY ]] || { echo "cluster: run scripts/bootstrap.sh test first (no $PY)" >&2; exit 1; }
exec "$PY" -m turnstorm.testing.node "$@"

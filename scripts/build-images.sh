#!/usr/bin/env bash
# Build (once, then cache) turnstorm's container images without a registry:
#   localhost/turnstorm:<version>        images/turnstorm.Containerfile (operator, exporter,
#                                        storm, echo peer)
#   localhost/turnstorm-relay:<version>  images/relay.Containerfile (Debian's coturn)
#   localhost/turnstorm-pause:<hash>     the node tier's sandbox image (tools/pause)
# Both Containerfiles start FROM a Debian bookworm base that this script makes from
# Debian's packages with mmdebstrap, so nothing is pulled from an image registry.
# The engine is podman or docker where one answers, else buildah (chroot isolation,
# vfs storage under the cache: no daemon, no root-wide state).
#
# Usage:
#   scripts/build-images.sh              # build what changed; prints the archive dir
#   scripts/build-images.sh --print-dir  # only print that dir
#   scripts/build-images.sh --force      # rebuild even if cached
#
# stdout is exactly one line, the directory holding one OCI archive per image and
# `images.txt` (name and archive, a line each):
#   ${XDG_CACHE_HOME:-$HOME/.cache}/turnstorm/images/out
# An image is rebuilt when its Containerfile or the sources it copies change (their
# hash is in the archive's name). Cold: about 5 minutes (base ~3, each image ~1).
# Push to a registry (then set the chart's image.repository):
#   skopeo copy oci-archive:<dir>/turnstorm-<hash>.tar docker://REGISTRY/turnstorm:<version>
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/turnstorm/images"
OUT="$CACHE/out"
VERSION="$(awk -F'"' '/^version *=/ { print $2; exit }' "$ROOT/pyproject.toml")"
SUITE=bookworm
BASE_PACKAGES="ca-certificates,mawk"

force=0
for arg in "$@"; do
    case "$arg" in
        --print-dir) echo "$OUT"; exit 0 ;;
        --force) force=1 ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-images: unknown argument: $arg" >&2; exit 2 ;;
    esac
done
log() { echo "build-images: $*" >&2; }
die() { log "error: $*"; exit 1; }

hash_of() { # <files or dirs...>: content hash of the regular files under them
    (cd "$ROOT" && find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.so' ! -name '*.pyc' \
        -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
}
BASE_HASH="$(printf '%s %s\n' "$SUITE" "$BASE_PACKAGES" | sha256sum | cut -c1-12)"
TS_HASH="$(hash_of images/turnstorm.Containerfile pyproject.toml README.md turnstorm operator \
    loadgen crds)-$BASE_HASH"
RELAY_HASH="$(hash_of images/relay.Containerfile)-$BASE_HASH"
PAUSE_HASH="$(hash_of tools/pause)"
PAUSE_BIN="$CACHE/pause-$PAUSE_HASH/pause"

TS_IMAGE="localhost/turnstorm:$VERSION"
RELAY_IMAGE="localhost/turnstorm-relay:$VERSION"
PAUSE_IMAGE="localhost/turnstorm-pause:$PAUSE_HASH"
TS_ARCHIVE="$OUT/turnstorm-$TS_HASH.tar"
RELAY_ARCHIVE="$OUT/relay-$RELAY_HASH.tar"
PAUSE_ARCHIVE="$OUT/pause-$PAUSE_HASH.tar"

write_index() {
    printf '%s %s\n' "$TS_IMAGE" "$TS_ARCHIVE" "$RELAY_IMAGE" "$RELAY_ARCHIVE" \
        "$PAUSE_IMAGE" "$PAUSE_ARCHIVE" > "$OUT/images.txt.tmp"
    mv -f "$OUT/images.txt.tmp" "$OUT/images.txt"
}
if [[ $force -eq 0 && -s $TS_ARCHIVE && -s $RELAY_ARCHIVE && -s $PAUSE_ARCHIVE ]]; then
    write_index
    log "cached: $TS_IMAGE, $RELAY_IMAGE, $PAUSE_IMAGE"
    echo "$OUT"
    exit 0
fi

mkdir -p "$OUT"
exec 9>"$CACHE/.lock"
flock 9

# --- the engine -------------------------------------------------------------------
ENGINE=buildah
if [[ -n "${TURNSTORM_IMAGE_ENGINE:-}" ]]; then
    ENGINE="$TURNSTORM_IMAGE_ENGINE"
elif command -v podman >/dev/null && podman info >/dev/null 2>&1; then
    ENGINE=podman
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    ENGINE=docker
fi
STORE=(--root "$CACHE/storage-overlay" --runroot "$CACHE/run" --storage-driver overlay)
case "$ENGINE" in
    buildah) command -v buildah >/dev/null \
                 || die "no container engine: install buildah (apt-get install buildah), podman or docker"
             engine() { buildah "${STORE[@]}" "$@"; } ;;
    podman)  engine() { podman "$@"; } ;;
    docker)  engine() { docker "$@"; } ;;
    *) die "TURNSTORM_IMAGE_ENGINE must be buildah, podman or docker (got $ENGINE)" ;;
esac
log "engine: $ENGINE"

# --- the base: Debian bookworm from Debian's packages -------------------------------
BASE_IMAGE="localhost/turnstorm-base:$BASE_HASH"
BASE_TAR="$CACHE/base-$BASE_HASH.tar"
if [[ ! -s $BASE_TAR ]]; then
    command -v mmdebstrap >/dev/null || die "mmdebstrap is needed for the base (apt-get install mmdebstrap)"
    log "base: mmdebstrap $SUITE ($BASE_PACKAGES), about 3 minutes..."
    start=$SECONDS
    mmdebstrap --quiet --format=tar --variant=apt --include="$BASE_PACKAGES" \
        --aptopt='Acquire::Check-Valid-Until "false"' \
        --aptopt='APT::Install-Recommends "false"' \
        --customize-hook='rm -rf "$1"/var/cache/apt/*.bin "$1"/var/lib/apt/lists/*' \
        "$SUITE" "$BASE_TAR.tmp" >&2
    mv -f "$BASE_TAR.tmp" "$BASE_TAR"
    log "base: $((SECONDS - start))s ($(du -h "$BASE_TAR" | cut -f1))"
fi
have_image() { engine image inspect "$1" >/dev/null 2>&1; }
if ! have_image "$BASE_IMAGE"; then
    case "$ENGINE" in
        buildah) ctr=$(engine from scratch)
                 engine add "$ctr" "$BASE_TAR" / >/dev/null
                 engine config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
                     --cmd /bin/sh "$ctr"
                 engine commit -q "$ctr" "$BASE_IMAGE" >/dev/null
                 engine rm "$ctr" >/dev/null ;;
        *) engine import --change 'CMD ["/bin/sh"]' "$BASE_TAR" "$BASE_IMAGE" >/dev/null ;;
    esac
fi

# --- the images -------------------------------------------------------------------
build_args=(--build-arg "BASE=$BASE_IMAGE")
ca="${PIP_CERT:-${SSL_CERT_FILE:-}}"
if [[ -n $ca && -f $ca && $ENGINE != docker ]]; then
    # a TLS-intercepting network: pip in the build trusts its CA (docker build has no -v)
    build_args+=(--build-arg PIP_CERT=/run/host-ca.crt -v "$ca:/run/host-ca.crt:ro")
fi
build() { # <Containerfile> <image> <archive>
    local start=$SECONDS
    log "building $2 ($1)..."
    if grep -q '^FROM .* AS build$' "$ROOT/$1"; then
        # the build stage tagged, so that pruning the old images below keeps its layers
        # (the dependencies' layer is reused while pyproject.toml does not change)
        case "$ENGINE" in
            buildah) engine bud --quiet --layers --isolation chroot "${build_args[@]}" \
                         --target build -f "$ROOT/$1" -t "$2-build" "$ROOT" >&2 ;;
            *) engine build --quiet "${build_args[@]}" --target build -f "$ROOT/$1" \
                   -t "$2-build" "$ROOT" >&2 ;;
        esac
    fi
    case "$ENGINE" in
        buildah) engine bud --quiet --layers --isolation chroot "${build_args[@]}" \
                     -f "$ROOT/$1" -t "$2" "$ROOT" >&2 ;;
        *) engine build --quiet "${build_args[@]}" -f "$ROOT/$1" -t "$2" "$ROOT" >&2 ;;
    esac
    export_image "$2" "$3"
    log "built $2 in $((SECONDS - start))s (archive $(du -h "$3" | cut -f1))"
}
export_image() { # <image> <archive>
    rm -f "$2.tmp"
    case "$ENGINE" in
        docker) docker save -o "$2.tmp" "$1" ;;
        *) engine push -q "$1" "oci-archive:$2.tmp:$1" >&2 ;;
    esac
    mv -f "$2.tmp" "$2"
}
[[ $force -eq 0 && -s $TS_ARCHIVE ]] || build images/turnstorm.Containerfile "$TS_IMAGE" "$TS_ARCHIVE"
[[ $force -eq 0 && -s $RELAY_ARCHIVE ]] || build images/relay.Containerfile "$RELAY_IMAGE" "$RELAY_ARCHIVE"
if [[ $force -eq 1 || ! -s $PAUSE_ARCHIVE ]]; then
    if [[ ! -x $PAUSE_BIN ]]; then
        command -v go >/dev/null || die "Go is needed for the node tier's pause image (tools/pause)"
        (cd "$ROOT/tools/pause" && CGO_ENABLED=0 GOTOOLCHAIN=local GOWORK=off \
            go build -trimpath -ldflags='-s -w' -o "$PAUSE_BIN" .)
    fi
    ctx=$(mktemp -d)
    trap 'rm -rf "$ctx"' EXIT
    cp "$PAUSE_BIN" "$ctx/pause"
    printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' > "$ctx/Containerfile"
    case "$ENGINE" in
        buildah) engine bud --quiet --isolation chroot -f "$ctx/Containerfile" -t "$PAUSE_IMAGE" "$ctx" >&2 ;;
        *) engine build --quiet -f "$ctx/Containerfile" -t "$PAUSE_IMAGE" "$ctx" >&2 ;;
    esac
    export_image "$PAUSE_IMAGE" "$PAUSE_ARCHIVE"
fi
# images no tag names any more (earlier builds) go: each is hundreds of MB
case "$ENGINE" in
    buildah) engine rmi --prune >/dev/null 2>&1 || true ;;
    *) engine image prune -f >/dev/null 2>&1 || true ;;
esac
# old archives of other hashes go; the layer store keeps what the next build reuses
find "$OUT" -maxdepth 1 -name '*.tar' ! -path "$TS_ARCHIVE" ! -path "$RELAY_ARCHIVE" \
    ! -path "$PAUSE_ARCHIVE" -delete
write_index
log "ready: $TS_IMAGE $(du -h "$TS_ARCHIVE" | cut -f1), $RELAY_IMAGE $(du -h "$RELAY_ARCHIVE" | cut -f1)"
echo "$OUT"

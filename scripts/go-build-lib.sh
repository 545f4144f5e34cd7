# Shared by scripts/build-control-plane.sh and scripts/build-node.sh (sourced, not run):
# reading pinned versions from go.mod files, checking a cached binary's version, and
# building a Go main package reproducibly into $BIN_DIR.

# One source of truth: a module's version as the go.mod requires it.
modversion() { # <go.mod> <module path>
    awk -v m="$2" '
        $1 == "require" && $2 == m { print $3; exit }
        $1 == m && $2 ~ /^v/ { print $2; exit }
    ' "$1"
}

# A binary counts as built when it exists, runs and reports the pinned version.
binary_ok() { # <path> <expected substring of --version output>
    [[ -x "$1" ]] || return 1
    local out
    out="$("$1" --version 2>&1)" || return 1
    [[ "$out" == *"$2"* ]]
}

# The upstream release build's version stamps (hack/lib/version.sh), so --version and
# /version report the real release.
k8s_stamps() { # <version, e.g. v1.37.2>
    local minor="${1#v1.}" p stamps=""
    minor="${minor%%.*}"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        stamps+=" -X $p.gitVersion=$1 -X $p.gitMajor=1 -X $p.gitMinor=$minor"
        stamps+=" -X $p.gitTreeState=clean"
    done
    echo "$stamps"
}

go_env() {
    export GOFLAGS="-mod=mod${GOFLAGS:+ $GOFLAGS}"
    export GOWORK=off
    export GOTOOLCHAIN=local
    export CGO_ENABLED=0
}

go_build() { # <module dir> <package> <output name> <extra ldflags> [build tags]
    local moddir="$1" pkg="$2" name="$3" extra="$4" tags="${5:-}"
    local tmp="$BIN_DIR/.$name.tmp.$$"
    local start=$SECONDS
    (cd "$moddir" && go build -trimpath ${tags:+-tags "$tags"} -ldflags="-s -w $extra" \
        -o "$tmp" "$pkg")
    mv -f "$tmp" "$BIN_DIR/$name"
    log "built $name in $((SECONDS - start))s ($(du -h "$BIN_DIR/$name" | cut -f1))"
}

# The build scripts' command line: --print-dir (print $BIN_DIR and exit), --force (sets
# force=1), -h/--help (the script's header lines); defines log() with the script's name.
parse_build_args() { # <script name> <help lines, e.g. 2,18> <args...>
    local name="$1" help="$2" arg
    shift 2
    force=0
    for arg in "$@"; do
        case "$arg" in
            --print-dir) echo "$BIN_DIR"; exit 0 ;;
            --force) force=1 ;;
            -h|--help) sed -n "${help}p" "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
            *) echo "$name: unknown argument: $arg" >&2; exit 2 ;;
        esac
    done
    BUILD_NAME="$name"
}
log() { echo "${BUILD_NAME:-build}: $*" >&2; }

# Exit with $BIN_DIR on stdout when everything is built already (<check>, unless --force);
# otherwise make sure Go is there and hold $OUT_DIR/.lock, checking once more after the
# wait (another caller, e.g. a parallel test worker, may have finished the build).
use_cache_or_lock() { # <check command> <what, for the log line>
    local check="$1" what="$2"
    if [[ $force -eq 0 ]] && $check; then
        log "cached: $what"; echo "$BIN_DIR"; exit 0
    fi
    command -v go >/dev/null || { log "go is not on PATH"; exit 1; }
    mkdir -p "$BIN_DIR"
    if command -v flock >/dev/null; then
        exec 9>"$OUT_DIR/.lock"
        flock 9
        if [[ $force -eq 0 ]] && $check; then
            log "cached: $what"; echo "$BIN_DIR"; exit 0
        fi
    fi
}

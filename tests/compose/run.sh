#!/usr/bin/env bash
# `just test-compose`: compose.yaml run for real, on a Docker engine of its own.
#
# Installs what is missing (Debian's docker.io and debootstrap, Compose v2 from Debian's
# docker-compose package), starts dockerd with every path under a temporary folder, builds
# stand-ins for the images compose.yaml names (deploy/standins/build.sh; no registry is needed)
# and oncelog's images from deploy/Dockerfile, runs tests/compose/test_compose_run.py against
# the deployment, and then removes the engine, its containers, networks and data, also when
# something failed or was interrupted. Arguments go to pytest. Needs root.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
started=$(date +%s)
# Bounds, in seconds, for building the images and for the tests (which take about 5 minutes).
build_limit=${ONCELOG_COMPOSE_BUILD_TIMEOUT:-1200}
test_limit=${ONCELOG_COMPOSE_TEST_TIMEOUT:-1200}

log() { printf '%s test-compose: %s\n' "$(date +%T)" "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    echo "just test-compose runs dockerd and debootstrap, which need root" >&2
    exit 1
fi

missing=()
command -v dockerd >/dev/null && [ -x /usr/bin/docker ] || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    # Upgrade-By-Source-Package=false keeps apt from upgrading unrelated packages with them.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o APT::Get::Upgrade-By-Source-Package=false "${missing[@]}" > /dev/null
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/oncelog-compose.XXXXXX")
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$rc" != 0 ] && [ -s "$tmp/compose-logs.txt" ]; then
        echo "--- the services' last log lines (docker compose logs)" >&2
        tail -n 60 "$tmp/compose-logs.txt" >&2
    fi
    if [ -s "$tmp/report.txt" ]; then
        echo "--- what the deployment did" >&2
        cat "$tmp/report.txt" >&2
    fi
    log "stopping the engine"
    "$root/tests/compose/engine.sh" stop "$tmp/engine" || rc=1
    rm -rf "$tmp"
    if [ "$rc" = 0 ]; then verdict=passed; else verdict=FAILED; fi
    log "$verdict in $(($(date +%s) - started)) s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Compose v2: Debian ships it as the docker-compose package from trixie on; bookworm has only
# v1, so the plugin comes from sid's package, unpacked into a client configuration of our own.
log "Compose v2 from Debian's docker-compose package"
"$root/deploy/standins/debian-download.sh" "$tmp/work/apt" "$tmp/compose" docker-compose
export DOCKER_CONFIG="$tmp/docker-config"
mkdir -p "$DOCKER_CONFIG/cli-plugins"
cp "$tmp/compose/usr/libexec/docker/cli-plugins/docker-compose" "$DOCKER_CONFIG/cli-plugins/"
export ONCELOG_DOCKER=/usr/bin/docker

log "starting dockerd"
DOCKER_HOST=$("$root/tests/compose/engine.sh" start "$tmp/engine")
export DOCKER_HOST
"$ONCELOG_DOCKER" compose version >&2

log "building the images"
timeout --foreground --kill-after=30 "$build_limit" \
    "$root/deploy/standins/build.sh" "$tmp/work" "$tmp/images.env"
set -a
# shellcheck disable=SC1091 # written by build.sh
. "$tmp/images.env"
set +a

log "testing the deployment"
cd "$root"
ONCELOG_TEST_COMPOSE=1 ONCELOG_COMPOSE_LOGS="$tmp/compose-logs.txt" ONCELOG_COMPOSE_REPORT="$tmp/report.txt" \
    timeout --foreground --kill-after=60 "$test_limit" \
    uv run --frozen --group dev pytest tests/compose/test_compose_run.py -p no:cacheprovider \
    --basetemp "$tmp/pytest" "$@"

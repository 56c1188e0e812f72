#!/usr/bin/env bash
# Fetch Prometheus 3 (Debian sid's `prometheus` and `promtool` packages, unpacked, not installed)
# into a cache and print the path of the prometheus binary; promtool lies next to it:
#
#   deploy/prometheus/fetch-prometheus3.sh [CACHEDIR]      (default: .cache/prometheus3)
#
# The observability tests run against it as well as against the system's Prometheus 2 (.ci/run
# exports PROMETHEUS3 with this path). A second run finds the cache and downloads nothing; the
# download itself leaves the machine's apt state untouched (deploy/standins/debian-download.sh).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cache=$(realpath -m "${1:-$root/.cache/prometheus3}")
bin="$cache/usr/bin/prometheus"

# The major version a Prometheus binary reports ("prometheus, version 3.5.0+ds (...)").
major() { "$1" --version 2>/dev/null | awk 'NR == 1 {split($3, v, "."); print v[1]}'; }

if [ -x "$bin" ] && [ -x "$cache/usr/bin/promtool" ] && [ "$(major "$bin")" = 3 ]; then
    echo "$bin"
    exit 0
fi

# Unpack beside the cache and move it into place whole, so an interrupted run leaves no half
# cache that a later run would trust; the package lists and the .deb are not kept.
mkdir -p "$(dirname "$cache")"
work=$(mktemp -d "$cache.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$root/deploy/standins/debian-download.sh" "$work/apt" "$work/root" prometheus promtool >&2
found=$(major "$work/root/usr/bin/prometheus")
if [ "$found" != 3 ]; then
    echo "$0: the archive's prometheus is version ${found:-unknown}, not 3.x" >&2
    exit 1
fi
rm -rf "$cache"
mv "$work/root" "$cache"
echo "$bin"

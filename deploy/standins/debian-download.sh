#!/usr/bin/env bash
# Unpack Debian packages from sid (unstable) into a folder without installing them:
#
#   deploy/standins/debian-download.sh APTDIR DEST PACKAGE...
#
# apt reads a sid source list from APTDIR and keeps its package lists and downloads there, so
# the machine's own apt state is untouched. A package sid lacks comes from the machine's own
# sources instead. Each .deb is unpacked with `dpkg -x` into DEST (nothing is configured or run).
set -euo pipefail

[ $# -ge 3 ] || { echo "usage: $0 APTDIR DEST PACKAGE..." >&2; exit 2; }
aptdir=$(realpath -m "$1")
dest=$2
shift 2
mkdir -p "$aptdir/lists/partial" "$aptdir/cache/archives/partial" "$aptdir/debs" "$dest"

# The mirror of the machine's bookworm sources serves sid too.
uri=$(awk -v RS= '/(^|\n)Suites:([^\n]* )?bookworm( |\n|$)/' /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | awk '$1 == "URIs:" {print $2; exit}')
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${uri:-http://deb.debian.org/debian} sid main" \
    > "$aptdir/sid.list"
sid=(-o "Dir::Etc::SourceList=$aptdir/sid.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$aptdir/lists" -o "Dir::Cache=$aptdir/cache")
if [ ! -f "$aptdir/updated" ]; then
    apt-get -qq "${sid[@]}" update > "$aptdir/update.log" 2>&1 || { cat "$aptdir/update.log" >&2; exit 1; }
    touch "$aptdir/updated"
fi

cd "$aptdir/debs"
for package in "$@"; do
    rm -f "${package}"_*.deb
    # apt drops privileges to _apt for downloads, which cannot write here; root downloads it.
    if ! apt-get -qq "${sid[@]}" -o APT::Sandbox::User=root download "$package" 2>/dev/null; then
        echo "sid has no $package: taking the machine's own" >&2
        apt-get -qq -o APT::Sandbox::User=root download "$package"
    fi
    dpkg -x "${package}"_*.deb "$dest"
    dpkg-deb -f "${package}"_*.deb Package Version | tr '\n' ' ' >&2
    echo >&2
done

#!/bin/sh
# The unit files pass `systemd-analyze verify`, and the service's exposure
# (`systemd-analyze security`) stays below 3.0.
#   check-units.sh SERVICE_IN SOCKET ADAPTERD_BINARY
set -eu
in=$1 socket=$2 bin=$3
command -v systemd-analyze >/dev/null || { echo "systemd-analyze is not installed" >&2; exit 1; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
# The unit as `meson install` writes it, with ExecStart pointing at the binary just built.
bindir=$(cd "$(dirname "$bin")" && pwd)
sed -e "s|@bindir@|$bindir|g" -e "s|@docdir@|/usr/share/doc/adapterd|g" "$in" >"$dir/adapterd.service"
cp "$socket" "$dir/adapterd.socket"
cd "$dir"
systemd-analyze verify ./adapterd.service ./adapterd.socket
echo "systemd-analyze verify: ok"
systemd-analyze security --offline=true ./adapterd.service | tail -1
systemd-analyze security --offline=true --threshold=30 ./adapterd.service >/dev/null || {
    echo "FAIL: exposure above 3.0" >&2
    exit 1
}
echo "exposure below 3.0: ok"

#!/bin/sh
# Run promtool with the given arguments: the one on PATH, else .venv/bin/promtool. When neither
# exists and we are root on Debian, fetch the `prometheus` package and unpack only its promtool
# binary into .venv/bin (installing the package would also start a Prometheus server). Without
# promtool the checks are skipped with a note, as on a machine where nothing may be installed.
set -eu
cd "$(dirname "$0")/.."
tool=$(command -v promtool || true)
[ -n "$tool" ] || { [ -x .venv/bin/promtool ] && tool=.venv/bin/promtool; } || true
if [ -z "$tool" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ -d .venv/bin ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "promtool: unpacking it from the Debian prometheus package into .venv/bin" >&2
    if (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null) \
        || { apt-get update -qq && (cd "$tmp" && apt-get download -qq prometheus); }; then
        dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
        cp "$tmp/x/usr/bin/promtool" .venv/bin/promtool
        tool=.venv/bin/promtool
    fi
fi
if [ -z "$tool" ]; then
    echo "promtool not available: skipping 'promtool $*'" >&2
    exit 0
fi
exec "$tool" "$@"

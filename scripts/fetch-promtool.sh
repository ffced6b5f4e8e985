#!/usr/bin/env bash
# Unpacks promtool (for tests/it/monitoring.rs) from Debian's `prometheus` package into
# target/tools/, without installing the package: installing it would add about 100 MB and
# start a Prometheus server. Never fails: without promtool the test skips and says so.
set -uo pipefail
dest=target/tools
[ -x "$dest/promtool" ] && exit 0
command -v promtool >/dev/null 2>&1 && exit 0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if (cd "$work" && apt-get download -q prometheus >/dev/null 2>&1) \
  || (apt-get update -q >/dev/null 2>&1 && cd "$work" && apt-get download -q prometheus >/dev/null 2>&1); then
  dpkg-deb -x "$work"/prometheus_*.deb "$work/x" && mkdir -p "$dest" && cp "$work/x/usr/bin/promtool" "$dest/" && exit 0
fi
echo "could not unpack promtool from Debian's prometheus package; tests/it/monitoring.rs will skip its promtool checks" >&2
exit 0

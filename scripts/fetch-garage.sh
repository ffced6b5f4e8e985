#!/usr/bin/env bash
# Installs Garage 2.5.0 (a distributed S3-compatible object store, the crate `garage`) for
# tests/it/objstore.rs into a cached tools directory, when it is not there yet: the tests
# start it on loopback with their own data directories and ports. Building it takes about
# 6.5 minutes on 2 cores, once per machine. A failed build fails `make test`: under
# SNAPSHIP_REQUIRE_ROOT_TESTS the object-store tests would fail without it anyway.
set -euo pipefail
version=2.5.0
root="${SNAPSHIP_TOOLS:-$HOME/.cache/snapship/tools}/garage-$version"
bin="$root/bin/garage"
if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
  exit 0
fi
echo "installing garage $version into $root (once per machine; about 7 minutes on 2 cores)" >&2
cargo install garage --locked --version "$version" --no-default-features \
  --features sqlite,lmdb,bundled-libs --root "$root"

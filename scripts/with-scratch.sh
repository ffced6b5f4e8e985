#!/usr/bin/env bash
# Runs a command (the test suite, the demo) with a fresh scratch directory for loop images
# and mount points, and tears down whatever is left under it when the command ends, on
# failure and on Ctrl-C too: processes still using it, mounts, loop devices, files.
#
# The command sees SNAPSHIP_TEST_TMP (the scratch directory) and
# SNAPSHIP_REQUIRE_ROOT_TESTS=1 (tests that need root must not skip themselves).
set -u
scratch=$(mktemp -d /tmp/snapship-test.XXXXXX)

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # Processes started from the scratch dir (a demo's daemons) or holding files in it.
  pkill -KILL -f -- "$scratch/" 2>/dev/null
  # Mounts under the scratch dir, deepest first.
  awk -v s="$scratch/" 'index($2, s) == 1 { print $2 }' /proc/self/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
  # Loop devices whose backing file is in the scratch dir.
  losetup -n -O NAME,BACK-FILE 2>/dev/null | awk -v s="$scratch/" 'index($2, s) == 1 { print $1 }' | while read -r dev; do
    losetup -d "$dev"
  done
  rm -rf "$scratch"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export SNAPSHIP_TEST_TMP="$scratch" SNAPSHIP_REQUIRE_ROOT_TESTS=1
"$@"

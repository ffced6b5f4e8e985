#!/usr/bin/env bash
# Runs a command (the test suite, the demo) with a fresh scratch directory for loop images,
# pool files and mount points, and a zfs-fuse daemon, and tears down whatever is left when
# the command ends, on failure and on Ctrl-C too: test pools, the daemon it started,
# processes still using the directory, mounts, loop devices, files.
#
# The command sees SNAPSHIP_TEST_TMP (the scratch directory) and
# SNAPSHIP_REQUIRE_ROOT_TESTS=1 (tests that need root must not skip themselves).
set -u
scratch=$(mktemp -d /tmp/snapship-test.XXXXXX)

# zfs-fuse: one daemon per machine, shared by every run of this script at once (test pools
# are named sstest*). Each run holds a shared lock on $users while it lives; a run that
# finds no daemon starts one and writes its pid to $marker. The last run out (the one that
# gets the lock exclusively) stops a daemon some run started; a daemon nobody here started is
# never touched.
users=/tmp/snapship-zfs-fuse.users
marker=/tmp/snapship-zfs-fuse.pid
exec 9>>"$users"
flock -s 9
if command -v zfs-fuse >/dev/null 2>&1 && ! pgrep -x zfs-fuse >/dev/null; then
  zfs-fuse --no-daemon >/tmp/snapship-zfs-fuse.log 2>&1 &
  echo $! >"$marker"
  for _ in $(seq 100); do zpool list >/dev/null 2>&1 && break; sleep 0.1; done
fi

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # Test pools first (they unmount their datasets), then the daemon if it is ours.
  if command -v zpool >/dev/null 2>&1 && pgrep -x zfs-fuse >/dev/null; then
    # Only the pools whose devices are files in our scratch dir: another run on this machine
    # may have test pools of its own.
    timeout 30 zpool list -H -o name 2>/dev/null | grep '^sstest' | while read -r pool; do
      if timeout 30 zpool status "$pool" 2>/dev/null | grep -qF "$scratch/"; then
        timeout 30 zpool destroy -f "$pool" || echo "could not destroy zfs pool $pool" >&2
      fi
    done
  fi
  if flock -x -n 9 && [ -f "$marker" ]; then
    zfs_pid=$(cat "$marker")
    if [ "$(cat "/proc/$zfs_pid/comm" 2>/dev/null)" = zfs-fuse ]; then
      kill "$zfs_pid" 2>/dev/null
      for _ in $(seq 100); do kill -0 "$zfs_pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$zfs_pid" 2>/dev/null
    fi
    rm -f "$marker"
  fi
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

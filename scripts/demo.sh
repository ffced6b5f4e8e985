#!/usr/bin/env bash
# `make demo`: two loop-mounted btrfs images, one file set replicated from the first to the
# second, full and then incremental. Runs under scripts/with-scratch.sh, which cleans up.
set -euo pipefail
bin=$(realpath "$1")
dir=${SNAPSHIP_TEST_TMP:?run me through scripts/with-scratch.sh}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Two btrfs filesystems in loop images: origin and replica"
for fs in origin replica; do
  truncate -s 512M "$dir/$fs.img"
  mkfs.btrfs -q "$dir/$fs.img" >/dev/null 2>&1
  mkdir -p "$dir/$fs"
  mount -o loop,compress=zstd "$dir/$fs.img" "$dir/$fs"
  echo "$dir/$fs"
done
btrfs -q subvolume create "$dir/origin/projects"

step "Node config and policy"
mkdir -p "$dir/policies"
cat > "$dir/node.yaml" <<YAML
node: alpha
state_dir: state
policies:
  - policies/*.yaml
YAML
cat > "$dir/policies/projects.yaml" <<YAML
fileset: projects
backend: btrfs
mode: snapshot
schedule: "*/15 * * * *"
origin:
  node: alpha
  path: $dir/origin/projects
replicas:
  - node: alpha            # a replica on this same node: shipped through a local pipe
    path: $dir/replica/projects
YAML
cat "$dir/policies/projects.yaml"
"$bin" check --config "$dir/node.yaml"

step "Write files on the origin and sync (a full send)"
mkdir -p "$dir/origin/projects/src"
head -c 20M /dev/urandom > "$dir/origin/projects/data.bin"
for i in $(seq 1 200); do echo "line $i of the report" >> "$dir/origin/projects/src/report.txt"; done
"$bin" sync --config "$dir/node.yaml" projects

step "Change a little and sync again (incremental from the common base)"
echo "a new file" > "$dir/origin/projects/src/new.txt"
rm "$dir/origin/projects/src/report.txt"
"$bin" sync --config "$dir/node.yaml" projects

step "The replica: read-only received snapshots, and latest"
ls -l "$dir/replica/projects"
diff -r "$dir/origin/projects" "$dir/replica/projects/latest" && echo "origin and replica/latest are identical"

#!/usr/bin/env bash
# `make demo`: two nodes on 127.0.0.1, each with its own loop-mounted btrfs image. alpha is
# the origin of the file set `projects`, beta its replica; files written on alpha appear on
# beta, shipped over QUIC with mutual TLS. Runs under scripts/with-scratch.sh, which stops
# the daemon and unmounts everything when this script ends, however it ends.
set -euo pipefail
bin=$(realpath "$1")
dir=${SNAPSHIP_TEST_TMP:?run me through scripts/with-scratch.sh}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Two nodes, two btrfs filesystems (loop images)"
for node in alpha beta; do
  truncate -s 512M "$dir/$node.img"
  mkfs.btrfs -q "$dir/$node.img" >/dev/null 2>&1
  mkdir -p "$dir/$node/mnt"
  mount -o loop,compress=zstd "$dir/$node.img" "$dir/$node/mnt"
  echo "$node: $dir/$node/mnt"
done
btrfs -q subvolume create "$dir/alpha/mnt/projects"

step "Certificates for mutual TLS: one CA, one certificate per node"
"$bin" certs --out "$dir/certs" alpha beta

step "The same policy on both nodes; a node config each"
policy="fileset: projects
backend: btrfs
mode: snapshot
schedule: \"*/15 * * * *\"
origin:
  node: alpha
  path: $dir/alpha/mnt/projects
replicas:
  - node: beta
    path: $dir/beta/mnt/backup/projects
transfer:
  compression: zstd"
for node in alpha beta; do
  mkdir -p "$dir/$node/policies"
  echo "$policy" > "$dir/$node/policies/projects.yaml"
done
port() { [ "$1" = alpha ] && echo 7441 || echo 7442; }
for node in alpha beta; do
  other=$([ "$node" = alpha ] && echo beta || echo alpha)
  cat > "$dir/$node/node.yaml" <<YAML
node: $node
listen: 127.0.0.1:$(port "$node")
state_dir: state
tls:
  ca: ../certs/ca.pem
  cert: ../certs/$node.pem
  key: ../certs/$node.key
peers:
  $other: 127.0.0.1:$(port "$other")
policies:
  - policies/*.yaml
YAML
done
echo "$policy"
"$bin" check --config "$dir/alpha/node.yaml"
"$bin" check --config "$dir/beta/node.yaml"

step "beta runs as replica (snapship run, in the background)"
"$bin" run --config "$dir/beta/node.yaml" 2> "$dir/beta.log" &
for _ in $(seq 50); do grep -q "listening" "$dir/beta.log" && break; sleep 0.1; done
cat "$dir/beta.log"

step "Write files on alpha, then sync: a full send over QUIC"
mkdir -p "$dir/alpha/mnt/projects/src"
head -c 20M /dev/urandom > "$dir/alpha/mnt/projects/data.bin"
for i in $(seq 1 2000); do echo "line $i of the quarterly report"; done > "$dir/alpha/mnt/projects/src/report.txt"
"$bin" sync --config "$dir/alpha/node.yaml" projects

step "Change a little, sync again: incremental from the common base"
echo "a new file, written on alpha" > "$dir/alpha/mnt/projects/src/new.txt"
rm "$dir/alpha/mnt/projects/src/report.txt"
"$bin" sync --config "$dir/alpha/node.yaml" projects

step "On beta: read-only received snapshots and latest"
ls -l "$dir/beta/mnt/backup/projects"
cat "$dir/beta/mnt/backup/projects/latest/src/new.txt"
diff -r "$dir/alpha/mnt/projects" "$dir/beta/mnt/backup/projects/latest" && echo "alpha's projects and beta's latest are identical"

step "What beta logged"
cat "$dir/beta.log"
kill %1 && wait %1 || true

# snapship: build, test and demo. `make test` is what CI runs (.ci/run).

CARGO ?= cargo
# Debian packages the build and the tests need: btrfs tools, the libbtrfsutil C library,
# libclang for the bindgen run of libbtrfsutil-sys, and zfs-fuse for real ZFS pools on files
# (there is no ZFS kernel module here).
DEBS := btrfs-progs libbtrfsutil-dev libclang-dev pkg-config zfs-fuse

# Only the benchmarks need these: the ssh comparison.
BENCH_DEBS := openssh-server openssh-client

.PHONY: all deps build test demo bench clean

all: build

deps:
	@scripts/install-deps.sh $(DEBS)

build: deps
	$(CARGO) build --release

# Unit tests, then the integration tests on loop-mounted btrfs images and zfs-fuse pools.
# Everything they mount or start is torn down on exit, failures included.
test: deps
	$(CARGO) build --all-targets
	scripts/with-scratch.sh $(CARGO) test --all-targets

# The main job on two loop btrfs images: files written on the origin appear on the replica.
demo: build
	scripts/with-scratch.sh scripts/demo.sh target/release/snapship

# Benchmarks (not part of CI): writes docs/benchmarks.md. Takes about ten minutes.
bench: deps
	@scripts/install-deps.sh $(BENCH_DEBS)
	$(CARGO) build --release --benches
	scripts/with-scratch.sh $(CARGO) bench --bench replication

clean:
	$(CARGO) clean

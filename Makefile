# snapship: build, test and demo. `make test` is what CI runs (.ci/run).

CARGO ?= cargo
# Debian packages the build and the tests need: btrfs tools, the libbtrfsutil C library,
# libclang for the bindgen run of libbtrfsutil-sys, zfs-fuse for real ZFS pools on files
# (there is no ZFS kernel module here), procps (pgrep, kill) for the fault tests, systemd for
# `systemd-analyze security --offline` on the shipped unit (3 MB; installing it in a
# container starts nothing), libcap2-bin (setcap, getcap) and python3-seccomp (the unit's
# system call filter, rebuilt by tests/data/seccomp_like_unit.py) for the unit's tests.
DEBS := btrfs-progs libbtrfsutil-dev libclang-dev pkg-config zfs-fuse procps systemd libcap2-bin python3-seccomp

# Only the benchmarks need these: the ssh comparison, and rsync for the verify comparison.
BENCH_DEBS := openssh-server openssh-client rsync
# Only fuzzing needs this: libfuzzer-sys compiles libFuzzer (C++).
FUZZ_DEBS := g++

.PHONY: all deps build install lint test demo bench fuzz clean

all: build

deps:
	@scripts/install-deps.sh $(DEBS)

build: deps
	$(CARGO) build --release

# Installs the release binary (made by `make build` when missing), the systemd unit, the man
# pages and the bash, zsh and fish completions under $(DESTDIR)$(PREFIX). The man pages and
# completions come from the binary itself (`snapship generate`, hidden from --help), so they
# always match its verbs and options. The unit goes where systemd looks for units of a local
# prefix, with its ExecStart pointing at the installed binary; then: `systemctl daemon-reload`
# and the drop-in of `snapship generate unit-paths --config FILE` (docs/configuration.md).
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
UNITDIR ?= $(PREFIX)/lib/systemd/system
GEN := target/release/generated

target/release/snapship:
	$(MAKE) build

install: target/release/snapship
	rm -rf $(GEN)
	target/release/snapship generate man $(GEN)/man
	@set -e; for sh in bash zsh fish; do target/release/snapship generate completions $$sh $(GEN)/completions; done
	install -D -m 755 target/release/snapship $(DESTDIR)$(BINDIR)/snapship
	install -d -m 755 $(DESTDIR)$(MANDIR)/man1
	install -m 644 $(GEN)/man/*.1 $(DESTDIR)$(MANDIR)/man1/
	install -D -m 644 $(GEN)/completions/snapship.bash $(DESTDIR)$(PREFIX)/share/bash-completion/completions/snapship
	install -D -m 644 $(GEN)/completions/_snapship $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_snapship
	install -D -m 644 $(GEN)/completions/snapship.fish $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/snapship.fish
	install -d -m 755 $(DESTDIR)$(UNITDIR)
	sed 's|/usr/local/bin/snapship|$(BINDIR)/snapship|g' examples/snapship.service > $(DESTDIR)$(UNITDIR)/snapship.service
	chmod 644 $(DESTDIR)$(UNITDIR)/snapship.service

# Formatting (rustfmt.toml) and clippy with warnings as errors, on every target.
lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --all-targets -- -D warnings

# Unit tests, then the integration tests on loop-mounted btrfs images and zfs-fuse pools.
# Everything they mount or start is torn down on exit, failures included. The fault tests
# break transfers through test hooks that only a `test-hooks` build has (see Cargo.toml).
# promtool for the alert-rule checks is unpacked from Debian's prometheus package into
# target/tools (not installed: that would start a Prometheus server); without it they skip.
# Garage, the S3 store the object-storage tests run against, is built once into
# ~/.cache/snapship/tools (scripts/fetch-garage.sh).
test: deps
	@scripts/fetch-promtool.sh
	@scripts/fetch-garage.sh
	$(CARGO) build --all-targets --features test-hooks
	scripts/with-scratch.sh $(CARGO) test --all-targets --features test-hooks

# The main job on two loop btrfs images: files written on the origin appear on the replica.
demo: build
	scripts/with-scratch.sh scripts/demo.sh target/release/snapship

# Benchmarks (not part of CI): writes docs/benchmarks.md. Takes about ten minutes.
bench: deps
	@scripts/install-deps.sh $(BENCH_DEBS)
	@scripts/fetch-garage.sh
	$(CARGO) build --release --benches
	scripts/with-scratch.sh $(CARGO) bench --bench replication

# Fuzzing (not part of CI): each cargo-fuzz target in fuzz/ for FUZZ_SECONDS, starting from
# the corpus earlier runs grew (fuzz/corpus/TARGET, untracked; new finds go there) and the
# tracked seeds (fuzz/seeds/TARGET). cargo-fuzz needs nightly flags, so RUSTC_BOOTSTRAP=1
# lets the stable toolchain take them. A crash stops the run, with its input saved in
# fuzz/artifacts/TARGET/ (replay: cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...).
FUZZ_SECONDS ?= 600
FUZZ_TARGETS := frame_decode config_load

fuzz: deps
	@scripts/install-deps.sh $(FUZZ_DEBS)
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	@set -e; for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t; \
		echo "== fuzzing $$t for $(FUZZ_SECONDS)s"; \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t fuzz/corpus/$$t fuzz/seeds/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -print_final_stats=1; \
	done
	@for t in $(FUZZ_TARGETS); do echo "$$t: $$(ls fuzz/corpus/$$t | wc -l) files in fuzz/corpus/$$t"; done

clean:
	$(CARGO) clean

# Airlock: every entry point a person or CI needs. `make demo` and `make test`
# each install what is missing first, so both work on a fresh Debian 12 machine.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

SWIFT ?= swift
SYSTEM_PACKAGES := libseccomp-dev libcap-dev linux-source-6.1 bc bison flex libelf-dev libssl-dev \
                   busybox-static e2fsprogs cpio gcc make xz-utils
KVM_PROBES ?= ../shared/kvm-probes
BENCH_OUT ?= .build/bench

.PHONY: all deps images kernel agent rootfs rootfs-debian build build-release demo test test-unit bench-exits bench-blk fuzz-virtio clean doctor

all: build

## deps: install the Debian packages the build needs (only those missing)
deps:
	scripts/ensure-packages.sh $(SYSTEM_PACKAGES)
	@command -v $(SWIFT) >/dev/null || { echo "swift is not on PATH: install Swift 6.1 or newer (https://swift.org/install)"; exit 1; }

## kernel: build (or take from the cache) the guest kernel and install it
kernel: deps
	guest-kernel/build.sh

## agent: build the guest agent (airlock-init), a static executable, stripped
AGENT := .build/agent/airlock-init
agent: deps
	$(SWIFT) build -c release --product airlock-init
	mkdir -p $(dir $(AGENT))
	strip -o $(AGENT).tmp $$($(SWIFT) build -c release --show-bin-path)/airlock-init
	mv -f $(AGENT).tmp $(AGENT)

## rootfs: build the default root filesystem (ext4 and initramfs, with the agent) and install it
rootfs: deps agent
	rootfs/build.sh --agent $(AGENT)

images: kernel rootfs

## rootfs-debian: optional Debian minbase image with python3 (debootstrap; needs the Debian mirror)
rootfs-debian: deps
	rootfs/build-debian.sh

build: deps
	$(SWIFT) build

build-release: deps
	$(SWIFT) build -c release

doctor: build
	$(SWIFT) run airlock doctor

## demo: set everything up and run a command in a fresh VM
demo: images build-release
	$$($(SWIFT) build -c release --show-bin-path)/airlock doctor
	$$($(SWIFT) build -c release --show-bin-path)/airlock run -- sh -c 'echo "hello from $$(uname -sr) in a micro-VM"; cat /proc/cpuinfo | grep -m1 "model name"' 

## test: set everything up and run the whole suite (VM tests included;
## AIRLOCK_SKIP_VM_TESTS=1 leaves them out on purpose)
test: images build
	$(SWIFT) test

## test-unit: only the tests that need no VM
test-unit: deps
	AIRLOCK_SKIP_VM_TESTS=1 $(SWIFT) test

## bench-exits: one port-I/O exit through Airlock's run loop vs the C floor (micro.c), same run
bench-exits: deps
	$(SWIFT) build -c release --product airlock-bench-exits
	mkdir -p $(BENCH_OUT)
	gcc -O2 -DMICRO_C='"'$$(realpath $(KVM_PROBES)/micro.c)'"' -o $(BENCH_OUT)/exit-floor bench/exit-floor.c
	@c=($$($(BENCH_OUT)/exit-floor 5 | awk '/100k out/ {sub("s","",$$5); print $$5}')); \
	sorted=$$(printf '%s\n' "$${c[@]}" | sort -n); cmed=$$(echo "$$sorted" | sed -n 3p); \
	echo "C floor (micro.c) 100000 out exits: median $$cmed s (min $$(echo "$$sorted" | head -1), max $$(echo "$$sorted" | tail -1))"; \
	line=$$($$($(SWIFT) build -c release --show-bin-path)/airlock-bench-exits 100000 5); echo "$$line"; \
	amed=$$(echo "$$line" | head -1 | sed -E 's/.*median ([0-9.]+) s.*/\1/'); \
	echo "ratio airlock/C: $$(echo "scale=3; $$amed / $$cmed" | bc)"

## bench-blk: virtio-blk sequential read in the guest vs the host's read of the same file (BLK_MIB, default 256)
BLK_MIB ?= 256
bench-blk: images
	bench/blk-throughput.sh $(BLK_MIB)

## fuzz-virtio: a seeded random driver against the virtio transport, chain parser and block device
FUZZ_ITERATIONS ?= 1000000
FUZZ_SEED ?= 1
fuzz-virtio: deps
	$(SWIFT) build -c release --product airlock-fuzz-virtio
	$$($(SWIFT) build -c release --show-bin-path)/airlock-fuzz-virtio $(FUZZ_ITERATIONS) $(FUZZ_SEED)

clean:
	rm -rf .build

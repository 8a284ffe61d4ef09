# Airlock: every entry point a person or CI needs. `make demo` and `make test`
# each install what is missing first, so both work on a fresh Debian 12 machine.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

SWIFT ?= swift
SYSTEM_PACKAGES := libseccomp-dev libcap-dev linux-source-6.1 bc bison flex libelf-dev libssl-dev \
                   busybox-static e2fsprogs cpio gcc make xz-utils curl
KVM_PROBES ?= ../shared/kvm-probes
BENCH_OUT ?= .build/bench

.PHONY: all deps images kernel agent rootfs rootfs-debian build build-release demo test test-unit bench bench-tools bench-c bench-exits bench-blk bench-selftest bench-jail bench-serve bench-snapshot fuzz-virtio fuzz-artifacts fuzz-snapshot probe-snapshot rootfs-build clean doctor

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

## rootfs-build: optional toolchain image (Debian with build-essential, make, python3, git and the
## agent) for `airlock run --image build`; debootstrap, needs root and the Debian mirror
rootfs-build: deps agent
	rootfs/build-debian.sh --name build --agent $(AGENT) --include build-essential,make,git

build: deps
	$(SWIFT) build

build-release: deps
	$(SWIFT) build -c release

doctor: build
	$(SWIFT) run airlock doctor

## demo: set everything up and run a command in a fresh VM
demo: images build-release
	$$($(SWIFT) build -c release --show-bin-path)/airlock doctor
	$$($(SWIFT) build -c release --show-bin-path)/airlock run -- sh -c 'echo "hello from $$(uname -sr) in a micro-VM, as $$(id -un)"; grep MemTotal /proc/meminfo' 

## test: set everything up and run the whole suite (VM tests included;
## AIRLOCK_SKIP_VM_TESTS=1 leaves them out on purpose)
test: images build
	$(SWIFT) test

## test-unit: only the tests that need no VM
test-unit: deps
	AIRLOCK_SKIP_VM_TESTS=1 $(SWIFT) test

## bench: every benchmark in one run (builds what it needs, the toolchain image included, installs QEMU to compare);
## writes $(BENCH_RESULTS) and regenerates docs/benchmarks.md and docs/boot-timeline.svg.
## Takes several minutes on a PVM host (each guest boot is tens of seconds).
BENCH_RESULTS ?= bench/results/latest.json
BENCH_ONLY ?= exits,start,boot,run,pv,ctxswitch,blk,qemu,fuzz,workspace,build,serve,snapshot
BENCH_QEMU ?= 1
BENCH_MEMORY_MIB ?= 128
BENCH_EXIT_ROUNDS ?= 7
BENCH_START_RUNS ?= 10
BENCH_BOOT_RUNS ?= 3
BENCH_RUN_RUNS ?= 3
BENCH_BLK_MIB ?= 16
BENCH_BLK_PASSES ?= 3
BENCH_SNAPSHOT_ROUNDS ?= 3
BENCH_SNAPSHOT_VMS ?= 10
BENCH_SNAPSHOT_SIZES ?= 128,512
# serve: rounds of 1, 2 and 4 requests per VM cell (each cold request and each refill is a boot),
# requests per scripted (no VM) cell, and the soak's requests against each service (the VM soak:
# real jailed VMs, affordable since the guest kernel runs natively; a client that goes away does so
# after BENCH_SERVE_CANCEL_AFTER seconds).
BENCH_SERVE_ROUNDS ?= 10
BENCH_SERVE_SCRIPTED ?= 500
BENCH_SERVE_SOAK ?= 1000
BENCH_SERVE_SOAK_VM ?= 1000
BENCH_SERVE_CANCEL_AFTER ?= 1
BENCH_SERVE_ARGS = --serve-vm-rounds $(BENCH_SERVE_ROUNDS) --serve-scripted-requests $(BENCH_SERVE_SCRIPTED) \
		--serve-soak-scripted $(BENCH_SERVE_SOAK) --serve-soak-vm $(BENCH_SERVE_SOAK_VM) \
		--serve-vm-cancel-after $(BENCH_SERVE_CANCEL_AFTER)
BENCH_PY = python3 bench/bench.py --bin "$$($(SWIFT) build -c release --show-bin-path)" --tools $(BENCH_OUT)
bench: images rootfs-build bench-tools
	$(if $(filter 1,$(BENCH_QEMU)),scripts/ensure-packages.sh qemu-system-x86)
	$(BENCH_PY) --out $(BENCH_RESULTS) \
		--only $(if $(filter 1,$(BENCH_QEMU)),$(BENCH_ONLY),$(subst qemu,,$(BENCH_ONLY))) \
		--memory-mib $(BENCH_MEMORY_MIB) --exit-rounds $(BENCH_EXIT_ROUNDS) --start-runs $(BENCH_START_RUNS) \
		--boot-runs $(BENCH_BOOT_RUNS) --run-runs $(BENCH_RUN_RUNS) --blk-mib $(BENCH_BLK_MIB) --blk-passes $(BENCH_BLK_PASSES) \
		--snapshot-rounds $(BENCH_SNAPSHOT_ROUNDS) --snapshot-vms $(BENCH_SNAPSHOT_VMS) --snapshot-sizes $(BENCH_SNAPSHOT_SIZES) \
		$(BENCH_SERVE_ARGS)
	python3 bench/report.py $(BENCH_RESULTS)

## bench-tools: the release binaries the benchmarks run, the C floor and the start-up probe
bench-tools: deps bench-c
	$(SWIFT) build -c release --product airlock
	$(SWIFT) build -c release --product airlock-vmm
	$(SWIFT) build -c release --product airlock-bench-exits
	$(SWIFT) build -c release --product airlock-fuzz-virtio
	$(SWIFT) build -c release --product airlock-bench-workspace

bench-c: deps
	scripts/ensure-packages.sh python3
	mkdir -p $(BENCH_OUT)
	gcc -O2 -DMICRO_C='"'$$(realpath $(KVM_PROBES)/micro.c)'"' -o $(BENCH_OUT)/exit-floor bench/exit-floor.c
	gcc -O2 -Wall -shared -fPIC -o $(BENCH_OUT)/kvm-probe.so bench/kvm-probe.c -ldl
	gcc -O2 -Wall -o $(BENCH_OUT)/exec-timed bench/exec-timed.c
	gcc -O2 -Wall -static -nostdlib -fno-stack-protector -fno-builtin -o $(BENCH_OUT)/vecstress Tests/guest-programs/vecstress.c
	gcc -O2 -Wall -static -o $(BENCH_OUT)/pvmode Tests/guest-programs/pvmode.c

## bench-jail: what the jail adds to one `airlock run -- true` (wall, memory), jailed and --no-jail alternating
JAIL_ROUNDS ?= 3
bench-jail: images build-release
	python3 bench/jail_overhead.py $$($(SWIFT) build -c release --show-bin-path)/airlock $(JAIL_ROUNDS)

## bench-serve: `airlock serve` alone (bench/serve_load.py): warm pool against none at concurrency 1, 2, 4,
## the service's own latency, and the soaks; writes $(BENCH_OUT)/serve.json
bench-serve: images deps
	$(SWIFT) build -c release --product airlock
	$(SWIFT) build -c release --product airlock-vmm
	python3 bench/serve_load.py --airlock "$$($(SWIFT) build -c release --show-bin-path)/airlock" --out $(BENCH_OUT)/serve.json \
		--memory-mib $(BENCH_MEMORY_MIB) --vm-rounds $(BENCH_SERVE_ROUNDS) --scripted-requests $(BENCH_SERVE_SCRIPTED) \
		--soak-scripted $(BENCH_SERVE_SOAK) --soak-vm $(BENCH_SERVE_SOAK_VM) --vm-cancel-after $(BENCH_SERVE_CANCEL_AFTER)

## bench-exits: one port-I/O exit through Airlock's run loop vs the C floor (micro.c), same run
bench-exits: bench-c
	$(SWIFT) build -c release --product airlock-bench-exits
	$(BENCH_PY) --only exits --exit-rounds $(BENCH_EXIT_ROUNDS) --out $(BENCH_OUT)/exits.json

## bench-blk: virtio-blk sequential read in the guest vs the host's read of the same file (BLK_MIB, default 256)
BLK_MIB ?= 256
bench-blk: images bench-c
	$(SWIFT) build -c release --product airlock
	$(BENCH_PY) --only blk --blk-mib $(BLK_MIB) --blk-passes $(BENCH_BLK_PASSES) --out $(BENCH_OUT)/blk.json

## bench-selftest: the benchmark scripts' own tests (parsing, memory split, report) with no VM
bench-selftest: bench-c
	python3 -m unittest discover -s bench -p 'test_*.py'

## bench-snapshot: only the snapshot figures (sizes and write times, restored against cold, 10 idle restored VMs)
bench-snapshot: images bench-tools
	$(BENCH_PY) --only snapshot --memory-mib $(BENCH_MEMORY_MIB) --snapshot-rounds $(BENCH_SNAPSHOT_ROUNDS) \
		--snapshot-vms $(BENCH_SNAPSHOT_VMS) --snapshot-sizes $(BENCH_SNAPSHOT_SIZES) --out $(BENCH_OUT)/snapshot.json

## fuzz-snapshot: the snapshot reader against seeded random damage to a valid file (FUZZ_ROUNDS, FUZZ_SEED)
FUZZ_ROUNDS ?= 100000
fuzz-snapshot: deps
	AIRLOCK_SNAPSHOT_FUZZ_ROUNDS=$(FUZZ_ROUNDS) AIRLOCK_FUZZ_SEED=$(FUZZ_SEED) $(SWIFT) test --filter 'theReaderSurvivesRandomDamage|theStateDecoderSurvivesAnyBytes'

## fuzz-virtio: a seeded random driver against the virtio transport, chain parser and block device
FUZZ_ITERATIONS ?= 1000000
FUZZ_SEED ?= 1
fuzz-virtio: deps
	$(SWIFT) build -c release --product airlock-fuzz-virtio
	$$($(SWIFT) build -c release --show-bin-path)/airlock-fuzz-virtio $(FUZZ_ITERATIONS) $(FUZZ_SEED)

## probe-snapshot: can a vCPU's whole state be saved and restored into a fresh VM on this host?
## (scripts/snapshot-probe.c: emulated mode, and on a PVM host the PV mode with its VIF MSR)
probe-snapshot:
	mkdir -p $(BENCH_OUT)
	gcc -O2 -Wall -o $(BENCH_OUT)/snapshot-probe scripts/snapshot-probe.c
	$(BENCH_OUT)/snapshot-probe emulated
	if [ -e /sys/module/kvm_pvm ]; then $(BENCH_OUT)/snapshot-probe pv 0; fi

## fuzz-artifacts: seeded hostile workspace images against the artifact extractor and the ext4 tree reader
FUZZ_ARTIFACT_ROUNDS ?= 5000
fuzz-artifacts: deps
	$(SWIFT) build -c release --product airlock-fuzz-artifacts
	$$($(SWIFT) build -c release --show-bin-path)/airlock-fuzz-artifacts $(FUZZ_ARTIFACT_ROUNDS) $(FUZZ_SEED)

clean:
	rm -rf .build

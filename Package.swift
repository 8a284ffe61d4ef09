// swift-tools-version: 6.1
import PackageDescription

// Targets are small and have one job each; see docs/architecture.md for the map.
let package = Package(
    name: "Airlock",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "airlock", targets: ["AirlockCLI"]),
        .library(name: "Airlock", targets: ["Airlock"]),
        .library(name: "VMM", targets: ["VMM"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
    ],
    targets: [
        // KVM ioctl numbers and structs; the variadic ioctl wrapped so Swift can call it.
        .target(name: "CAirlockShim"),
        // File-descriptor owners, errno helpers with EINTR retry, mmap regions.
        .target(name: "AirlockOS", dependencies: ["CAirlockShim"]),
        // Typed wrappers for /dev/kvm, the VM fd and vCPU fds (with the mmapped kvm_run).
        .target(name: "KVM", dependencies: ["AirlockOS", "CAirlockShim"]),
        // The only code that touches guest RAM: bounds-checked reads and writes.
        .target(name: "GuestMemory", dependencies: ["AirlockOS"]),
        // x86-64 Linux boot protocol: ELF and bzImage loaders, boot_params, e820, command line.
        .target(name: "LinuxBoot", dependencies: ["GuestMemory", "AirlockOS"]),
        // Virtio 1.x over MMIO: split virtqueues with chain validation, the transport.
        .target(name: "Virtio", dependencies: ["GuestMemory"]),
        // Device models behind the transport: block (file-backed).
        .target(name: "VirtioDevices", dependencies: ["Virtio", "GuestMemory", "AirlockOS"]),
        // The machine: layout, CPU set-up, buses, legacy devices, exit handling, run loop.
        .target(
            name: "VMM",
            dependencies: [
                "KVM", "GuestMemory", "LinuxBoot", "AirlockOS", "Virtio", "VirtioDevices",
                .product(name: "Logging", package: "swift-log"),
            ]),
        // Host-guest messages and framing, shared by the VMM side and the guest agent. No Foundation.
        .target(name: "AgentProtocol"),
        // The few libc calls the agent needs that Swift cannot make safely: vfork+exec with uid/gid/cwd.
        .target(name: "CAgentShim"),
        // The guest agent's logic (PID 1): mounts, ports, running the command, reaping, reporting.
        .target(name: "AgentCore", dependencies: ["AgentProtocol", "CAgentShim"]),
        // The guest's PID 1: a thin static executable over AgentCore, installed into the rootfs.
        .executableTarget(
            name: "airlock-init", dependencies: ["AgentCore"],
            linkerSettings: [.unsafeFlags(["-static-executable"])]),
        // Read-only look-ups in an ext4 image (does the rootfs hold the agent?), without mounting it.
        .target(name: "RootFS", dependencies: ["AirlockOS"]),
        // libseccomp and libcap (Debian's -dev packages), through pkg-config.
        .systemLibrary(name: "CSeccomp", pkgConfig: "libseccomp", providers: [.apt(["libseccomp-dev"])]),
        .systemLibrary(name: "CCap", pkgConfig: "libcap", providers: [.apt(["libcap-dev"])]),
        // OpenSSL's libcrypto (libssl-dev, which the kernel build needs anyway): SHA-256 of images.
        // Linked from its static archive by the Airlock target, so the VMM does not load and
        // relocate all of libcrypto.so at every start for a digest only `airlock doctor` takes.
        .systemLibrary(name: "COpenSSL"),
        // What the jail needs from libc that Swift cannot call: namespaces, mounts, pivot_root, the
        // stage-1 wait loop, posix_spawn with an fd map, the async-signal-safe SIGSYS reporter.
        .target(name: "CJailShim"),
        // The jail around every VMM: fds, rlimits, cgroups, namespaces, pivot_root, capabilities, seccomp.
        .target(name: "Jailer", dependencies: ["AirlockOS", "CAirlockShim", "CJailShim", "CSeccomp", "CCap"]),
        // Test-only: enters a jail, installs the filters, and breaks a rule on request (JailerTests).
        .executableTarget(name: "airlock-jail-probe", dependencies: ["Jailer", "CJailShim", "CAirlockShim"]),
        // The snapshot file format: a saved, booted VM (manifest, vCPU and device state, RAM
        // image), written from a paused machine and read back with every part checked.
        .target(name: "Snapshot", dependencies: ["VMM", "KVM", "GuestMemory", "Virtio", "VirtioDevices", "AirlockOS", "COpenSSL"],
                linkerSettings: [.unsafeFlags(["-Xlinker", "-Bstatic", "-Xlinker", "-lcrypto", "-Xlinker", "-Bdynamic"])]),
        // The public library: image store, host report, the async Sandbox API.
        .target(
            name: "Airlock",
            dependencies: [
                "VMM", "KVM", "AirlockOS", "VirtioDevices", "AgentProtocol", "RootFS", "Jailer", "Snapshot",
                "COpenSSL",
                .product(name: "Logging", package: "swift-log"),
            ],
            linkerSettings: [.unsafeFlags(["-Xlinker", "-Bstatic", "-Xlinker", "-lcrypto", "-Xlinker", "-Bdynamic"])]),
        // Thin CLI over the libraries.
        .executableTarget(
            name: "AirlockCLI",
            dependencies: [
                "Airlock", "VMM", "AirlockOS",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            // The Swift runtime linked in: the dynamic loader's symbol look-ups were a
            // third of the time from exec to the first KVM_RUN (docs/benchmarks.md).
            linkerSettings: [.unsafeFlags(["-static-stdlib", "-Xlinker", "--start-group", "-l_FoundationCollections", "-l_FoundationCShims", "-Xlinker", "--end-group"])]),
        // Exit-cost benchmark: the VMM's run loop against the C floor (make bench-exits).
        .executableTarget(name: "airlock-bench-exits", dependencies: ["VMM", "KVM", "VirtioDevices"]),
        // A seeded generator for the fuzzer and the randomized tests, so a failure replays from its seed.
        .target(name: "SeededRandom"),
        // Seeded random driver against the virtio transport, chain parser and block device (make fuzz-virtio).
        .executableTarget(name: "airlock-fuzz-virtio", dependencies: ["Virtio", "VirtioDevices", "GuestMemory", "AirlockOS", "SeededRandom"]),

        .testTarget(name: "GuestMemoryTests", dependencies: ["GuestMemory", "AirlockOS"]),
        .testTarget(name: "LinuxBootTests", dependencies: ["LinuxBoot", "GuestMemory", "AirlockOS", "SeededRandom"]),
        .testTarget(name: "VMMTests", dependencies: ["VMM", "KVM", "GuestMemory", "LinuxBoot", "Virtio", "VirtioDevices"]),
        .testTarget(name: "VirtioTests", dependencies: ["Virtio", "VirtioDevices", "GuestMemory"]),
        .testTarget(name: "AgentProtocolTests", dependencies: ["AgentProtocol", "SeededRandom"]),
        .testTarget(name: "AgentCoreTests", dependencies: ["AgentCore", "AgentProtocol"]),
        .testTarget(name: "RootFSTests", dependencies: ["RootFS", "SeededRandom"]),
        .testTarget(name: "JailerTests", dependencies: ["Jailer", "AirlockOS", "CJailShim", "airlock-jail-probe"]),
        .testTarget(name: "AirlockTests", dependencies: ["Airlock", "AgentProtocol", "VMM", "VirtioDevices"]),
        .testTarget(name: "SnapshotTests", dependencies: ["Snapshot", "VMM", "KVM", "GuestMemory", "Virtio", "VirtioDevices", "AirlockOS", "SeededRandom"]),
    ],
    swiftLanguageModes: [.v6]
)

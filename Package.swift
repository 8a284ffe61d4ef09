// swift-tools-version: 6.1
import PackageDescription

// Targets are small and have one job each; see docs/architecture.md for the map.
let package = Package(
    name: "Airlock",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "airlock", targets: ["AirlockCLI"]),
        .executable(name: "airlock-vmm", targets: ["airlock-vmm"]),
        .library(name: "Airlock", targets: ["Airlock"]),
        .library(name: "VMM", targets: ["VMM"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        // `airlock serve` only (the AirlockServe target): HTTP/1.1 on SwiftNIO, Prometheus text,
        // signal-driven graceful shutdown. Hummingbird without its default traits: FoundationEssentials
        // instead of all of Foundation, and no swift-configuration.
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1", traits: []),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.0"),
        .package(url: "https://github.com/apple/swift-nio-extras", from: "1.35.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
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
        // The supervisor-VMM session protocol: messages, their codec, and the framed socket
        // (with descriptor passing) they travel on. No Foundation.
        .target(name: "SessionProtocol", dependencies: ["AgentProtocol", "AirlockOS"]),
        // One VM and its agent, served over a session: the engine inside airlock-vmm, and in
        // the caller's process for the unjailed debug mode.
        .target(
            name: "SandboxEngine",
            dependencies: [
                "VMM", "KVM", "AirlockOS", "Virtio", "VirtioDevices", "AgentProtocol", "SessionProtocol", "Snapshot",
                .product(name: "Logging", package: "swift-log"),
            ]),
        // The jailed VMM process: enters its jail, then serves one session (thin).
        .executableTarget(
            name: "airlock-vmm",
            dependencies: [
                "SandboxEngine", "SessionProtocol", "Jailer", "AirlockOS",
                .product(name: "Logging", package: "swift-log"),
            ],
            linkerSettings: [.unsafeFlags(["-static-stdlib"])]),
        // The guest's PID 1: a thin static executable over AgentCore, installed into the rootfs.
        .executableTarget(
            name: "airlock-init", dependencies: ["AgentCore"],
            linkerSettings: [.unsafeFlags(["-static-executable"])]),
        // Read-only look-ups in an ext4 image (does the rootfs hold the agent?), without mounting it.
        .target(name: "RootFS", dependencies: ["AirlockOS"]),
        // Workspace disks in, artifacts out: a host directory made into an ext4 image (mke2fs -d),
        // and the files a guest left in it copied back as hostile input (RootFS reads the image).
        .target(
            name: "WorkspaceDisks", dependencies: ["RootFS", "COpenSSL"],
            linkerSettings: [.unsafeFlags(["-Xlinker", "-Bstatic", "-Xlinker", "-lcrypto", "-Xlinker", "-Bdynamic"])]),
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
        // Test-only: a VMM that enters its jail and then breaks the session protocol on purpose (AirlockTests).
        .executableTarget(name: "airlock-fake-vmm", dependencies: ["Jailer", "SessionProtocol", "AgentProtocol", "AirlockOS"]),
        // The public library: image store, host report, the async Sandbox API.
        .target(
            name: "Airlock",
            dependencies: [
                "VMM", "KVM", "AirlockOS", "VirtioDevices", "AgentProtocol", "RootFS", "Jailer",
                "SessionProtocol", "SandboxEngine", "Snapshot", "COpenSSL", "WorkspaceDisks",
                .product(name: "Logging", package: "swift-log"),
            ],
            linkerSettings: [.unsafeFlags(["-Xlinker", "-Bstatic", "-Xlinker", "-lcrypto", "-Xlinker", "-Bdynamic"])]),
        // `airlock serve`: runs commands from HTTP requests in fresh sandboxes, with a warm pool,
        // limits, metrics and a graceful drain (docs/serve.md). Only the public Sandbox API below it.
        .target(
            name: "AirlockServe",
            dependencies: [
                "Airlock",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTPTypes", package: "swift-nio-extras"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        // Thin CLI over the libraries.
        .executableTarget(
            name: "AirlockCLI",
            dependencies: [
                "Airlock", "AirlockServe", "VMM", "AirlockOS",
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

        // The workspace benchmark's Airlock side: image building and artifact extraction, timed (make bench).
        .executableTarget(name: "airlock-bench-workspace", dependencies: ["WorkspaceDisks"]),
        // Seeded hostile images against the artifact extractor and the tree reader under it (make fuzz-artifacts).
        .executableTarget(name: "airlock-fuzz-artifacts", dependencies: ["WorkspaceDisks", "RootFS", "SeededRandom"]),

        .testTarget(name: "GuestMemoryTests", dependencies: ["GuestMemory", "AirlockOS"]),
        .testTarget(name: "LinuxBootTests", dependencies: ["LinuxBoot", "GuestMemory", "AirlockOS", "SeededRandom"]),
        // What the VM test targets share: running a blocking test off the cooperative pool, /proc status.
        .target(name: "AirlockTestSupport", path: "Tests/AirlockTestSupport"),
        .testTarget(name: "VMMTests", dependencies: ["VMM", "KVM", "GuestMemory", "LinuxBoot", "Virtio", "VirtioDevices", "AirlockTestSupport"]),
        .testTarget(name: "VirtioTests", dependencies: ["Virtio", "VirtioDevices", "GuestMemory"]),
        .testTarget(name: "AgentProtocolTests", dependencies: ["AgentProtocol", "SeededRandom"]),
        .testTarget(name: "SessionProtocolTests", dependencies: ["SessionProtocol", "AgentProtocol", "AirlockOS", "SeededRandom"]),
        .testTarget(name: "AgentCoreTests", dependencies: ["AgentCore", "AgentProtocol"]),
        .testTarget(name: "RootFSTests", dependencies: ["RootFS", "SeededRandom"]),
        .testTarget(name: "WorkspaceDisksTests", dependencies: ["WorkspaceDisks", "RootFS", "SeededRandom"]),
        .testTarget(name: "JailerTests", dependencies: ["Jailer", "AirlockOS", "CJailShim", "airlock-jail-probe"]),
        .testTarget(name: "SandboxEngineTests", dependencies: ["SandboxEngine", "AgentProtocol", "AirlockOS", "SessionProtocol", "VMM"]),
        .testTarget(name: "AirlockTests", dependencies: ["Airlock", "AgentProtocol", "SessionProtocol", "SandboxEngine", "VMM", "VirtioDevices", "RootFS", "Snapshot", "AirlockTestSupport"]),
        .testTarget(name: "AirlockServeTests", dependencies: ["AirlockServe", "Airlock", "AirlockTestSupport"]),
        .testTarget(name: "SnapshotTests", dependencies: ["Snapshot", "VMM", "KVM", "GuestMemory", "Virtio", "VirtioDevices", "AirlockOS", "SeededRandom"]),
    ],
    swiftLanguageModes: [.v6]
)

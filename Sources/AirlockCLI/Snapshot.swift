import Airlock
import AirlockOS
import ArgumentParser
import FoundationEssentials
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// `airlock snapshot create | list | rm`: the snapshots `airlock run` restores from.
struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Make, list and remove the saved VMs that 'airlock run' starts from instead of booting.",
        discussion: """
            A snapshot is a VM that booted to Airlock's agent and was saved before running anything: \\
            its guest memory (only the pages the guest touched), every vCPU's and device's state, and a \\
            manifest of what it was made from (the SHA-256 of the kernel, root filesystem and command \\
            line, guest memory size, the host's KVM backend, guest mode and CPU features). They live in \\
            $AIRLOCK_HOME/snapshots, one per set of inputs; 'airlock run' uses the one for its inputs and \\
            makes it on its first run. A snapshot made from other inputs or on another kind of host is \\
            never used. See docs/snapshots.md.
            """,
        subcommands: [Create.self, List.self, Remove.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Boot a VM to its agent and save it for 'airlock run' (replacing the snapshot for the same inputs).",
            discussion: "Give the same --memory, --kernel, --rootfs and --cmdline as the runs that should use it. Prints the snapshot's path.")

        @Option(help: "Guest memory: MiB, or a size with an M or G suffix (256, 512M, 1G).")
        var memory: String = "256"

        @Option(help: "The guest kernel. Default: the installed image (make images).")
        var kernel: String?

        @Option(help: "The root filesystem (ext4 with Airlock's agent). Default: the installed image.")
        var rootfs: String?

        @Option(help: "Extra kernel command-line parameters (as 'airlock run --cmdline').")
        var cmdline: String = ""

        @Option(help: "Seconds the guest may take to boot to its agent.")
        var bootTimeout: Double = 300

        @Flag(help: "UNSAFE, for debugging: boot the VMM in this process, without the jail.")
        var noJail = false

        @Flag(help: "Print the snapshot's path, size and timings as JSON.")
        var json = false

        @OptionGroup var logging: LoggingOptions

        func validate() throws {
            _ = try cli(SizeArgument.mebibytes(memory, option: "--memory"))
            guard bootTimeout > 0 else { throw ValidationError("--boot-timeout \(bootTimeout) is not a positive number of seconds") }
        }

        func run() throws {
            let requestedAt = monotonicNanoseconds()
            try logging.bootstrap()
            var config = SandboxConfig(kernelPath: kernel, rootfsPath: rootfs,
                                       memoryMiB: try cli(SizeArgument.mebibytes(memory, option: "--memory")))
            config.bootTimeoutSeconds = bootTimeout
            config.extraKernelCommandLine = cmdline
            config.vmmLogLevel = logging.level
            if noJail {
                config.isolation = .unjailed
            } else if getuid() != 0 {
                throw ValidationError("the jail around the VMM needs root: run as root, or pass --no-jail to debug without it (unsafe)")
            }
            do {
                let logger = Logger(label: "airlock.snapshot")
                let saved = try Sandbox.createSnapshotBlocking(config: config, requestedAt: requestedAt, logger: logger)
                if json {
                    let encoder = JSONEncoder()
                    encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
                    print(String(decoding: (try? encoder.encode(saved)) ?? Data(), as: UTF8.self))
                    return
                }
                print(saved.path)
                printError("airlock: saved a \(config.memoryMiB) MiB guest in \(formatBytes(saved.allocatedBytes)) (\(Int(saved.saveMs.rounded())) ms to write and check)")
            } catch {
                printError("airlock: \(error)")
                throw ExitCode(ExitStatus.airlockFailed)
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the saved snapshots, with what each was made from.")

        @Flag(help: "Print JSON: one object per snapshot.")
        var json = false

        func run() throws {
            let store = SnapshotStore()
            let entries = store.entries()
            if json {
                print(SnapshotListing(entries).jsonDocument())
                return
            }
            guard !entries.isEmpty else {
                print("no snapshots in \(store.directory) ('airlock run' makes one on its first run, or 'airlock snapshot create')")
                return
            }
            for e in entries {
                guard let m = e.manifest else {
                    print("\(e.key)  UNUSABLE  \(formatBytes(e.allocatedBytes))  \(e.problem ?? "")")
                    continue
                }
                print("\(e.key)  \(m.memoryBytes >> 20) MiB guest  \(formatBytes(e.allocatedBytes)) on disk  \(m.guestMode)  made \(formatDate(m.createdAt))  kernel \(m.kernelSHA256.prefix(12))  rootfs \(m.rootfsSHA256.prefix(12))")
            }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm", abstract: "Remove snapshots by key (or a unique prefix of one), or all of them.")

        @Flag(help: "Remove every snapshot.")
        var all = false

        @Argument(help: "Keys as 'airlock snapshot list' shows them.")
        var keys: [String] = []

        func validate() throws {
            if all == !keys.isEmpty { throw ValidationError("give the keys of the snapshots to remove, or --all") }
        }

        func run() throws {
            let store = SnapshotStore()
            let targets = all ? store.entries().map(\.key) : keys
            var failed = false
            for key in targets {
                do { print("removed \(try store.remove(key))") } catch {
                    printError("airlock: \(error)")
                    failed = true
                }
            }
            if failed { throw ExitCode(ExitStatus.airlockFailed) }
        }
    }
}

/// `airlock snapshot list --json`.
struct SnapshotListing: Encodable {
    struct Item: Encodable {
        let key: String, path: String, allocatedBytes: UInt64, problem: String?
        let memoryBytes: UInt64?, guestMode: String?, hostBackend: String?, createdAt: UInt64?
        let kernelSHA256: String?, rootfsSHA256: String?, commandLine: String?, dataPages: Int?
    }
    let snapshots: [Item]

    init(_ entries: [SnapshotStore.Entry]) {
        snapshots = entries.map { e in
            let m = e.manifest
            return Item(key: e.key, path: e.path, allocatedBytes: e.allocatedBytes, problem: e.problem, memoryBytes: m?.memoryBytes,
                        guestMode: m?.guestMode, hostBackend: m?.hostBackend, createdAt: m?.createdAt, kernelSHA256: m?.kernelSHA256,
                        rootfsSHA256: m?.rootfsSHA256, commandLine: m?.commandLine, dataPages: m?.dataPages)
        }
    }

    func jsonDocument() -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        return String(decoding: (try? encoder.encode(self)) ?? Data(), as: UTF8.self)
    }
}

func formatBytes(_ n: UInt64) -> String {
    guard n >= 1 << 20 else { return "\(n >> 10) KiB" }
    let tenths = n * 10 / (1 << 20)
    return "\(tenths / 10).\(tenths % 10) MiB"
}

func formatDate(_ seconds: UInt64) -> String {
    var t = time_t(seconds)
    var parts = tm()
    gmtime_r(&t, &parts)
    var buffer = [CChar](repeating: 0, count: 32)
    strftime(&buffer, buffer.count, "%Y-%m-%d %H:%M UTC", &parts)
    return String(cString: buffer)
}

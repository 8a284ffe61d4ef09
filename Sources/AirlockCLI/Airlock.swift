import Airlock
import AirlockOS
import ArgumentParser
import FoundationEssentials
import Logging
import VMM
#if canImport(Glibc)
import Glibc
#endif

@main
struct AirlockCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "airlock",
        abstract: "Run untrusted code in disposable KVM micro-VMs.",
        subcommands: [Run.self, Serve.self, SnapshotCommand.self, Boot.self, Doctor.self])

    /// ArgumentParser's main, except that bad usage exits 125 (as with `docker run`):
    /// 64 could be the command's own status, and scripts test for 125 as "Airlock failed".
    static func main() {
        // A reader that goes away (airlock run ... | head) must cost its bytes, not this process.
        signal(SIGPIPE, SIG_IGN)
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            let code = exitCode(for: error)
            if code == .validationFailure {
                printError(fullMessage(for: error))
                Glibc.exit(ExitStatus.airlockFailed)
            }
            exit(withError: error)
        }
    }
}

/// Exit statuses shared by the subcommands: the run's own (`SandboxExitCode`, one place for
/// them), and `airlock boot`'s crash.
enum ExitStatus {
    static let crash: Int32 = 2
    static let timeout = SandboxExitCode.timeout
    static let airlockFailed = SandboxExitCode.airlockFailed
}

struct LoggingOptions: ParsableArguments {
    @Option(name: .long, help: "Log level: trace, debug, info, notice, warning, error, critical (default: warning, or $AIRLOCK_LOG).")
    var logLevel: String?

    /// The level asked for (default warning).
    var level: Logger.Level {
        Logger.Level(rawValue: logLevel ?? ImageStore.processEnvironment()["AIRLOCK_LOG"] ?? "warning") ?? .warning
    }

    func bootstrap() throws {
        let name = logLevel ?? ImageStore.processEnvironment()["AIRLOCK_LOG"] ?? "warning"
        guard let level = Logger.Level(rawValue: name) else {
            throw ValidationError("--log-level '\(name)' is not a level: use trace, debug, info, notice, warning, error or critical")
        }
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
    }
}

struct Boot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Boot a Linux kernel and stream its serial console to stdout.",
        discussion: """
            Exits 0 when the guest shuts down or reboots, printing the system event that ended it \
            on stderr; 2 when it crashed; 124 on --timeout; 125 when Airlock itself failed.
            With no --kernel, --initrd or --rootfs, boots the installed kernel with the installed \
            root filesystem on /dev/vda (see 'airlock doctor').
            """)

    @Option(help: "The guest kernel: an x86-64 vmlinux (ELF) or bzImage. Default: the installed image.")
    var kernel: String?

    @Option(help: "An initrd / initramfs to load for the kernel.")
    var initrd: String?

    @Option(help: "A root filesystem image (ext4) attached read-only as /dev/vda and mounted as / (root=/dev/vda). Default: the installed rootfs.ext4, unless --kernel or --initrd is given.")
    var rootfs: String?

    @Option(name: .customLong("disk"), help: "An extra disk image, attached read-write as the next /dev/vdX (repeatable).")
    var disks: [String] = []

    @Option(help: "Extra kernel command-line parameters, appended to Airlock's defaults (\(Machine.baseCommandLine)) and the guest mode's. On a PVM host, airlock.pv=off forces the emulated path (airlock doctor shows the mode).")
    var cmdline: String = ""

    @Option(help: "Guest memory in MiB.")
    var memory: Int = 256

    @Option(help: "Stop the guest after this many seconds (exit status 124).")
    var timeout: Double?

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        guard memory >= 32 else { throw ValidationError("--memory \(memory) is too small: give at least 32 (MiB)") }
        guard memory <= 1 << 20 else { throw ValidationError("--memory \(memory) MiB is more than 1 TiB: give the size in MiB") }
        if let timeout, !(timeout > 0) { throw ValidationError("--timeout must be a positive number of seconds") }
    }

    func run() throws {
        try logging.bootstrap()
        let store = ImageStore()
        let kernelPath = kernel ?? store.kernelPath
        var rootfsPath = rootfs
        if kernel == nil && initrd == nil && rootfs == nil { rootfsPath = store.rootfsPath }
        var extra = cmdline
        if rootfsPath != nil { extra = Machine.rootFilesystemCommandLine() + " " + extra }

        var config = MachineConfig()
        config.memoryBytes = UInt64(memory) << 20
        config.logger = Logger(label: "airlock.vmm")
        do {
            let machine = try Machine(config)
            if let rootfsPath { try machine.addBlockDevice(path: rootfsPath, readOnly: true) }
            for d in disks { try machine.addBlockDevice(path: d, readOnly: false) }
            try machine.loadLinux(kernelPath: kernelPath, initrdPath: initrd, extraCommandLine: extra)
            let exit = try machine.run(timeout: timeout)
            if let event = exit.event {
                printError("airlock: guest ended: \(event)")
                throw ExitCode(event.kind == .crash ? ExitStatus.crash : 0)
            }
            printError("airlock: guest stopped after the \(timeout.map { "\($0)" } ?? "") s timeout")
            throw ExitCode(ExitStatus.timeout)
        } catch let error as VMMError {
            printError("airlock: \(error)")
            throw ExitCode(ExitStatus.airlockFailed)
        }
    }
}

struct Doctor: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check what this host offers Airlock: KVM, its capabilities and backend, installed images.")

    func run() throws {
        let report = HostReport.gather()
        print(report.text)
        if !report.allOK { throw ExitCode(1) }
    }
}

func printError(_ message: String) {
    writeToStandardError(message + "\n")
}

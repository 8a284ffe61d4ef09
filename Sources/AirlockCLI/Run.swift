import Airlock
import AirlockOS
import ArgumentParser
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Logging
import Synchronization

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a command in a fresh micro-VM and return its output and exit status.",
        discussion: """
            Boots a disposable VM from the guest kernel and root filesystem, runs CMD with ARGS in it \
            through Airlock's agent, streams the command's stdout and stderr to this process's stdout \
            and stderr as they are produced, and exits with the command's exit status. Stdin is passed \
            through when it is not a terminal.

            Exit status: the command's own; 128+N when signal N killed it; 124 when it ran past \
            --timeout (the VM is destroyed); 127 when the command is not found in the guest; 126 when \
            it is not executable; 125 when Airlock itself failed or the run could not be set up \
            (a message on stderr says what failed and what to do).

            --timeout counts from the moment the command starts in the guest, so it means the same \
            on a fast host and on one where the guest kernel boots slowly; --boot-timeout bounds the boot.

            The VMM runs in a jail (its own namespaces, a pivot_root directory, a cgroup, no \
            capabilities, seccomp; see docs/security.md), which needs root; --no-jail is for debugging only.

            Build steps (docs/build-steps.md): --workspace DIR copies DIR into the guest at /workspace \
            (the command's working directory), --output OUT brings back what the command left in \
            /workspace/out, checked as hostile input; a refused artifact exits 125 and keeps nothing. \
            --image build boots the toolchain image (make rootfs-build). Example: \
            airlock run --image build --workspace ./hello --output ./built -- sh -c 'make && mkdir -p out && cp hello out/'

            Snapshots: the first run with a given kernel, root filesystem, memory size and command line \
            boots the VM, saves it once the agent is ready (before the command runs) in Airlock's data \
            directory, and later runs restore it instead of booting; each restored guest gets the host's \
            time and fresh randomness before the command starts (see 'airlock snapshot --help' and \
            docs/snapshots.md). --no-snapshot boots cold and saves nothing; a run with --workspace or --disk \
            always boots cold (a snapshot holds no disks).
            """)

    @Option(help: "The guest kernel (vmlinux or bzImage). Default: the installed image (make images).")
    var kernel: String?

    @Option(help: "The root filesystem (ext4 holding Airlock's agent at /sbin/airlock-init), attached read-only. Default: the installed image.")
    var rootfs: String?

    // Numbers are parsed `.unconditional`: "--memory -5" must reach the validation below
    // (which says what is wrong), not read as an unknown option "-5".
    @Option(parsing: .unconditional, help: "Guest memory: MiB, or a size with an M or G suffix (256, 512M, 1G).")
    var memory: String = "256"

    @Option(parsing: .unconditional, help: "Virtual CPUs (1 until SMP support lands).")
    var cpus: Int = 1

    @Option(name: .customLong("env"), help: "Set NAME=VALUE in the command's environment, or NAME to copy this process's value (repeatable).")
    var environment: [String] = []

    @Option(help: "The command's working directory in the guest (default: the workspace, else /).")
    var workdir: String?

    @Option(help: "Run as NAME, UID, NAME:GROUP or UID:GID (from the guest's /etc/passwd and /etc/group, checked before the boot). Default: root.")
    var user: String?

    @Option(parsing: .unconditional, help: "Destroy the VM when the command has run this many seconds (exit status 124).")
    var timeout: Double?

    @Option(parsing: .unconditional, help: "Seconds the guest may take to boot to its agent.")
    var bootTimeout: Double = 300

    @Option(parsing: .unconditional, help: "Keep at most this many bytes of each of stdout and stderr (K, M, G suffixes allowed); the rest is dropped, and a notice on stderr says which stream and how much. Default: unlimited when streaming, 64M with --json.")
    var maxOutput: String?

    @Flag(help: "Print one JSON document (output, with its exact bytes in base64 where they are not UTF-8; exit code, signal, timeout, truncation, system event, timings, the snapshot restored or saved) instead of streaming.")
    var json = false

    @Flag(help: "Copy the guest kernel's console to stderr (for debugging a guest that does not boot).")
    var console = false

    @Flag(help: "UNSAFE, for debugging: run the VMM in this process, without the jail (seccomp, namespaces, cgroup, dropped privileges).")
    var noJail = false

    @Flag(help: "Boot the VM cold: neither restore a saved snapshot nor save one.")
    var noSnapshot = false

    @Option(help: "Extra kernel command-line parameters.")
    var cmdline: String = ""

    #if DEBUG
    // Tests only (debug builds): a forbidden system call the jailed VMM makes once its filters are on.
    @Option(help: .hidden)
    var testViolation: String?
    #endif

    @OptionGroup(title: "Build steps") var buildStep: BuildStepOptions

    @OptionGroup var logging: LoggingOptions

    @Argument(parsing: .remaining, help: "The command and its arguments, after --.")
    var command: [String] = []

    /// The command with the `--` separator removed.
    var argv: [String] { command.first == "--" ? Array(command.dropFirst()) : command }

    func validate() throws {
        // Without `--`, the first word ArgumentParser did not know starts the command: an
        // option there is a typo, not a program name.
        if let first = command.first, first != "--", first.hasPrefix("-") {
            throw ValidationError("unknown option '\(first)': see airlock run --help (the command goes after --)")
        }
        guard !argv.isEmpty, !argv[0].isEmpty else {
            throw ValidationError("no command given: use airlock run [options] -- CMD [ARGS...]")
        }
        _ = try cli(SizeArgument.mebibytes(memory, option: "--memory"))
        if let maxOutput { _ = try cli(SizeArgument.bytes(maxOutput, option: "--max-output")) }
        if let timeout, !(timeout.isFinite && timeout > 0) {
            throw ValidationError("--timeout \(timeout) is not a positive, finite number of seconds")
        }
        guard bootTimeout.isFinite, bootTimeout > 0 else {
            throw ValidationError("--boot-timeout \(bootTimeout) is not a positive, finite number of seconds")
        }
        _ = try parsedEnvironment(ProcessInfo.processInfo.environment)
        if let user, user.isEmpty { throw ValidationError("--user '' is empty: leave --user out to run as root, or give NAME, UID or NAME:GROUP") }
    }

    func parsedEnvironment(_ host: [String: String]) throws -> [(name: String, value: String)] {
        try environment.map { entry in
            if let eq = entry.firstIndex(of: "=") {
                let name = String(entry[..<eq])
                guard !name.isEmpty else { throw ValidationError("--env '\(entry)' has no name: use --env NAME=VALUE") }
                return (name, String(entry[entry.index(after: eq)...]))
            }
            guard !entry.isEmpty else { throw ValidationError("--env needs NAME=VALUE or NAME") }
            guard let value = host[entry] else {
                throw ValidationError("--env \(entry): \(entry) is not set here, so there is nothing to copy; use --env \(entry)=VALUE")
            }
            return (entry, value)
        }
    }

    func run() throws {
        let requestedAt = monotonicNanoseconds()
        try logging.bootstrap()
        var config = SandboxConfig(kernelPath: kernel, rootfsPath: rootfs,
                                   memoryMiB: try cli(SizeArgument.mebibytes(memory, option: "--memory")), cpus: cpus)
        config.bootTimeoutSeconds = bootTimeout
        config.extraKernelCommandLine = cmdline
        config.vmmLogLevel = logging.level
        if console { config.consoleFD = 2 }
        config.snapshots = noSnapshot ? .none : .automatic
        #if DEBUG
        config.testViolation = testViolation
        #endif
        if noJail {
            config.isolation = .unjailed
        } else if getuid() != 0 {
            throw ValidationError("the jail around the VMM needs root (namespaces, cgroups, pivot_root): run as root, or pass --no-jail to debug without it (unsafe)")
        }

        var cmd = Command(argv)
        cmd.environment = try parsedEnvironment(ProcessInfo.processInfo.environment)
        cmd.workingDirectory = workdir ?? "/"
        cmd.user = user ?? ""
        cmd.timeoutSeconds = timeout
        cmd.maxOutputBytes = try maxOutput.map { try cli(SizeArgument.bytes($0, option: "--max-output")) }
        cmd.stdin = isatty(0) == 1 ? .none : .fileDescriptor(0)
        if !json {
            cmd.stdout = .fileDescriptor(1)
            cmd.stderr = .fileDescriptor(2)
        }
        try buildStep.apply(to: &cmd, config: &config)

        let result: RunResult
        let stop = StopHandle()
        let signals = SignalWatcher.start(stop)
        do {
            if noJail {
                printError("airlock: --no-jail: the VMM runs unconfined in this process (no seccomp, namespaces, cgroup or dropped privileges); use it only to debug")
            }
            result = try Sandbox.runBlocking(cmd, config: config, requestedAt: requestedAt, logger: Logger(label: "airlock.run"), stop: stop)
        } catch {
            signals.stop()
            if let signal = signals.received {
                printError("airlock: interrupted by signal \(signal); the VM was stopped")
                throw ExitCode(128 + signal)
            }
            printError("airlock: \(error)")
            throw ExitCode(SandboxExitCode.airlockFailed)
        }
        signals.stop()
        if let signal = signals.received {
            printError("airlock: interrupted by signal \(signal); the VM was stopped")
            throw ExitCode(128 + signal)
        }
        if json {
            print(result.jsonDocument())
        } else {
            var notices: [String] = []
            if let failure = result.failure { notices.append("airlock: \(failure)") }
            if result.timedOut {
                notices.append("airlock: the command ran past --timeout \(timeout.map { "\($0)" } ?? "") s; the VM was destroyed")
            }
            if let maxOutput {
                for (stream, dropped) in [("stdout", result.stdoutDroppedBytes), ("stderr", result.stderrDroppedBytes)] where dropped > 0 {
                    notices.append("airlock: \(stream) was cut at --max-output \(maxOutput): \(dropped) more bytes were dropped")
                }
            }
            notices += buildStep.artifactNotices(result)
            // A notice goes on a line of its own, even after output that did not end one.
            if !notices.isEmpty && result.stderrEndsMidLine { writeToStandardError("\n") }
            for n in notices { printError(n) }
        }
        // Artifacts that were refused (or never collected) fail the step, whatever the command said.
        if result.artifactsError != nil && !result.timedOut { throw ExitCode(SandboxExitCode.airlockFailed) }
        throw ExitCode(result.exitCode)
    }
}

/// Turns SIGINT, SIGTERM and SIGHUP into a clean stop of the sandbox (its VM and jail go),
/// for the CLI only: the library installs no process-wide handlers.
final class SignalWatcher: @unchecked Sendable {
    // @unchecked: `previous` is set before the thread starts and read after `stop`.
    private let got = Atomic<Int32>(0)
    private var previous = sigset_t()

    var received: Int32? {
        let s = got.load(ordering: .relaxed)
        return s == 0 ? nil : s
    }

    static func start(_ stop: StopHandle) -> SignalWatcher {
        let w = SignalWatcher()
        var set = sigset_t()
        sigemptyset(&set)
        for s in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, s) }
        pthread_sigmask(SIG_BLOCK, &set, &w.previous)
        let waitOn = set
        try? startDetachedThread {
            var signal: Int32 = 0
            var waitSet = waitOn
            while sigwait(&waitSet, &signal) == 0 {
                w.got.store(signal, ordering: .relaxed)
                stop.stop()
            }
        }
        return w
    }

    /// The signals go back to what they were (a late one, still blocked for the waiter, ends the process).
    func stop() {
        pthread_sigmask(SIG_SETMASK, &previous, nil)
    }
}

/// A library validation error as ArgumentParser's, so it prints with the usage hint.
func cli<T>(_ body: @autoclosure () throws(SandboxError) -> T) throws -> T {
    do { return try body() } catch { throw ValidationError(error.description) }
}

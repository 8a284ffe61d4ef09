import AirlockOS
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Jailer
import Logging
import Snapshot
import Synchronization
import VMM

/// `airlock run` inside the jail: the supervisor (the caller's process, root,
/// unjailed) prepares a jail and a cgroup, starts the `airlock` executable
/// again as the VMM (`airlock __vmm`), hands it the run over a pipe, and gets
/// the result back over another. The VMM enters the jail before it reads
/// anything from the guest (docs/security.md).
///
/// Descriptors of the VMM process: 0 the command's stdin (or /dev/null), 1 and
/// 2 the caller's stdout and stderr (streamed output and Airlock's messages),
/// 3 the request (JSON, read to EOF), 4 the result (JSON, written once), and,
/// when the run saves a snapshot, 5 the new snapshot file (docs/snapshots.md).
public enum JailedRun {
    /// The hidden subcommand that runs the VMM side.
    public static let subcommand = "__vmm"
    static let requestFD: Int32 = 3
    static let resultFD: Int32 = 4
    static let snapshotFD: Int32 = 5
    /// Where a snapshot to restore is bind-mounted in the jail (read-only).
    static let snapshotJailPath = "/snapshot.snap"
    /// Guest RAM plus this for the VMM process itself (measured peaks: 23-33 MB).
    static let vmmMemoryAllowance: UInt64 = 128 << 20
    /// CPUs beyond one per vCPU for the VMM's own threads (output, stdin, the controller).
    static let vmmCPUAllowance = 0.5

    /// What crosses from the supervisor to the VMM.
    struct Request: Codable {
        var config: SandboxConfig
        var arguments: [String]
        var environment: [[String]]
        var workingDirectory: String
        var user: String
        var timeoutSeconds: Double?
        var maxOutputBytes: Int?
        var stdinFromFD0: Bool
        var streamOutput: Bool
        var requestedAt: UInt64
        var logLevel: String
        /// Tests only: a forbidden system call the VMM makes once its filters are on ("main:execve", "vcpu:ioctl").
        var testViolation: String?
        /// What the VMM does with a snapshot, decided by the supervisor (nil: none).
        var snapshot: SnapshotOrder?
    }

    /// The supervisor's snapshot decision for the jailed VMM.
    struct SnapshotOrder: Codable {
        /// Restore from the snapshot at `snapshotJailPath` instead of booting.
        var restore: Bool
        /// Boot, and save the idle VM into fd `snapshotFD` (with these image digests) before the command.
        var kernelSHA256: String
        var rootfsSHA256: String
        /// Save the snapshot and shut down, with no command (`airlock snapshot create`).
        var saveOnly: Bool
    }

    /// What crosses back: a result, or the error that stopped the sandbox.
    struct Reply: Codable {
        var result: RunResult?
        var error: String?
        /// What a save wrote into fd 5, when it did.
        var saved: SnapshotWriteReport?
    }

    /// Runs `command` in a jailed VMM process and waits for it. `streamOutput`
    /// sends the command's output straight to this process's stdout and
    /// stderr; otherwise it is captured into the result. `stdinFromFD0` passes
    /// this process's stdin through.
    public static func run(_ command: Command, config: SandboxConfig, stdinFromFD0: Bool, streamOutput: Bool,
                           vmmExecutable: String = "/proc/self/exe", requestedAt: UInt64,
                           logLevel: Logger.Level = .warning, testViolation: String? = nil,
                           logger: Logger) throws(SandboxError) -> RunResult {
        try Sandbox.validate(command)
        return try runJailed(command, config: config, stdinFromFD0: stdinFromFD0, streamOutput: streamOutput,
                             vmmExecutable: vmmExecutable, requestedAt: requestedAt, logLevel: logLevel,
                             testViolation: testViolation, logger: logger)
    }

    /// `airlock snapshot create`: boots a jailed VM, saves it into the store
    /// (replacing the snapshot for the same inputs) and shuts it down.
    public static func createSnapshot(config: SandboxConfig, vmmExecutable: String = "/proc/self/exe", requestedAt: UInt64,
                                      logLevel: Logger.Level = .warning, logger: Logger) throws(SandboxError) -> SnapshotUse {
        var c = config
        c.snapshots = .automatic
        let result = try runJailed(nil, config: c, stdinFromFD0: false, streamOutput: false, vmmExecutable: vmmExecutable,
                                   requestedAt: requestedAt, logLevel: logLevel, testViolation: nil, logger: logger)
        guard let saved = result.snapshot, !saved.restored else {
            throw .vmm(result.failure ?? "the VM booted but no snapshot was saved (the warning above says why)")
        }
        return saved
    }

    /// One jailed VMM: the command's run, or with no command, a snapshot save.
    static func runJailed(_ command: Command?, config: SandboxConfig, stdinFromFD0: Bool, streamOutput: Bool,
                          vmmExecutable: String, requestedAt: UInt64, logLevel: Logger.Level, testViolation: String?,
                          logger: Logger) throws(SandboxError) -> RunResult {
        // Everything that can be checked is checked here, before a jail exists.
        let images = try ImageResolution.resolve(config)
        var inner = config
        inner.kernelPath = "/vmlinux"
        inner.rootfsPath = "/rootfs.ext4"
        inner.hostProfile = config.hostProfile ?? .detect()  // /sys is not in the jail
        inner.snapshots = .none  // the store is not in the jail: the order below says what to do
        // The snapshot is chosen (and checked whole) here, before any VM; a snapshot-only run always saves anew.
        let planned = monotonicNanoseconds()
        var plan = try SnapshotPlan.make(config, kernelPath: images.kernel, rootfsPath: images.rootfs, hostProfile: inner.hostProfile!, logger: logger)
        let checkMs = Double(monotonicNanoseconds() - planned) / 1e6
        if command == nil, let p = plan { plan = SnapshotPlan(action: .bootAndSave, inputs: p.inputs, requirements: p.requirements, store: p.store) }
        var snapshotFile: (path: String, fd: OwnedFileDescriptor)?
        var files = [JailFile(hostPath: images.kernel, jailPath: "/vmlinux"), JailFile(hostPath: images.rootfs, jailPath: "/rootfs.ext4")]
        var order: SnapshotOrder?
        if let plan {
            switch plan.action {
            case let .restore(path):
                files.append(JailFile(hostPath: path, jailPath: snapshotJailPath, preopen: true))
                order = SnapshotOrder(restore: true, kernelSHA256: plan.inputs.kernelSHA256, rootfsSHA256: plan.inputs.rootfsSHA256, saveOnly: false)
            case .bootAndSave:
                snapshotFile = try plan.store.temporaryFile(forKey: plan.inputs.key)
                order = SnapshotOrder(restore: false, kernelSHA256: plan.inputs.kernelSHA256, rootfsSHA256: plan.inputs.rootfsSHA256,
                                      saveOnly: command == nil)
            }
        }
        defer { if let snapshotFile { unlink(snapshotFile.path) } }
        let command = command ?? Command(["true"])
        let request = Request(
            config: inner, arguments: command.arguments, environment: command.environment.map { [$0.name, $0.value] },
            workingDirectory: command.workingDirectory, user: command.user, timeoutSeconds: command.timeoutSeconds,
            maxOutputBytes: command.maxOutputBytes, stdinFromFD0: stdinFromFD0, streamOutput: streamOutput,
            requestedAt: requestedAt, logLevel: logLevel.rawValue, testViolation: testViolation, snapshot: order)

        let supervisor: JailSupervisor
        do {
            supervisor = try JailSupervisor()
            let swept = try supervisor.sweep()
            if !swept.isEmpty { logger.notice("removed \(swept.count) jails left by earlier runs: \(swept)") }
        } catch {
            throw .jail("\(error)")
        }
        let id = "run-\(getpid())-\(monotonicNanoseconds() % 1_000_000_000)"
        let jail: PreparedJail
        do {
            jail = try supervisor.prepare(id: id, JailRequest(
                files: files,
                devices: [.kvm],
                limits: CgroupLimits(memoryBytes: (UInt64(config.memoryMiB) << 20) + vmmMemoryAllowance
                                                    // captured output lives in the VMM until the end: room for both streams
                                                    + (streamOutput ? 0 : 2 * UInt64(Command.capturedBytesLimit(command.maxOutputBytes))), tasks: 64,
                                     cpus: Double(config.cpus) + vmmCPUAllowance)))
        } catch {
            throw .jail("\(error)")
        }
        defer {
            do { try jail.destroy() } catch { logger.error("cleaning up jail \(id): \(error)") }
            supervisor.removeEmptyCgroupParents()
        }

        // Raw descriptors, closed by hand: each end must be closed at a precise moment (the
        // child's ends right after the spawn, so that EOF means the child is done).
        var requestPipe: [Int32] = [-1, -1], resultPipe: [Int32] = [-1, -1]
        guard pipe(&requestPipe) == 0 else { throw .vmm("cannot create a pipe to the VMM process: \(String(cString: strerror(errno)))") }
        guard pipe(&resultPipe) == 0 else {
            requestPipe.forEach { close($0) }
            throw .vmm("cannot create a pipe to the VMM process: \(String(cString: strerror(errno)))")
        }
        // close-on-exec on our ends too: the spawn hands the child exactly the fds it lists.
        for fd in requestPipe + resultPipe { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        let devNull = open("/dev/null", O_RDONLY | O_CLOEXEC)
        let child: JailedChild
        do {
            var fds: [Int32: Int32] = [0: stdinFromFD0 ? 0 : devNull, 1: 1, 2: 2, requestFD: requestPipe[0], resultFD: resultPipe[1]]
            if let snapshotFile { fds[snapshotFD] = snapshotFile.fd.rawValue }
            child = try jail.spawn(executable: vmmExecutable, arguments: [subcommand], fds: fds)
        } catch {
            (requestPipe + resultPipe + [devNull]).forEach { close($0) }
            throw .jail("\(error)")
        }
        [requestPipe[0], resultPipe[1], devNull].forEach { close($0) }

        SignalForwarder.start(child)
        defer { SignalForwarder.stop() }
        let encoded = (try? JSONEncoder().encode(request)) ?? Data()
        // A VMM that died early makes this fail with EPIPE (the CLI ignores SIGPIPE), not hang.
        try? encoded.withUnsafeBytes { try AirlockOS.writeAll(fd: requestPipe[1], $0) }
        close(requestPipe[1])
        let received = ResultWire.read(fd: resultPipe[0], outputLimit: Command.captureLimit)
        close(resultPipe[0])
        let exit: JailExit
        do { exit = try child.wait(timeout: nil) ?? .signaled(SIGKILL) } catch { throw .jail("\(error)") }

        let signal = SignalForwarder.received.load(ordering: .relaxed)
        if signal != 0 {
            var r = RunResult()
            r.exitCode = 128 + signal
            r.failure = "interrupted by signal \(signal); the VM was stopped"
            return r
        }
        if exit.isSeccompViolation {
            throw .sandboxViolation("the VMM broke its seccomp sandbox (the line above names the system call) and was stopped: this is a bug in Airlock, please report it")
        }
        if exit == .exited(JailExitCode.setupFailed) {
            throw .jail("the VMM could not enter its jail (the line above says why)")
        }
        guard let received, let reply = try? JSONDecoder().decode(Reply.self, from: Data(received.json)) else {
            throw .vmm("the VMM process ended (\(exit)) without a result")
        }
        if let error = reply.error { throw .vmm(error) }
        guard var result = reply.result else { throw .vmm("the VMM process ended (\(exit)) without a result") }
        result.stdout = received.stdout
        result.stderr = received.stderr
        // The VMM wrote a snapshot: checked whole here (a jailed process wrote it) before it goes into the store.
        if let plan, let snapshotFile, plan.action == .bootAndSave {
            result.snapshot = plan.installWritten(snapshotFile.path, report: reply.saved, logger: logger)
        }
        if let plan, case let .restore(path) = plan.action {
            result.snapshot?.path = path  // not the jail's name for it
            result.snapshot?.checkMs = checkMs
        }
        return result
    }

    /// The VMM side: `airlock __vmm`, started by `run` above. Returns the process's exit status.
    public static func vmmMain() -> Int32 {
        signal(SIGPIPE, SIG_IGN)
        // Jail.enter wants a single-threaded process and /sys for nothing; the host profile
        // came in the request, read after the jail is up.
        let jailed: JailedProcess
        do { jailed = try Jail.enter() } catch {
            writeToStandardError("airlock: the VMM cannot enter its jail: \(error)\n")
            return JailExitCode.setupFailed
        }
        let reply: Reply
        do {
            let request = try JSONDecoder().decode(Request.self, from: readToEnd(requestFD))
            close(requestFD)
            let level = Logger.Level(rawValue: request.logLevel) ?? .warning
            LoggingSystem.bootstrap { label in
                var h = StreamLogHandler.standardError(label: label)
                h.logLevel = level
                return h
            }
            var command = Command(request.arguments)
            command.environment = request.environment.compactMap { $0.count == 2 ? ($0[0], $0[1]) : nil }
            command.workingDirectory = request.workingDirectory
            command.user = request.user
            command.timeoutSeconds = request.timeoutSeconds
            command.maxOutputBytes = request.maxOutputBytes
            command.stdin = request.stdinFromFD0 ? .fileDescriptor(0) : .none
            if request.streamOutput {
                command.stdout = .fileDescriptor(1)
                command.stderr = .fileDescriptor(2)
            }
            let violation = request.testViolation.flatMap(TestViolation.init)
            let hooks = SessionHooks(
                beforeThreads: {
                    try Seccomp.install(.main)
                    if let violation, violation.role == "main" { violation.commit() }
                },
                vcpuThreadSetup: { _ in
                    try Seccomp.install(.vcpu)
                    if let violation, violation.role == "vcpu" { violation.commit() }
                })
            let logger = Logger(label: "airlock.vmm")
            if let order = request.snapshot {
                reply = try runOrdered(order, command: command, request: request, snapshot: jailed.take(snapshotJailPath),
                                       logger: logger, hooks: hooks)
            } else {
                let result = try Sandbox.runBlocking(command, config: request.config, requestedAt: request.requestedAt,
                                                     logger: logger, hooks: hooks)
                reply = Reply(result: result)
            }
        } catch let error as SandboxError {
            reply = Reply(error: error.description)
        } catch {
            reply = Reply(error: "the run request from the supervisor is unreadable: \(error)")
        }
        // The output goes beside the JSON as raw bytes: as JSON numbers it would be
        // four times its size, in a process whose memory the cgroup bounds.
        var bare = reply
        bare.result?.stdout = []
        bare.result?.stderr = []
        let json = (try? JSONEncoder().encode(bare)) ?? Data()
        ResultWire.write(fd: resultFD, json: [UInt8](json), stdout: reply.result?.stdout ?? [], stderr: reply.result?.stderr ?? [])
        return reply.error == nil ? 0 : SandboxExitCode.airlockFailed
    }

    /// The VMM side of a run with a snapshot order: restore from the one in the
    /// jail, or boot and save into fd 5. The snapshot is read again here (the
    /// supervisor checked it, but this process trusts no file): header,
    /// manifest and state, and the VMM checks the CPU and TSC itself.
    static func runOrdered(_ order: SnapshotOrder, command: Command, request: Request, snapshot: OwnedFileDescriptor?,
                           logger: Logger, hooks: SessionHooks) throws(SandboxError) -> Reply {
        let config = request.config
        let kernel = config.kernelPath ?? "/vmlinux", rootfs = config.rootfsPath ?? "/rootfs.ext4"
        try Sandbox.validate(command)
        let use: SessionSnapshot
        if order.restore {
            // Opened by Jail.enter before it dropped root: the snapshot is root's, mode 0600.
            guard let fd = snapshot else { throw .invalidConfiguration("the snapshot was not opened for the jail") }
            do { use = .restore(try SnapshotFile(file: fd, path: snapshotJailPath)) } catch {
                throw .invalidConfiguration(error.description)
            }
        } else {
            // libcrypto sets itself up on its first digest (it may read its configuration
            // files): done now, before the filters forbid opening anything.
            _ = sha256Hex([])
            use = .save(fd: snapshotFD, path: "the new snapshot", kernelSHA256: order.kernelSHA256, rootfsSHA256: order.rootfsSHA256)
        }
        let (result, saved) = try Sandbox.runSession(order.saveOnly ? nil : command, config: config, kernelPath: kernel, rootfsPath: rootfs,
                                                     requestedAt: request.requestedAt, logger: logger, hooks: hooks, snapshot: use)
        return Reply(result: result, saved: saved)
    }

    /// The result pipe: three little-endian u64 lengths (the JSON reply without
    /// output, stdout, stderr), then those bytes. The supervisor (root) reads it
    /// from a jailed process it does not trust, so every length is bounded
    /// before anything is read.
    enum ResultWire {
        static let jsonLimit = 1 << 20

        static func write(fd: Int32, json: [UInt8], stdout: [UInt8], stderr: [UInt8]) {
            var header: [UInt8] = []
            for n in [json.count, stdout.count, stderr.count] { withUnsafeBytes(of: UInt64(n).littleEndian) { header += $0 } }
            // A supervisor that is gone makes these fail with EPIPE: nothing is left to tell.
            for part in [header, json, stdout, stderr] { try? part.withUnsafeBytes { try AirlockOS.writeAll(fd: fd, $0) } }
        }

        /// The three parts, or nil when the stream is short or claims more than the limits.
        static func read(fd: Int32, outputLimit: Int) -> (json: [UInt8], stdout: [UInt8], stderr: [UInt8])? {
            guard let header = readExactly(fd: fd, count: 24) else { return nil }
            let lengths = (0..<3).map { i in header[(8 * i)..<(8 * i + 8)].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
            guard lengths[0] <= UInt64(jsonLimit), lengths[1] <= UInt64(outputLimit), lengths[2] <= UInt64(outputLimit),
                  let json = readExactly(fd: fd, count: Int(lengths[0])),
                  let out = readExactly(fd: fd, count: Int(lengths[1])),
                  let err = readExactly(fd: fd, count: Int(lengths[2]))
            else { return nil }
            return (json, out, err)
        }

        static func readExactly(fd: Int32, count: Int) -> [UInt8]? {
            var bytes = [UInt8](repeating: 0, count: count)
            var done = 0
            while done < count {
                let n = bytes.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + done, count - done) }
                if n > 0 { done += n; continue }
                if n < 0 && errno == EINTR { continue }
                return nil
            }
            return bytes
        }
    }

    static func readToEnd(_ fd: Int32) -> Data {
        var out = Data()
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n > 0 { out.append(contentsOf: buffer[0..<n]); continue }
            if n < 0 && errno == EINTR { continue }
            return out
        }
    }
}

/// A forbidden system call made on purpose, for the tests that prove the
/// filters hold in the real VMM (`airlock run --test-violation ROLE:CALL`).
struct TestViolation {
    let role: String
    let call: String

    init?(_ text: String) {
        let parts = text.split(separator: ":").map(String.init)
        guard parts.count == 2, ["main", "vcpu"].contains(parts[0]),
              ["execve", "socket", "open", "ioctl"].contains(parts[1]) else { return nil }
        role = parts[0]
        call = parts[1]
    }

    /// Makes the call; the filter's SIGSYS handler ends the process before it returns.
    func commit() {
        switch call {
        case "execve":
            let argv: [UnsafeMutablePointer<CChar>?] = [strdup("/bin/true"), nil]
            _ = argv.withUnsafeBufferPointer { execv("/bin/true", $0.baseAddress!) }
        case "socket":
            _ = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        case "open":
            _ = open("/etc/passwd", O_RDONLY)
        default:
            // An allowed call (ioctl) with a request the filter does not list: KVM_CREATE_VM on stdout.
            _ = ioctl(1, 0xAE01, 0)
        }
    }
}

/// Turns SIGINT, SIGTERM and SIGHUP at the supervisor into a clean stop of the
/// jailed VMM (which then ends its VM), so the jail is still removed.
enum SignalForwarder {
    static let received = Atomic<Int32>(0)
    nonisolated(unsafe) static var previousMask = sigset_t()

    static func start(_ child: JailedChild) {
        var set = sigset_t()
        sigemptyset(&set)
        for s in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, s) }
        pthread_sigmask(SIG_BLOCK, &set, &previousMask)
        let box = UncheckedBox(child)
        let waitOn = set
        try? startDetachedThread {
            var signal: Int32 = 0
            var waitSet = waitOn
            while sigwait(&waitSet, &signal) == 0 {
                received.store(signal, ordering: .relaxed)
                box.value.terminate()
            }
        }
    }

    static func stop() {
        pthread_sigmask(SIG_SETMASK, &previousMask, nil)
    }
}

final class UncheckedBox<T>: @unchecked Sendable {
    // @unchecked: the JailedChild is only signalled from the forwarder thread; signalling is thread-safe.
    let value: T
    init(_ value: T) { self.value = value }
}

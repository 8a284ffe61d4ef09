import AgentProtocol
import AirlockOS
import Logging
import Synchronization
import VMM

/// A booted micro-VM with Airlock's agent, ready to run commands.
///
/// ```swift
/// import Airlock
///
/// // One command in a fresh VM, destroyed afterwards:
/// let result = try await Sandbox.run(Command(["sh", "-c", "echo hello; exit 3"]))
/// print(result.stdoutText, result.exitCode)   // "hello\n" 3
///
/// // Several commands in one VM (each boot costs seconds on some hosts):
/// let sandbox = try await Sandbox.boot(SandboxConfig(memoryMiB: 128))
/// var cmd = Command(["cat"])
/// cmd.stdin = .bytes(Array("piped\n".utf8))
/// let echoed = try await sandbox.run(cmd)
/// await sandbox.shutdown()
/// ```
///
/// The blocking work (the vCPU loop, waiting on the guest) runs on threads of
/// its own, never on Swift concurrency's cooperative pool.
public final class Sandbox: Sendable {
    let session: VMSession

    init(session: VMSession) { self.session = session }

    /// A sandbox dropped without `shutdown` still ends its VM and threads.
    deinit { session.abandon() }

    /// Boots a VM and waits until its agent is ready. Cancelling the task stops the VM.
    /// - Parameter requestedAt: when the caller's request began (monotonic ns), for `RunTimings.vmmStartMs`.
    public static func boot(_ config: SandboxConfig, requestedAt: UInt64? = nil,
                            logger: Logger = Logger(label: "airlock.sandbox")) async throws(SandboxError) -> Sandbox {
        let start = requestedAt ?? monotonicNanoseconds()
        let handle = SessionHandle()
        return try await cancellable(handle) { () throws(SandboxError) -> Sandbox in
            let session = try makeSession(config, requestedAt: start, logger: logger)
            handle.set(session)
            try session.boot()
            return Sandbox(session: session)
        }
    }

    /// Runs one command in this VM and waits for its end. Runs are one at a time.
    /// Cancelling the task stops the VM (the result then carries the failure).
    public func run(_ command: Command) async throws(SandboxError) -> RunResult {
        try Self.validate(command)
        return try await perform(command, shutdownAfter: false)
    }

    /// Runs one command and then ends the VM (the agent syncs and reboots after reporting).
    public func runAndShutDown(_ command: Command) async throws(SandboxError) -> RunResult {
        try Self.validate(command)
        return try await perform(command, shutdownAfter: true)
    }

    /// A validated command on the session's thread; cancelling the task stops the VM.
    private func perform(_ command: Command, shutdownAfter: Bool) async throws(SandboxError) -> RunResult {
        let session = self.session
        return try await Self.cancellable(SessionHandle(session)) { () throws(SandboxError) -> RunResult in
            try session.run(command, shutdownAfter: shutdownAfter)
        }
    }

    /// Syncs the guest's disks and ends the VM (stopping it if it does not end itself).
    public func shutdown() async {
        let session = self.session
        _ = try? await Self.onThread { () throws(SandboxError) -> Void in session.shutdown() }
    }

    /// Ends the VM now, without asking the guest.
    public func destroy() async {
        let session = self.session
        _ = try? await Self.onThread { () throws(SandboxError) -> Void in session.destroy() }
    }

    /// How the VM ended, once it has ("reset on vCPU 0: i8042 reset ...").
    public var systemEvent: String? { session.exit?.event?.description }

    /// Boots a fresh VM, runs `command` in it, and ends the VM: `airlock run`.
    public static func run(_ command: Command, config: SandboxConfig = SandboxConfig(), requestedAt: UInt64? = nil,
                           logger: Logger = Logger(label: "airlock.sandbox")) async throws(SandboxError) -> RunResult {
        try validate(command)  // before the boot, so a bad command costs no VM
        let sandbox = try await boot(config, requestedAt: requestedAt ?? monotonicNanoseconds(), logger: logger)
        return try await sandbox.perform(command, shutdownAfter: true)
    }

    /// `run` for callers that are threads already (the CLI's main thread).
    public static func runBlocking(_ command: Command, config: SandboxConfig, requestedAt: UInt64,
                                   logger: Logger, hooks: SessionHooks = SessionHooks()) throws(SandboxError) -> RunResult {
        try validate(command)
        if config.snapshots == .automatic {
            return try runUsingSnapshotStore(command, config: config, requestedAt: requestedAt, logger: logger, hooks: hooks)
        }
        let session = try makeSession(config, requestedAt: requestedAt, logger: logger, hooks: hooks)
        try session.boot()
        return try session.run(command, shutdownAfter: true)
    }

    static func validate(_ command: Command) throws(SandboxError) {
        guard let first = command.arguments.first, !first.isEmpty else {
            throw .invalidConfiguration("the command is empty: give the program to run and its arguments (airlock run -- CMD ARGS...)")
        }
        if let t = command.timeoutSeconds, !(t > 0) {
            throw .invalidConfiguration("timeout \(t) is not a positive number of seconds")
        }
        if let m = command.maxOutputBytes, m < 0 {
            throw .invalidConfiguration("max output \(m) is negative: give a number of bytes, 0 or more")
        }
        for (name, _) in command.environment where name.isEmpty || name.contains("=") || name.utf8.contains(0) {
            throw .invalidConfiguration("environment variable name '\(name)' is not valid: give NAME=VALUE with a NAME that has no '='")
        }
        // The agent's limits, checked before any boot.
        if let problem = RunRequest(command, runID: 0, shutdownAfter: false).limitProblem {
            throw .invalidConfiguration("\(problem): pass large inputs on stdin or in a file instead")
        }
    }

    static func makeSession(_ config: SandboxConfig, requestedAt: UInt64, logger: Logger,
                            hooks: SessionHooks = SessionHooks()) throws(SandboxError) -> VMSession {
        let images = try ImageResolution.resolve(config)
        return try VMSession(config: config, kernelPath: images.kernel, rootfsPath: images.rootfs,
                             requestedAt: requestedAt, logger: logger, hooks: hooks)
    }

    /// Runs blocking work on its own thread; a cancelled task stops the VM, which
    /// ends that work promptly (the controller sees the VM end).
    static func cancellable<T: Sendable>(_ handle: SessionHandle,
                                         _ work: @escaping @Sendable () throws(SandboxError) -> T) async throws(SandboxError) -> T {
        let result: Result<T, SandboxError> = await withTaskCancellationHandler {
            do throws(SandboxError) { return .success(try await onThread(work)) } catch { return .failure(error) }
        } onCancel: {
            handle.stop()
        }
        return try result.get()
    }

    /// Runs blocking work on a thread of its own and resumes the caller with its result.
    static func onThread<T: Sendable>(_ work: @escaping @Sendable () throws(SandboxError) -> T) async throws(SandboxError) -> T {
        let result: Result<T, SandboxError> = await withCheckedContinuation { continuation in
            do {
                try startDetachedThread {
                    do throws(SandboxError) { continuation.resume(returning: .success(try work())) } catch {
                        continuation.resume(returning: .failure(error))
                    }
                }
            } catch {
                continuation.resume(returning: .failure(.vmm("cannot start a thread: \(error)")))
            }
        }
        return try result.get()
    }
}

/// The session a cancellation handler stops; set once the session exists.
final class SessionHandle: Sendable {
    private let state = Mutex<(session: VMSession?, cancelled: Bool)>((nil, false))
    init(_ session: VMSession? = nil) { state.withLock { $0.session = session } }

    func set(_ session: VMSession) {
        let cancelled = state.withLock { s -> Bool in
            s.session = session
            return s.cancelled
        }
        if cancelled { session.machine.stop(with: nil) }
    }

    func stop() {
        let session = state.withLock { s -> VMSession? in
            s.cancelled = true
            return s.session
        }
        session?.machine.stop(with: nil)
    }
}

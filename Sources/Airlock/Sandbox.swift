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
/// Each sandbox's VMM is a separate, jailed `airlock-vmm` process (namespaces, cgroup,
/// seccomp, no capabilities; docs/security.md), which needs root and the `airlock-vmm`
/// executable (`SandboxConfig.vmmExecutable`). The blocking work (waiting on the guest)
/// runs on threads of its own, never on Swift concurrency's cooperative pool, and the
/// library installs no signal handlers.
public final class Sandbox: Sendable {
    let client: SessionClient

    private init(client: SessionClient) { self.client = client }

    /// A sandbox dropped without `shutdown` still ends its VM and its VMM.
    deinit { client.terminate() }

    /// Boots a VM and waits until its agent is ready. Cancelling the task stops the VM.
    /// - Parameter requestedAt: when the caller's request began (monotonic ns), for `RunTimings.vmmStartMs`.
    public static func boot(_ config: SandboxConfig, requestedAt: UInt64? = nil,
                            logger: Logger = Logger(label: "airlock.sandbox")) async throws(SandboxError) -> Sandbox {
        let start = requestedAt ?? monotonicNanoseconds()
        let handle = StopHandle()
        let client = try await cancellable(handle) { () throws(SandboxError) -> SessionClient in
            try bootBlocking(config, requestedAt: start, logger: logger, stop: handle)
        }
        return Sandbox(client: client)
    }

    /// Runs one command in this VM and waits for its end. Runs are one at a time.
    /// Cancelling the task stops the VM (the run then fails).
    public func run(_ command: Command) async throws(SandboxError) -> RunResult {
        try CommandValidation.check(command, config: client.config)
        return try await perform(command, shutdownAfter: false)
    }

    /// Runs one command and then ends the VM (the agent syncs and reboots after reporting).
    public func runAndShutDown(_ command: Command) async throws(SandboxError) -> RunResult {
        try CommandValidation.check(command, config: client.config)
        return try await perform(command, shutdownAfter: true)
    }

    /// A validated command on a thread of its own; cancelling the task stops the VM.
    private func perform(_ command: Command, shutdownAfter: Bool) async throws(SandboxError) -> RunResult {
        let client = self.client
        return try await Self.cancellable(StopHandle(client)) { () throws(SandboxError) -> RunResult in
            try client.run(command, shutdownAfter: shutdownAfter)
        }
    }

    /// Delivers `signal` (SIGINT, SIGTERM, ...) to the command running now, if one is.
    public func signal(_ signal: Int32) {
        client.signal(signal)
    }

    /// Syncs the guest's disks and ends the VM (stopping it if it does not end itself).
    public func shutdown() async {
        let client = self.client
        _ = try? await Self.onThread { () throws(SandboxError) -> Void in client.shutdown() }
    }

    /// Ends the VM now, without asking the guest.
    public func destroy() async {
        let client = self.client
        client.terminate()
        _ = try? await Self.onThread { () throws(SandboxError) -> Void in client.shutdown() }
    }

    /// How the VM ended, once it has ("reset on vCPU 0: i8042 reset ...").
    public var systemEvent: String? { client.systemEvent }

    /// Boots a fresh VM, runs `command` in it, and ends the VM: `airlock run`.
    public static func run(_ command: Command, config: SandboxConfig = SandboxConfig(), requestedAt: UInt64? = nil,
                           logger: Logger = Logger(label: "airlock.sandbox")) async throws(SandboxError) -> RunResult {
        try CommandValidation.check(command, config: config)  // before the boot, so a bad command costs no VM
        let sandbox = try await boot(config, requestedAt: requestedAt ?? monotonicNanoseconds(), logger: logger)
        return try await sandbox.perform(command, shutdownAfter: true)
    }

    /// `run` for callers that are threads already (the CLI's main thread). `stop` lets another
    /// thread end it (the CLI's signal handling).
    public static func runBlocking(_ command: Command, config: SandboxConfig, requestedAt: UInt64, logger: Logger,
                                   stop: StopHandle = StopHandle()) throws(SandboxError) -> RunResult {
        try CommandValidation.check(command, config: config)
        let client = try bootBlocking(config, requestedAt: requestedAt, logger: logger, stop: stop)
        defer { client.terminate() }
        return try client.run(command, shutdownAfter: true)
    }

    static func bootBlocking(_ config: SandboxConfig, requestedAt: UInt64, logger: Logger, stop: StopHandle) throws(SandboxError) -> SessionClient {
        try stop.check()
        // The handle knows the client as soon as its VMM exists: a stop during the boot ends it then.
        let client = try SessionClient.boot(config, requestedAt: requestedAt, logger: logger, stop: stop)
        try stop.check()
        return client
    }

    /// Runs blocking work on its own thread; a cancelled task stops the VM, which ends that work promptly.
    static func cancellable<T: Sendable>(_ handle: StopHandle,
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

/// Ends a sandbox from another thread: task cancellation, or the CLI's signal handling.
/// Stopping before the sandbox exists makes its boot fail as soon as it can.
public final class StopHandle: Sendable {
    private let state = Mutex<(client: SessionClient?, stopped: Bool)>((nil, false))
    public init() {}
    init(_ client: SessionClient) { state.withLock { $0.client = client } }

    var stopped: Bool { state.withLock { $0.stopped } }

    func set(_ client: SessionClient) {
        let stopped = state.withLock { s -> Bool in
            s.client = client
            return s.stopped
        }
        if stopped { client.terminate() }
    }

    func check() throws(SandboxError) {
        if stopped { throw .ended("the sandbox was stopped before it booted") }
    }

    /// Ends the sandbox's VMM now; a run in progress ends with an error.
    public func stop() {
        let client = state.withLock { s -> SessionClient? in
            s.stopped = true
            return s.client
        }
        client?.terminate()
    }
}

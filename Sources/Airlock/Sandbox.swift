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

    init(client: SessionClient) { self.client = client }

    /// A sandbox dropped without `shutdown` still ends its VM and its VMM.
    deinit { client.terminate() }

    /// Boots a VM and waits until its agent is ready. Cancelling the task stops the VM.
    /// - Parameter requestedAt: when the caller's request began (monotonic ns), for `RunTimings.vmmStartMs`.
    public static func boot(_ config: SandboxConfig, requestedAt: UInt64? = nil,
                            logger: Logger = Logger(label: "airlock.sandbox")) async throws(SandboxError) -> Sandbox {
        try await boot(config, requestedAt: requestedAt, logger: logger, checkDisks: true)
    }

    /// `checkDisks`: the caller's disks are checked against the root filesystem first (a build
    /// step has checked its own already).
    static func boot(_ config: SandboxConfig, requestedAt: UInt64?, logger: Logger, checkDisks: Bool) async throws(SandboxError) -> Sandbox {
        let start = requestedAt ?? monotonicNanoseconds()
        let handle = StopHandle()
        let client = try await cancellable(handle) { () throws(SandboxError) -> SessionClient in
            if checkDisks && !config.disks.isEmpty { _ = try prepareBuildStep(Command(["true"]), config: config) }
            return try bootBlocking(config, requestedAt: start, logger: logger, stop: handle)
        }
        return Sandbox(client: client)
    }

    /// Runs one command in this VM and waits for its end. Runs are one at a time.
    /// Cancelling the task stops the VM (the run then fails).
    public func run(_ command: Command) async throws(SandboxError) -> RunResult {
        try CommandValidation.check(command, config: client.config)
        try BuildStep.refuseInSession(command)
        return try await perform(command, shutdownAfter: false)
    }

    /// Runs one command and then ends the VM (the agent syncs and reboots after reporting).
    public func runAndShutDown(_ command: Command) async throws(SandboxError) -> RunResult {
        try CommandValidation.check(command, config: client.config)
        try BuildStep.refuseInSession(command)
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

    /// Boots a fresh VM, runs `command` in it, and ends the VM: `airlock run`. With
    /// `command.workspace` the directory is copied into a disk first, and with
    /// `command.artifacts` the files the command left come back once the VM has ended.
    public static func run(_ command: Command, config: SandboxConfig = SandboxConfig(), requestedAt: UInt64? = nil,
                           logger: Logger = Logger(label: "airlock.sandbox")) async throws(SandboxError) -> RunResult {
        let start = requestedAt ?? monotonicNanoseconds()
        try CommandValidation.check(command, config: config)  // before the boot, so a bad command costs no VM
        let step = try await onThread { () throws(SandboxError) -> BuildStep in try prepareBuildStep(command, config: config) }
        let sandbox = try await boot(step.config, requestedAt: start, logger: logger, checkDisks: false)
        let result = try await sandbox.perform(step.command, shutdownAfter: true)
        return try await onThread { () throws(SandboxError) -> RunResult in
            var collected = result
            step.collect(into: &collected)
            step.cleanUp()
            return collected
        }
    }

    /// `run` for callers that are threads already (the CLI's main thread). `stop` lets another
    /// thread end it (the CLI's signal handling).
    public static func runBlocking(_ command: Command, config: SandboxConfig, requestedAt: UInt64, logger: Logger,
                                   stop: StopHandle = StopHandle()) throws(SandboxError) -> RunResult {
        try CommandValidation.check(command, config: config)
        // A build step's disks are no part of any snapshot: it boots cold.
        if config.snapshots == .automatic && command.workspace == nil && command.artifacts == nil && config.disks.isEmpty {
            return try runUsingSnapshotStore(command, config: config, requestedAt: requestedAt, logger: logger, stop: stop)
        }
        let step = try prepareBuildStep(command, config: config)
        defer { step.cleanUp() }
        let client = try bootBlocking(step.config, requestedAt: requestedAt, logger: logger, stop: stop)
        defer { client.terminate() }
        var result = try client.run(step.command, shutdownAfter: true)
        step.collect(into: &result)
        return result
    }

    /// The workspace image built, and the disks checked against the root filesystem
    /// (BuildStep.swift); nothing to do without either.
    static func prepareBuildStep(_ command: Command, config: SandboxConfig) throws(SandboxError) -> BuildStep {
        let rootfs = config.rootfsPath ?? ImageStore().rootfsPath
        if command.workspace != nil || command.artifacts != nil || !config.disks.isEmpty {
            _ = try ImageResolution.open(rootfs, what: "root filesystem", option: "--rootfs", installed: config.rootfsPath == nil)
        }
        return try BuildStep.prepare(command, config: config, rootfs: rootfs)
    }

    static func bootBlocking(_ config: SandboxConfig, requestedAt: UInt64, logger: Logger, stop: StopHandle,
                             snapshot: CheckedSnapshot? = nil) throws(SandboxError) -> SessionClient {
        try stop.check()
        // The handle knows the client as soon as its VMM exists: a stop during the boot ends it then.
        let client = try SessionClient.boot(config, requestedAt: requestedAt, logger: logger, stop: stop, snapshot: snapshot)
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

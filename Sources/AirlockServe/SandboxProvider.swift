import Airlock
import Synchronization
import Logging

/// How a sandbox was made ready: booted from the kernel, or restored from a snapshot.
public enum SandboxOrigin: String, Sendable {
    case booted, restored
}

/// Where the service gets its sandboxes. Each one serves exactly one request and is
/// then destroyed; the service never runs two commands in one VM.
///
/// The real providers restore (`RestoringSandboxProvider`, the default) or boot
/// (`BootingSandboxProvider`, `--no-snapshot`). `ScriptedSandboxProvider` stands in for both in tests of routing,
/// validation, queueing and limits, and in the benchmark of the service's own cost.
public protocol SandboxProvider: Sendable {
    /// How `prepare` makes sandboxes ready (for the boots and restores metrics).
    var origin: SandboxOrigin { get }
    /// Checks what can be checked before the service starts (images present and
    /// readable, a sane configuration), so a bad set-up fails at start, not at the
    /// first request.
    func preflight(_ config: SandboxConfig) throws(SandboxError)
    /// Checks a command as a sandbox made from `config` would, before any VM is spent on it.
    func check(_ command: Command, config: SandboxConfig) throws(SandboxError)
    /// Makes one sandbox ready to run a command. Cancelling the task stops its VM.
    func prepare(_ config: SandboxConfig) async throws(SandboxError) -> any ReadySandbox
}

/// A sandbox that is ready and has never run anything.
public protocol ReadySandbox: Sendable {
    var origin: SandboxOrigin { get }
    /// Runs the one command this sandbox serves and ends the VM. Cancelling the task
    /// stops the VM (the result then says so, or the call throws).
    func runOnce(_ command: Command) async throws(SandboxError) -> RunResult
    /// Ends the VM now, whatever it is doing; safe to call after `runOnce` and twice.
    func destroy() async
}

/// Sandboxes booted through the public `Sandbox` API (`Sandbox.boot`, then one
/// `runAndShutDown`): each a jailed `airlock-vmm` process of its own (`SandboxConfig.isolation`).
public struct BootingSandboxProvider: SandboxProvider {
    let logger: Logger

    public init(logger: Logger = Logger(label: "airlock.sandbox")) { self.logger = logger }

    public var origin: SandboxOrigin { .booted }

    public func preflight(_ config: SandboxConfig) throws(SandboxError) { try Sandbox.preflight(config, logger: logger) }

    public func check(_ command: Command, config: SandboxConfig) throws(SandboxError) { try Sandbox.check(command, config: config) }

    public func prepare(_ config: SandboxConfig) async throws(SandboxError) -> any ReadySandbox {
        BootedSandbox(try await Sandbox.boot(config, logger: logger))
    }
}

/// Sandboxes restored from the snapshot store's file for the pool's configuration
/// (`Sandbox.restore(from:)`, jailed like a boot), made at the service's start when the
/// store has none (one boot, saved). Every restore gets its own clock and random seed
/// from the host (docs/snapshots.md), so no two requests share random numbers. A request
/// for other guest memory than the pool's boots, as it would without snapshots.
public final class RestoringSandboxProvider: SandboxProvider {
    let logger: Logger
    /// The pool's configuration and the snapshot its sandboxes restore from.
    private let snapshot = Mutex<(config: SandboxConfig, path: String)?>(nil)

    public init(logger: Logger = Logger(label: "airlock.sandbox")) { self.logger = logger }

    public var origin: SandboxOrigin { .restored }

    public func preflight(_ config: SandboxConfig) throws(SandboxError) {
        try Sandbox.preflight(config, logger: logger)
        let path = try Sandbox.storedSnapshot(for: config, logger: logger)
        snapshot.withLock { $0 = (config, path) }
    }

    public func check(_ command: Command, config: SandboxConfig) throws(SandboxError) { try Sandbox.check(command, config: config) }

    public func prepare(_ config: SandboxConfig) async throws(SandboxError) -> any ReadySandbox {
        guard let (saved, path) = snapshot.withLock({ $0 }), saved == config else {
            return BootedSandbox(try await Sandbox.boot(config, logger: logger))
        }
        do {
            return BootedSandbox(try await Sandbox.restore(from: path, config: config, logger: logger), origin: .restored)
        } catch let error where !Task.isCancelled {
            // The file went away or changed under the service (airlock snapshot rm, new
            // images): make it again once, then restore or fail with the cause.
            logger.warning("restoring \(path) failed (\(error)); saving a new snapshot")
            let made: String
            do throws(SandboxError) { made = try Sandbox.storedSnapshot(for: config, logger: logger) } catch { throw error }
            snapshot.withLock { $0 = (config, made) }
            return BootedSandbox(try await Sandbox.restore(from: made, config: config, logger: logger), origin: .restored)
        }
    }
}

final class BootedSandbox: ReadySandbox {
    let sandbox: Sandbox
    let origin: SandboxOrigin
    init(_ sandbox: Sandbox, origin: SandboxOrigin = .booted) {
        self.sandbox = sandbox
        self.origin = origin
    }

    func runOnce(_ command: Command) async throws(SandboxError) -> RunResult {
        do {
            return try await sandbox.runAndShutDown(command)
        } catch {
            // Whatever went wrong, this VM serves nobody else.
            await sandbox.destroy()
            throw error
        }
    }

    func destroy() async { await sandbox.destroy() }
}

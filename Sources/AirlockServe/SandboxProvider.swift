import Airlock
import Logging

/// How a sandbox was made ready: booted from the kernel, or restored from a snapshot.
public enum SandboxOrigin: String, Sendable {
    case booted, restored
}

/// Where the service gets its sandboxes. Each one serves exactly one request and is
/// then destroyed; the service never runs two commands in one VM.
///
/// The real provider boots (`BootingSandboxProvider`); a snapshot-restoring one fits
/// the same shape. `ScriptedSandboxProvider` stands in for both in tests of routing,
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
///
/// Snapshots (restoring a booted VM instead of booting one) are not in `Sandbox` yet;
/// when they are, a `RestoringSandboxProvider` implements `prepare` with the restore
/// and reports `.restored`, and nothing else in the service changes.
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

final class BootedSandbox: ReadySandbox {
    let sandbox: Sandbox
    init(_ sandbox: Sandbox) { self.sandbox = sandbox }

    var origin: SandboxOrigin { .booted }

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

import Airlock
import AirlockOS
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A stand-in for real sandboxes: "boots" in `bootDelay` and "runs" a handful of
/// commands in this process, so the service's routing, validation, queueing, limits
/// and drain are tested in milliseconds, and its own overhead can be measured with
/// no VM in the way (`airlock serve --test-provider scripted`, `make bench`).
///
/// Commands: `true`, `false`, `exit N`, `echo ARGS...`, `cat` (stdin to stdout),
/// `sleep SECONDS` (honours timeoutSeconds and cancellation), `chunks N TEXT`
/// (N stdout writes), `stderr TEXT`, `bytes HEX` (raw stdout bytes), `hold KEY` (runs
/// until `release(KEY)`, its timeout or cancellation), `crash` (the "VMM" dies: the run
/// throws). Anything else is "not found" (127).
public final class ScriptedSandboxProvider: SandboxProvider {
    public let bootDelay: Duration
    private let counts = Mutex<(prepared: Int, destroyed: Int, live: Int, failNextBoots: Int)>((0, 0, 0, 0))
    private let released = Mutex<Set<String>>([])

    public init(bootDelay: Duration = .milliseconds(20)) { self.bootDelay = bootDelay }

    public var origin: SandboxOrigin { .booted }

    /// Sandboxes made ready so far, destroyed so far, and alive now (ready or running).
    public var prepared: Int { counts.withLock { $0.prepared } }
    public var destroyed: Int { counts.withLock { $0.destroyed } }
    public var live: Int { counts.withLock { $0.live } }

    /// Lets the runs of `hold KEY` end (exit 0).
    public func release(_ key: String) { _ = released.withLock { $0.insert(key) } }

    func isReleased(_ key: String) -> Bool { released.withLock { $0.contains(key) } }

    /// The next `n` boots fail (a broken image, say).
    public func failNextBoots(_ n: Int) { counts.withLock { $0.failNextBoots = n } }

    public func preflight(_ config: SandboxConfig) throws(SandboxError) {
        guard config.memoryMiB >= 32 else { throw .invalidConfiguration("--memory \(config.memoryMiB) MiB is too small") }
    }

    public func check(_ command: Command, config: SandboxConfig) throws(SandboxError) {
        guard let first = command.arguments.first, !first.isEmpty else { throw .invalidConfiguration("the command is empty") }
    }

    public func prepare(_ config: SandboxConfig) async throws(SandboxError) -> any ReadySandbox {
        do {
            try await Task.sleep(for: bootDelay)
        } catch {
            throw .vmm("the boot was cancelled")
        }
        let fail = counts.withLock { c -> Bool in
            if c.failNextBoots > 0 {
                c.failNextBoots -= 1
                return true
            }
            c.prepared += 1
            c.live += 1
            return false
        }
        if fail { throw .agentDidNotStart("the scripted boot failed (failNextBoots)", console: "") }
        return ScriptedSandbox(provider: self)
    }

    fileprivate func ended() {
        counts.withLock {
            $0.destroyed += 1
            $0.live -= 1
        }
    }
}

final class ScriptedSandbox: ReadySandbox {
    private let provider: ScriptedSandboxProvider
    private let ended = Atomic<Bool>(false)

    init(provider: ScriptedSandboxProvider) { self.provider = provider }

    var origin: SandboxOrigin { .booted }

    func destroy() async { end() }

    private func end() {
        if !ended.exchange(true, ordering: .relaxed) { provider.ended() }
    }

    func runOnce(_ command: Command) async throws(SandboxError) -> RunResult {
        defer { end() }
        guard !ended.load(ordering: .relaxed) else { throw .ended("the sandbox has ended") }
        let start = monotonicNanoseconds()
        var result = RunResult()
        var out = Output(command.stdout, limit: command.maxOutputBytes), err = Output(command.stderr, limit: command.maxOutputBytes)
        let args = Array(command.arguments.dropFirst())
        switch command.arguments[0] {
        case "true": break
        case "false": result.exitCode = 1
        case "exit": result.exitCode = Int32(args.first ?? "0") ?? 2
        case "echo": out.write(Array((args.joined(separator: " ") + "\n").utf8))
        case "stderr": err.write(Array((args.joined(separator: " ") + "\n").utf8))
        case "cat":
            if case let .bytes(b) = command.stdin { out.write(b) }
        case "chunks":
            let n = Int(args.first ?? "1") ?? 1
            let text = args.dropFirst().joined(separator: " ")
            for _ in 0..<max(0, n) { out.write(Array(text.utf8)) }
        case "bytes":
            var bytes: [UInt8] = []
            var hex = Substring(args.first ?? "")
            while hex.count >= 2, let b = UInt8(hex.prefix(2), radix: 16) {
                bytes.append(b)
                hex = hex.dropFirst(2)
            }
            out.write(bytes)
        case "sleep":
            let seconds = Double(args.first ?? "1") ?? 1
            let limit = command.timeoutSeconds ?? .infinity
            do {
                try await Task.sleep(for: .seconds(min(seconds, limit)))
            } catch {
                result.failure = "the VM was stopped before the command finished"
                result.exitCode = SandboxExitCode.airlockFailed
                return result
            }
            if seconds > limit {
                result.timedOut = true
                result.exitCode = SandboxExitCode.timeout
                return result
            }
        case "hold":
            let key = args.first ?? ""
            let deadline = command.timeoutSeconds.map { monotonicNanoseconds() &+ UInt64($0 * 1e9) } ?? .max
            while !provider.isReleased(key) {
                if monotonicNanoseconds() >= deadline {
                    result.timedOut = true
                    result.exitCode = SandboxExitCode.timeout
                    return result
                }
                do {
                    try await Task.sleep(for: .milliseconds(5))
                } catch {
                    result.failure = "the VM was stopped before the command finished"
                    result.exitCode = SandboxExitCode.airlockFailed
                    return result
                }
            }
        case "crash":
            throw .vmm("the VMM process died (scripted crash)")
        default:
            result.failure = "command not found: \(command.arguments[0])"
            result.exitCode = SandboxExitCode.commandNotFound
        }
        // Handlers get the output on a thread of their own, as a real sandbox's output threads
        // deliver it: a handler may block (a slow client), which must not hold a Swift task's thread.
        let handed = [out.handedOver, err.handedOver].flatMap { $0 }
        if !handed.isEmpty {
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                do {
                    try startDetachedThread {
                        for (handler, bytes) in handed { handler(bytes) }
                        done.resume()
                    }
                } catch {
                    done.resume()
                }
            }
        }
        result.stdout = out.captured
        result.stderr = err.captured
        result.outputTruncated = out.truncated || err.truncated
        result.stdoutDroppedBytes = UInt64(out.dropped)
        result.stderrDroppedBytes = UInt64(err.dropped)
        result.systemEvent = "reset (scripted)"
        result.timings.commandMs = Double(monotonicNanoseconds() &- start) / 1e6
        result.timings.totalMs = result.timings.commandMs
        return result
    }

    /// One output stream as the real sandbox treats it: captured, handed over, or written to a descriptor, up to the limit.
    struct Output {
        let destination: OutputDestination
        let limit: Int
        var captured: [UInt8] = []
        /// Chunks for a `.handler`, delivered after the command (on a thread of their own).
        var handedOver: [(@Sendable ([UInt8]) -> Void, [UInt8])] = []
        var sent = 0
        var dropped = 0
        var truncated = false

        init(_ destination: OutputDestination, limit: Int?) {
            self.destination = destination
            self.limit = limit ?? Int.max
        }

        mutating func write(_ bytes: [UInt8]) {
            let room = max(0, limit - sent)
            let kept = Array(bytes.prefix(room))
            if kept.count < bytes.count {
                truncated = true
                dropped += bytes.count - kept.count
            }
            sent += kept.count
            guard !kept.isEmpty else { return }
            switch destination {
            case .capture: captured.append(contentsOf: kept)
            case let .handler(h): handedOver.append((h, kept))
            case let .fileDescriptor(fd): kept.withUnsafeBytes { _ = Glibc.write(fd, $0.baseAddress, $0.count) }
            }
        }
    }
}

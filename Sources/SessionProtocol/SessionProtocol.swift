import AgentProtocol

/// The protocol between a supervisor (the `airlock` CLI, or any program using `Sandbox`) and
/// the VMM process that hosts one VM for its whole life (`airlock-vmm`, usually jailed).
///
/// It runs over a Unix stream socket (a socketpair made by the supervisor) with the agent
/// protocol's framing (`Frame`: u32 length, u8 type, body; bounded, and a lying length ends
/// the stream). Descriptors travel with the frame that names them (SCM_RIGHTS on the same
/// sendmsg): `boot` carries /dev/kvm, the kernel, the root filesystem, any extra disks and,
/// for a restore, the snapshot file, opened (and the snapshot checked whole) by the
/// supervisor; `snapshot` carries the empty file a save writes; `run` carries the run's
/// stdout, stderr and (when it has one) stdin. No other descriptor crosses, and a message
/// that arrives with the wrong number is an error. The VMM never sends descriptors.
///
/// A session, supervisor (S) and VMM (V):
///
///     V: hello(version)          as soon as the VMM is in its jail
///     S: boot(request) + fds     V: booted(report)        or failed(...)
///     S: snapshot(save) + fd     V: snapshotSaved(report) or failed(...)  (optional: booted, no run yet)
///     S: run(spec) + fds         V: started, exited(...)  or failed(...), once per run
///     S: signal(run, signo)      (any time during a run: delivered to the command)
///     S: shutdown                V: ended(event)          and the VMM exits
///
/// A run with `shutdownAfter` ends the VM after it: `exited`, then `ended`. The VMM exits
/// after `ended`, after `failed` for a failure that ends the VM, or when the supervisor's end
/// of the socket closes.
public enum SessionProtocol {
    /// Bumped whenever a message's layout changes; `hello` keeps its layout forever.
    public static let version: UInt16 = 3

    public enum Limits {
        /// Names (paths, for messages), log levels, profile names, the system event.
        public static let name = 4096
        /// Error messages, with the guest console's last lines.
        public static let text = 64 << 10
        /// Extra disks beyond the root filesystem.
        public static let disks = 16
        /// Descriptors any one message may carry (boot's: /dev/kvm, kernel, rootfs, disks, snapshot).
        public static let descriptors = 4 + disks
        /// A SHA-256 in hex.
        public static let digest = 64
    }
}

/// The machine the VMM builds: what `boot` asks for.
public struct BootRequest: Equatable, Sendable {
    public var memoryMiB: UInt32
    public var cpus: UInt32
    /// From the first instruction to the agent's hello.
    public var bootTimeoutSeconds: Double
    /// Appended to the kernel command line.
    public var kernelCommandLine: String
    /// Where the agent is in the root filesystem (init=).
    public var agentPath: String
    /// `HostProfile`'s wire name, detected once by the supervisor (the jail has no /sys).
    public var hostProfile: String
    /// The user's names for the kernel and the root filesystem, for messages: the VMM only
    /// has descriptors.
    public var kernelName: String
    public var rootfsName: String
    /// Extra disks, in guest order (/dev/vdb, ...); their descriptors follow the root filesystem's.
    public var disks: [Disk]
    /// Copy the guest kernel's console to the VMM's stderr as it is written.
    public var copyConsoleToStderr: Bool
    /// swift-log's level name for the VMM's own log lines (on its stderr); the VMM process
    /// also takes it on its command line, to log before the boot request arrives.
    public var logLevel: String
    /// When the caller's request began (CLOCK_MONOTONIC ns, the same clock in the jail).
    public var requestedAt: UInt64
    /// Restore the VM from a snapshot instead of booting it: the user's name for the file (for
    /// messages); its descriptor follows the disks'. The supervisor has checked the file whole
    /// (docs/snapshots.md); the VMM reads its header, manifest and state again and maps its
    /// RAM image copy-on-write. nil: boot the kernel.
    public var snapshotName: String?

    public struct Disk: Equatable, Sendable {
        public var name: String
        public var readOnly: Bool
        public init(name: String, readOnly: Bool) { self.name = name; self.readOnly = readOnly }
    }

    /// The descriptors `boot` carries, in order: /dev/kvm, the kernel, the root filesystem, the
    /// disks, and the snapshot when restoring.
    public var descriptorCount: Int { 3 + disks.count + (snapshotName == nil ? 0 : 1) }

    public init(memoryMiB: UInt32, cpus: UInt32 = 1, bootTimeoutSeconds: Double, kernelCommandLine: String = "",
                agentPath: String, hostProfile: String, kernelName: String, rootfsName: String, disks: [Disk] = [],
                copyConsoleToStderr: Bool = false, logLevel: String = "warning", requestedAt: UInt64, snapshotName: String? = nil) {
        self.memoryMiB = memoryMiB
        self.cpus = cpus
        self.bootTimeoutSeconds = bootTimeoutSeconds
        self.kernelCommandLine = kernelCommandLine
        self.agentPath = agentPath
        self.hostProfile = hostProfile
        self.kernelName = kernelName
        self.rootfsName = rootfsName
        self.disks = disks
        self.copyConsoleToStderr = copyConsoleToStderr
        self.logLevel = logLevel
        self.requestedAt = requestedAt
        self.snapshotName = snapshotName
    }
}

/// What `snapshot` asks for: save the booted, idle VM (no run yet) into the file that comes
/// with it (empty, opened for writing by the supervisor, which checks what was written before
/// it keeps it). The VM pauses while it is written and then goes on.
public struct SnapshotSave: Equatable, Sendable {
    /// The user's name for the file, for messages.
    public var name: String
    /// The images' SHA-256 (hex) for the manifest: the supervisor hashed them (the VMM has
    /// only descriptors, and trusts nothing it would hash for itself anyway).
    public var kernelSHA256: String
    public var rootfsSHA256: String
    /// The host's wall clock (seconds since 1970) for the manifest.
    public var createdAt: UInt64

    public init(name: String, kernelSHA256: String, rootfsSHA256: String, createdAt: UInt64) {
        self.name = name
        self.kernelSHA256 = kernelSHA256
        self.rootfsSHA256 = rootfsSHA256
        self.createdAt = createdAt
    }
}

/// What `snapshotSaved` reports (the supervisor reads the file itself before it trusts it).
public struct SnapshotSaveReport: Equatable, Sendable {
    /// The file's length (holes included) and the bytes its data takes.
    public var fileSize: UInt64 = 0
    public var allocatedBytes: UInt64 = 0
    /// Guest pages written (touched and not all zeros), resident, and in all.
    public var dataPages: UInt64 = 0
    public var residentPages: UInt64 = 0
    public var totalPages: UInt64 = 0
    /// The VM's pause, from its stop to its going on (the write inside it), in ms.
    public var pausedMs: Double = 0
    public var writeMs: Double = 0
    public init() {}
}

/// One command: what `run` asks for. Its stdout and stderr descriptors (and stdin's, when
/// `hasStdin`) come with it.
public struct RunSpec: Equatable, Sendable {
    public var runID: UInt32
    public var arguments: [String]
    /// "NAME=value" entries.
    public var environment: [String]
    public var workingDirectory: String
    public var user: String
    /// From the command's start; nil: no limit.
    public var timeoutSeconds: Double?
    /// Per stream: bytes beyond it are dropped and counted; nil: unlimited.
    public var maxStdoutBytes: UInt64?
    public var maxStderrBytes: UInt64?
    public var hasStdin: Bool
    /// End the VM after this run.
    public var shutdownAfter: Bool
    /// The host's wall clock (CLOCK_REALTIME ns) and fresh bytes from the host's CSPRNG, both
    /// from the supervisor: the agent sets the guest's clock and reseeds its random pool with
    /// them before the command starts, so a guest restored from a snapshot never keeps the
    /// snapshot's clock or shares another restore's random numbers (at most
    /// `AgentProtocol.Limits.entropy` bytes).
    public var hostTimeNanoseconds: UInt64
    public var entropy: [UInt8]

    public var descriptorCount: Int { hasStdin ? 3 : 2 }

    public init(runID: UInt32, arguments: [String], environment: [String] = [], workingDirectory: String = "/",
                user: String = "", timeoutSeconds: Double? = nil, maxStdoutBytes: UInt64? = nil, maxStderrBytes: UInt64? = nil,
                hasStdin: Bool = false, shutdownAfter: Bool = false, hostTimeNanoseconds: UInt64 = 0, entropy: [UInt8] = []) {
        self.runID = runID
        self.arguments = arguments
        self.environment = environment
        self.workingDirectory = workingDirectory
        self.user = user
        self.timeoutSeconds = timeoutSeconds
        self.maxStdoutBytes = maxStdoutBytes
        self.maxStderrBytes = maxStderrBytes
        self.hasStdin = hasStdin
        self.shutdownAfter = shutdownAfter
        self.hostTimeNanoseconds = hostTimeNanoseconds
        self.entropy = entropy
    }

    /// The agent's request for this run.
    public var agentRequest: RunRequest {
        RunRequest(runID: runID, arguments: arguments, environment: environment, workingDirectory: workingDirectory,
                   user: user, hasStdin: hasStdin, shutdownAfter: shutdownAfter,
                   hostTimeNanoseconds: hostTimeNanoseconds, entropy: entropy)
    }
}

/// Where the time of one run went, in milliseconds (the phases of `RunTimings`).
public struct RunPhases: Equatable, Sendable {
    public var vmmStartMs = 0.0, kernelBootMs = 0.0, agentReadyMs = 0.0, commandMs = 0.0, shutdownMs = 0.0, totalMs = 0.0
    public init() {}
}

/// How a run ended, without its output (which went to the run's descriptors).
public struct RunOutcome: Equatable, Sendable {
    public var exitCode: Int32 = 0
    /// The signal that killed the command, if one did.
    public var signal: Int32?
    public var timedOut = false
    /// Bytes the VMM delivered to each stream's descriptor, and bytes it dropped past `maxOutputBytes`.
    public var stdoutBytes: UInt64 = 0, stderrBytes: UInt64 = 0
    public var stdoutDropped: UInt64 = 0, stderrDropped: UInt64 = 0
    /// The last byte delivered on stderr was not a newline (a notice after it needs one first).
    public var stderrEndsMidLine = false
    /// Why the command did not run, or the VM failed during it.
    public var failure: String?
    /// How the VM ended, when the run ended it.
    public var systemEvent: String?
    public var timings = RunPhases()
    public init() {}
}

/// What `booted` reports.
public struct BootReport: Equatable, Sendable {
    /// From the request to the first KVM_RUN, and from it to the agent's hello.
    public var vmmStartMs: Double
    public var kernelBootMs: Double
    /// The agent's own name for itself (its hello; for a restore, the snapshot's name).
    public var agent: String
    /// How the guest kernel runs (`HostProfile.GuestMode`'s raw value): the VMM decides it
    /// at the first instruction, from its own probe of the host's paravirtual interface; a
    /// restored guest runs in the mode its snapshot was made in.
    public var guestMode: String
    /// Restored from the snapshot the boot request named (then `kernelBootMs` is 0), and the
    /// restore's own cost: building the VM from it (KVM objects, RAM mapped, every state set).
    public var restored: Bool
    public var restoreMs: Double
    public init(vmmStartMs: Double, kernelBootMs: Double, agent: String, guestMode: String, restored: Bool = false, restoreMs: Double = 0) {
        self.vmmStartMs = vmmStartMs
        self.kernelBootMs = kernelBootMs
        self.agent = agent
        self.guestMode = guestMode
        self.restored = restored
        self.restoreMs = restoreMs
    }
}

/// Why the VMM could not do what it was asked: the supervisor turns it into its own error type.
public struct SessionFailure: Equatable, Sendable, Error {
    public enum Kind: UInt8, Sendable {
        /// Bad input: names the option or file and what to do.
        case invalidConfiguration = 1
        /// The VMM could not build or run the machine.
        case vmm = 2
        /// The guest did not bring the agent up (`console` has the kernel's last lines).
        case agentDidNotStart = 3
        /// The agent broke its protocol.
        case protocolViolation = 4
        /// The VM had already ended.
        case ended = 5
    }
    public var kind: Kind
    public var message: String
    public var console: String
    /// Whether the VM is gone (the VMM exits after sending this).
    public var vmEnded: Bool
    public init(kind: Kind, message: String, console: String = "", vmEnded: Bool) {
        self.kind = kind
        self.message = message
        self.console = console
        self.vmEnded = vmEnded
    }
}

/// Supervisor to VMM.
public enum SupervisorMessage: Equatable, Sendable {
    case boot(BootRequest)
    case run(RunSpec)
    case signal(runID: UInt32, signal: Int32)
    case shutdown
    case snapshot(SnapshotSave)

    enum Tag: UInt8 { case boot = 1, run = 2, signal = 3, shutdown = 4, snapshot = 5 }

    /// How many descriptors must arrive with this message.
    public var descriptorCount: Int {
        switch self {
        case let .boot(b): return b.descriptorCount
        case let .run(r): return r.descriptorCount
        case .snapshot: return 1
        case .signal, .shutdown: return 0
        }
    }

    public func encoded() -> [UInt8] {
        var w = WireWriter()
        let tag: Tag
        switch self {
        case let .boot(b):
            tag = .boot
            w.u32(b.memoryMiB)
            w.u32(b.cpus)
            w.f64(b.bootTimeoutSeconds)
            w.string(b.kernelCommandLine)
            w.string(b.agentPath)
            w.string(b.hostProfile)
            w.string(b.kernelName)
            w.string(b.rootfsName)
            w.u32(UInt32(b.disks.count))
            for d in b.disks { w.string(d.name); w.bool(d.readOnly) }
            w.bool(b.copyConsoleToStderr)
            w.string(b.logLevel)
            w.u64(b.requestedAt)
            w.optionalString(b.snapshotName)
        case let .run(r):
            tag = .run
            w.u32(r.runID)
            w.strings(r.arguments)
            w.strings(r.environment)
            w.string(r.workingDirectory)
            w.string(r.user)
            w.optionalF64(r.timeoutSeconds)
            for limit in [r.maxStdoutBytes, r.maxStderrBytes] { w.bool(limit != nil); w.u64(limit ?? 0) }
            w.bool(r.hasStdin)
            w.bool(r.shutdownAfter)
            w.u64(r.hostTimeNanoseconds)
            w.data(r.entropy)
        case let .signal(id, signo):
            tag = .signal
            w.u32(id)
            w.i32(signo)
        case .shutdown:
            tag = .shutdown
        case let .snapshot(save):
            tag = .snapshot
            w.string(save.name)
            w.string(save.kernelSHA256)
            w.string(save.rootfsSHA256)
            w.u64(save.createdAt)
        }
        return Frame.encode(type: tag.rawValue, body: w.bytes)
    }

    public static func decode(type: UInt8, body: [UInt8]) throws(ProtocolError) -> SupervisorMessage {
        var r = WireReader(body)
        typealias L = SessionProtocol.Limits
        typealias A = AgentProtocol.Limits
        let message: SupervisorMessage
        switch Tag(rawValue: type) {
        case .boot:
            let memory = try r.u32("memory")
            let cpus = try r.u32("cpus")
            let bootTimeout = try r.f64("boot timeout")
            guard bootTimeout.isFinite, bootTimeout > 0 else { throw .malformed("boot timeout \(bootTimeout) is not a positive number of seconds") }
            let cmdline = try r.string("kernel command line", limit: L.name)
            let agent = try r.string("agent path", limit: L.name)
            let profile = try r.string("host profile", limit: L.name)
            let kernel = try r.string("kernel name", limit: L.name)
            let rootfs = try r.string("rootfs name", limit: L.name)
            let diskCount = try r.u32("disk count")
            guard diskCount <= L.disks else { throw .malformed("\(diskCount) disks, more than the \(L.disks) a VM may have") }
            var disks: [BootRequest.Disk] = []
            for i in 0..<Int(diskCount) {
                disks.append(BootRequest.Disk(name: try r.string("disk \(i) name", limit: L.name), readOnly: try r.bool("disk \(i) read-only")))
            }
            let copy = try r.bool("console copy")
            let level = try r.string("log level", limit: L.name)
            let requestedAt = try r.u64("requested at")
            let snapshot = try r.optionalString("snapshot name", limit: L.name)
            message = .boot(BootRequest(memoryMiB: memory, cpus: cpus, bootTimeoutSeconds: bootTimeout, kernelCommandLine: cmdline,
                                        agentPath: agent, hostProfile: profile, kernelName: kernel, rootfsName: rootfs, disks: disks,
                                        copyConsoleToStderr: copy, logLevel: level, requestedAt: requestedAt, snapshotName: snapshot))
        case .run:
            let id = try r.u32("run id")
            let args = try r.strings("arguments", count: A.arguments, each: A.stringBytes)
            guard !args.isEmpty, !args[0].isEmpty else { throw .malformed("a run with no command") }
            let env = try r.strings("environment", count: A.environment, each: A.stringBytes)
            let cwd = try r.string("working directory", limit: A.stringBytes)
            let user = try r.string("user", limit: A.stringBytes)
            let timeout = try r.optionalF64("timeout")
            if let timeout, !(timeout.isFinite && timeout > 0) { throw .malformed("timeout \(timeout) is not a positive number of seconds") }
            let hasOutLimit = try r.bool("has stdout limit")
            let outLimit = try r.u64("stdout limit")
            let hasErrLimit = try r.bool("has stderr limit")
            let errLimit = try r.u64("stderr limit")
            let hasStdin = try r.bool("has stdin")
            let shutdownAfter = try r.bool("shutdown after")
            let hostTime = try r.u64("host time")
            let entropy = try r.data("entropy", limit: A.entropy)
            message = .run(RunSpec(runID: id, arguments: args, environment: env, workingDirectory: cwd, user: user,
                                   timeoutSeconds: timeout, maxStdoutBytes: hasOutLimit ? outLimit : nil,
                                   maxStderrBytes: hasErrLimit ? errLimit : nil, hasStdin: hasStdin, shutdownAfter: shutdownAfter,
                                   hostTimeNanoseconds: hostTime, entropy: entropy))
        case .signal:
            let id = try r.u32("run id")
            let signo = try r.i32("signal")
            guard (1...64).contains(signo) else { throw .malformed("signal \(signo) is not a Linux signal number") }
            message = .signal(runID: id, signal: signo)
        case .shutdown:
            message = .shutdown
        case .snapshot:
            let name = try r.string("snapshot name", limit: L.name)
            let kernel = try r.string("kernel digest", limit: L.digest)
            let rootfs = try r.string("rootfs digest", limit: L.digest)
            for (what, digest) in [("kernel", kernel), ("rootfs", rootfs)] where !SnapshotSave.isDigest(digest) {
                throw .malformed("the \(what) digest '\(digest)' is not a SHA-256 in lowercase hex")
            }
            message = .snapshot(SnapshotSave(name: name, kernelSHA256: kernel, rootfsSHA256: rootfs, createdAt: try r.u64("created at")))
        case nil:
            throw .malformed("unknown supervisor message type \(type)")
        }
        try r.finish("supervisor message \(type)")
        return message
    }
}

/// VMM to supervisor.
public enum VMMMessage: Equatable, Sendable {
    case hello(version: UInt16)
    case booted(BootReport)
    case started(runID: UInt32)
    case exited(runID: UInt32, RunOutcome)
    case failed(SessionFailure)
    case ended(systemEvent: String?)
    case snapshotSaved(SnapshotSaveReport)

    enum Tag: UInt8 { case hello = 0x81, booted = 0x82, started = 0x83, exited = 0x84, failed = 0x85, ended = 0x86, snapshotSaved = 0x87 }

    public func encoded() -> [UInt8] {
        var w = WireWriter()
        let tag: Tag
        typealias L = SessionProtocol.Limits
        switch self {
        case let .hello(version):
            tag = .hello
            w.u16(version)
        case let .booted(b):
            tag = .booted
            w.f64(b.vmmStartMs)
            w.f64(b.kernelBootMs)
            w.string(Self.clip(b.agent, L.name))
            w.string(Self.clip(b.guestMode, L.name))
            w.bool(b.restored)
            w.f64(b.restoreMs)
        case let .started(id):
            tag = .started
            w.u32(id)
        case let .exited(id, o):
            tag = .exited
            w.u32(id)
            w.i32(o.exitCode)
            w.i32(o.signal ?? 0)
            w.bool(o.timedOut)
            w.u64(o.stdoutBytes); w.u64(o.stderrBytes)
            w.u64(o.stdoutDropped); w.u64(o.stderrDropped)
            w.bool(o.stderrEndsMidLine)
            w.optionalString(o.failure.map { Self.clip($0, L.text) })
            w.optionalString(o.systemEvent.map { Self.clip($0, L.name) })
            let t = o.timings
            for v in [t.vmmStartMs, t.kernelBootMs, t.agentReadyMs, t.commandMs, t.shutdownMs, t.totalMs] { w.f64(v) }
        case let .failed(f):
            tag = .failed
            w.u8(f.kind.rawValue)
            w.string(Self.clip(f.message, L.text))
            w.string(Self.clip(f.console, L.text))
            w.bool(f.vmEnded)
        case let .ended(event):
            tag = .ended
            w.optionalString(event.map { Self.clip($0, L.name) })
        case let .snapshotSaved(s):
            tag = .snapshotSaved
            for v in [s.fileSize, s.allocatedBytes, s.dataPages, s.residentPages, s.totalPages] { w.u64(v) }
            w.f64(s.pausedMs)
            w.f64(s.writeMs)
        }
        return Frame.encode(type: tag.rawValue, body: w.bytes)
    }

    /// The supervisor decodes these from a VMM it does not trust: every length and number is checked.
    public static func decode(type: UInt8, body: [UInt8]) throws(ProtocolError) -> VMMMessage {
        var r = WireReader(body)
        typealias L = SessionProtocol.Limits
        let message: VMMMessage
        switch Tag(rawValue: type) {
        case .hello:
            let version = try r.u16("protocol version")
            guard version == SessionProtocol.version else {
                throw .malformed("the VMM speaks session protocol version \(version), this Airlock speaks \(SessionProtocol.version): use the airlock-vmm built with this Airlock")
            }
            message = .hello(version: version)
        case .booted:
            let start = try r.f64("vmm start")
            let boot = try r.f64("kernel boot")
            let agent = try r.string("agent", limit: L.name)
            let guestMode = try r.string("guest mode", limit: L.name)
            let restored = try r.bool("restored")
            let restore = try Self.duration(try r.f64("restore"), "restore")
            message = .booted(BootReport(vmmStartMs: try Self.duration(start, "vmm start"), kernelBootMs: try Self.duration(boot, "kernel boot"),
                                         agent: agent, guestMode: guestMode, restored: restored, restoreMs: restore))
        case .started:
            message = .started(runID: try r.u32("run id"))
        case .exited:
            let id = try r.u32("run id")
            var o = RunOutcome()
            o.exitCode = try r.i32("exit code")
            let signo = try r.i32("signal")
            guard (0...64).contains(signo) else { throw .malformed("signal \(signo) is not a Linux signal number") }
            o.signal = signo == 0 ? nil : signo
            o.timedOut = try r.bool("timed out")
            o.stdoutBytes = try r.u64("stdout bytes"); o.stderrBytes = try r.u64("stderr bytes")
            o.stdoutDropped = try r.u64("stdout dropped"); o.stderrDropped = try r.u64("stderr dropped")
            o.stderrEndsMidLine = try r.bool("stderr ends mid-line")
            o.failure = try r.optionalString("failure", limit: L.text)
            o.systemEvent = try r.optionalString("system event", limit: L.name)
            var t = RunPhases()
            t.vmmStartMs = try Self.duration(try r.f64("vmm start"), "vmm start")
            t.kernelBootMs = try Self.duration(try r.f64("kernel boot"), "kernel boot")
            t.agentReadyMs = try Self.duration(try r.f64("agent ready"), "agent ready")
            t.commandMs = try Self.duration(try r.f64("command"), "command")
            t.shutdownMs = try Self.duration(try r.f64("shutdown"), "shutdown")
            t.totalMs = try Self.duration(try r.f64("total"), "total")
            o.timings = t
            message = .exited(runID: id, o)
        case .failed:
            let raw = try r.u8("failure kind")
            guard let kind = SessionFailure.Kind(rawValue: raw) else { throw .malformed("unknown failure kind \(raw)") }
            message = .failed(SessionFailure(kind: kind, message: try r.string("failure message", limit: L.text),
                                             console: try r.string("console", limit: L.text), vmEnded: try r.bool("vm ended")))
        case .ended:
            message = .ended(systemEvent: try r.optionalString("system event", limit: L.name))
        case .snapshotSaved:
            var s = SnapshotSaveReport()
            s.fileSize = try r.u64("file size"); s.allocatedBytes = try r.u64("allocated bytes")
            s.dataPages = try r.u64("data pages"); s.residentPages = try r.u64("resident pages"); s.totalPages = try r.u64("total pages")
            guard s.dataPages <= s.residentPages, s.residentPages <= s.totalPages else {
                throw .malformed("a snapshot of \(s.totalPages) pages with \(s.residentPages) resident and \(s.dataPages) written does not add up")
            }
            s.pausedMs = try Self.duration(try r.f64("paused"), "paused")
            s.writeMs = try Self.duration(try r.f64("write"), "write")
            message = .snapshotSaved(s)
        case nil:
            throw .malformed("unknown VMM message type 0x\(String(type, radix: 16))")
        }
        try r.finish("VMM message 0x\(String(type, radix: 16))")
        return message
    }

    /// A duration in ms: finite and not negative.
    static func duration(_ v: Double, _ what: String) throws(ProtocolError) -> Double {
        guard v.isFinite, v >= 0 else { throw .malformed("\(what) time \(v) ms is not a duration") }
        return v
    }

    /// At most `limit` bytes of UTF-8, cut at a character boundary.
    static func clip(_ s: String, _ limit: Int) -> String {
        guard s.utf8.count > limit else { return s }
        var out = ""
        for c in s {
            if out.utf8.count + c.utf8.count > limit { break }
            out.append(c)
        }
        return out
    }
}

extension SnapshotSave {
    /// 64 lowercase hex digits.
    public static func isDigest(_ s: String) -> Bool {
        s.utf8.count == 64 && s.utf8.allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
    }
}

extension WireWriter {
    mutating func f64(_ v: Double) { u64(v.bitPattern) }
    mutating func optionalF64(_ v: Double?) { bool(v != nil); f64(v ?? 0) }
    mutating func optionalString(_ v: String?) { bool(v != nil); string(v ?? "") }
}

extension WireReader {
    mutating func f64(_ what: String) throws(ProtocolError) -> Double { Double(bitPattern: try u64(what)) }
    mutating func optionalF64(_ what: String) throws(ProtocolError) -> Double? {
        let present = try bool("\(what) present")
        let v = try f64(what)
        return present ? v : nil
    }
    mutating func optionalString(_ what: String, limit: Int) throws(ProtocolError) -> String? {
        let present = try bool("\(what) present")
        let v = try string(what, limit: limit)
        return present ? v : nil
    }
}

/// The host-guest protocol between Airlock's VMM and `airlock-init`.
///
/// It runs over the control port of a virtio-console ("airlock.control");
/// the command's stdout and stderr go raw over their own ports
/// ("airlock.stdout", "airlock.stderr") so that they stream without framing
/// and keep their order within each stream. Stdin travels in `stdin` frames
/// on the control port, tagged with its run, so that EOF is a message and
/// bytes a command left unread can never leak into the next run.
///
/// A session: the agent sends `hello` (its protocol version) as soon as the
/// control port is open; the host answers with `run`; the agent sends
/// `started`, then `exited` (or `runFailed` when the command could not be
/// started) once the command has ended and its output has been written to the
/// ports. `exited` carries the cumulative byte counts of both output ports so
/// the host can wait until it has received all of it. `signal` during a run is
/// delivered to the command's process group. With `shutdownAfter` the
/// agent syncs and reboots after that run; otherwise it waits for the next
/// `run` or a `shutdown`.
public enum AgentProtocol {
    /// Bumped whenever a message's layout changes. `hello` keeps its layout forever.
    /// 2: `run` carries the host's clock and entropy for the guest's pool (snapshots), which
    /// an agent of version 1 refuses as trailing bytes: the host names the image to rebuild.
    public static let version: UInt16 = 2

    public static let controlPortName = "airlock.control"
    public static let stdoutPortName = "airlock.stdout"
    public static let stderrPortName = "airlock.stderr"
    /// Port order on the console device; the guest finds them by name.
    public static let portNames = [controlPortName, stdoutPortName, stderrPortName]

    /// Limits both sides enforce when decoding.
    public enum Limits {
        public static let arguments = 4096
        public static let environment = 4096
        public static let stringBytes = 128 << 10
        public static let stdinChunk = 64 << 10
        public static let messageText = 4096
        /// Random bytes a run request may carry for the guest's pool.
        public static let entropy = 512
    }
}

/// What the host asks the agent to run.
public struct RunRequest: Equatable, Sendable {
    public var runID: UInt32
    /// argv; argv[0] is looked up in the command's PATH when it has no slash.
    public var arguments: [String]
    /// "NAME=value" entries: the whole environment of the command.
    public var environment: [String]
    public var workingDirectory: String
    /// "" (root), a name, a uid, or user:group with either part a name or a number.
    public var user: String
    /// Whether stdin frames follow; without, the command's stdin is /dev/null.
    public var hasStdin: Bool
    /// Sync the disks and reboot once this run has been reported.
    public var shutdownAfter: Bool
    /// The host's wall clock (CLOCK_REALTIME, ns since the epoch) as it sent
    /// the request, or 0: the agent moves the guest's clock to it before the
    /// command starts. A guest restored from a snapshot wakes with the clock
    /// of the moment it was saved, and a fresh one with no clock at all.
    public var hostTimeNanoseconds: UInt64
    /// Bytes from the host's CSPRNG (at most `Limits.entropy`): the agent mixes
    /// them into the guest kernel's pool and reseeds it before the command
    /// starts, so two VMs restored from one snapshot (which wake with the same
    /// pool) never hand out the same random numbers.
    public var entropy: [UInt8]

    public init(runID: UInt32, arguments: [String], environment: [String], workingDirectory: String,
                user: String, hasStdin: Bool, shutdownAfter: Bool, hostTimeNanoseconds: UInt64 = 0, entropy: [UInt8] = []) {
        self.runID = runID
        self.arguments = arguments
        self.environment = environment
        self.workingDirectory = workingDirectory
        self.user = user
        self.hasStdin = hasStdin
        self.shutdownAfter = shutdownAfter
        self.hostTimeNanoseconds = hostTimeNanoseconds
        self.entropy = entropy
    }
}

extension RunRequest {
    /// Why the agent would refuse this request (a limit its decoder enforces, or
    /// the frame size), or nil when it fits. The host asks before it sends, so
    /// an oversized command is an error for its caller, not a refused frame.
    public var limitProblem: String? {
        typealias L = AgentProtocol.Limits
        if arguments.count > L.arguments {
            return "\(arguments.count) arguments are more than the \(L.arguments) a command may have"
        }
        if environment.count > L.environment {
            return "\(environment.count) environment variables are more than the \(L.environment) a command may have"
        }
        let strings = [("an argument", arguments), ("an environment variable", environment),
                       ("the working directory", [workingDirectory]), ("the user", [user])]
        for (what, values) in strings {
            if let long = values.first(where: { $0.utf8.count > L.stringBytes }) {
                return "\(what) of \(long.utf8.count) bytes is longer than the \(L.stringBytes) bytes one may have"
            }
        }
        let size = HostMessage.run(self).tagAndBody().1.count
        if size + 1 > Frame.maxLength {
            return "the command, its arguments and environment take \(size) bytes, more than the \(Frame.maxLength - 1) one run request may hold"
        }
        return nil
    }
}

/// How a command ended.
public enum CommandStatus: Equatable, Sendable {
    case exited(Int32)
    case signaled(Int32)
}

/// Why a command never ran.
public enum RunFailure: UInt8, Equatable, Sendable {
    /// No such file in PATH or at the path (the shell's 127).
    case commandNotFound = 1
    /// Found but not executable, or exec refused it (the shell's 126).
    case notExecutable = 2
    /// The user, group or working directory could not be set up.
    case setup = 3
}

/// Host to guest.
public enum HostMessage: Equatable, Sendable {
    case run(RunRequest)
    case stdin(runID: UInt32, data: [UInt8])
    case stdinEOF(runID: UInt32)
    case shutdown
    /// Deliver `signal` to the run's command (its process group), if it is still running.
    case signal(runID: UInt32, signal: Int32)

    enum Tag: UInt8 { case run = 1, stdin = 2, stdinEOF = 3, shutdown = 4, signal = 5 }

    public func encoded() -> [UInt8] {
        let (tag, body) = tagAndBody()
        return Frame.encode(type: tag.rawValue, body: body)
    }

    func tagAndBody() -> (Tag, [UInt8]) {
        var w = WireWriter()
        let tag: Tag
        switch self {
        case let .run(r):
            tag = .run
            w.u32(r.runID)
            w.strings(r.arguments)
            w.strings(r.environment)
            w.string(r.workingDirectory)
            w.string(r.user)
            w.bool(r.hasStdin)
            w.bool(r.shutdownAfter)
            // Added in version 2, at the end (a body without them still decodes).
            w.u64(r.hostTimeNanoseconds)
            w.data(r.entropy)
        case let .stdin(id, data):
            tag = .stdin
            w.u32(id)
            w.data(data)
        case let .stdinEOF(id):
            tag = .stdinEOF
            w.u32(id)
        case .shutdown:
            tag = .shutdown
        case let .signal(id, signo):
            tag = .signal
            w.u32(id)
            w.i32(signo)
        }
        return (tag, w.bytes)
    }

    public static func decode(type: UInt8, body: [UInt8]) throws(ProtocolError) -> HostMessage {
        var r = WireReader(body)
        let message: HostMessage
        typealias L = AgentProtocol.Limits
        switch Tag(rawValue: type) {
        case .run:
            let id = try r.u32("run id")
            let args = try r.strings("arguments", count: L.arguments, each: L.stringBytes)
            guard !args.isEmpty else { throw .malformed("a run request with no arguments") }
            let env = try r.strings("environment", count: L.environment, each: L.stringBytes)
            let cwd = try r.string("working directory", limit: L.stringBytes)
            let user = try r.string("user", limit: L.stringBytes)
            let hasStdin = try r.bool("has stdin")
            let shutdownAfter = try r.bool("shutdown after")
            var clock: UInt64 = 0, entropy: [UInt8] = []
            if r.remaining > 0 {
                clock = try r.u64("host time")
                entropy = try r.data("entropy", limit: L.entropy)
            }
            message = .run(RunRequest(runID: id, arguments: args, environment: env, workingDirectory: cwd,
                                      user: user, hasStdin: hasStdin, shutdownAfter: shutdownAfter,
                                      hostTimeNanoseconds: clock, entropy: entropy))
        case .stdin:
            let id = try r.u32("run id")
            message = .stdin(runID: id, data: try r.data("stdin chunk", limit: L.stdinChunk))
        case .stdinEOF:
            message = .stdinEOF(runID: try r.u32("run id"))
        case .shutdown:
            message = .shutdown
        case .signal:
            let id = try r.u32("run id")
            let signo = try r.i32("signal")
            guard (1...64).contains(signo) else { throw .malformed("signal \(signo) is not a Linux signal number") }
            message = .signal(runID: id, signal: signo)
        case nil:
            throw .malformed("unknown host message type \(type)")
        }
        try r.finish("host message \(type)")
        return message
    }
}

/// Guest to host.
public enum GuestMessage: Equatable, Sendable {
    case hello(version: UInt16, agent: String)
    case started(runID: UInt32, pid: UInt32)
    /// The byte counts are cumulative over the session, per port, up to and including this run.
    case exited(runID: UInt32, status: CommandStatus, stdoutBytes: UInt64, stderrBytes: UInt64)
    case runFailed(runID: UInt32, reason: RunFailure, message: String, stdoutBytes: UInt64, stderrBytes: UInt64)

    enum Tag: UInt8 { case hello = 0x81, started = 0x82, exited = 0x83, runFailed = 0x84 }

    public func encoded() -> [UInt8] {
        var w = WireWriter()
        let tag: Tag
        switch self {
        case let .hello(version, agent):
            tag = .hello
            w.u16(version)
            w.string(agent)
        case let .started(id, pid):
            tag = .started
            w.u32(id)
            w.u32(pid)
        case let .exited(id, status, out, err):
            tag = .exited
            w.u32(id)
            switch status {
            case let .exited(code): w.u8(0); w.i32(code)
            case let .signaled(sig): w.u8(1); w.i32(sig)
            }
            w.u64(out)
            w.u64(err)
        case let .runFailed(id, reason, text, out, err):
            tag = .runFailed
            w.u32(id)
            w.u8(reason.rawValue)
            w.string(String(decoding: text.utf8.prefix(AgentProtocol.Limits.messageText), as: UTF8.self))
            w.u64(out)
            w.u64(err)
        }
        return Frame.encode(type: tag.rawValue, body: w.bytes)
    }

    public static func decode(type: UInt8, body: [UInt8]) throws(ProtocolError) -> GuestMessage {
        var r = WireReader(body)
        let message: GuestMessage
        switch Tag(rawValue: type) {
        case .hello:
            let version = try r.u16("protocol version")
            // Only the version is read before it is checked: a newer agent may add fields.
            guard version == AgentProtocol.version else { throw .versionMismatch(theirs: version, ours: AgentProtocol.version) }
            message = .hello(version: version, agent: try r.string("agent name", limit: AgentProtocol.Limits.messageText))
        case .started:
            message = .started(runID: try r.u32("run id"), pid: try r.u32("pid"))
        case .exited:
            let id = try r.u32("run id")
            let kind = try r.u8("status kind")
            let value = try r.i32("status value")
            let status: CommandStatus
            switch kind {
            case 0: status = .exited(value)
            case 1:
                guard (1...64).contains(value) else { throw .malformed("signal \(value) is not a Linux signal number") }
                status = .signaled(value)
            default: throw .malformed("status kind \(kind) is neither exited (0) nor signaled (1)")
            }
            message = .exited(runID: id, status: status, stdoutBytes: try r.u64("stdout bytes"), stderrBytes: try r.u64("stderr bytes"))
        case .runFailed:
            let id = try r.u32("run id")
            let raw = try r.u8("failure reason")
            guard let reason = RunFailure(rawValue: raw) else { throw .malformed("unknown run failure reason \(raw)") }
            let text = try r.string("failure message", limit: AgentProtocol.Limits.messageText)
            message = .runFailed(runID: id, reason: reason, message: text,
                                 stdoutBytes: try r.u64("stdout bytes"), stderrBytes: try r.u64("stderr bytes"))
        case nil:
            throw .malformed("unknown guest message type 0x\(String(type, radix: 16))")
        }
        if case .hello = message {} else { try r.finish("guest message 0x\(String(type, radix: 16))") }
        return message
    }
}

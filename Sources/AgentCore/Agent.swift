import AgentProtocol
import CAgentShim
import Glibc

/// The guest's PID 1 when Airlock runs a command: mounts the basics, finds the
/// agent ports, says hello, runs what the host asks, reports, syncs, reboots.
///
/// Single-threaded on purpose: one poll loop over the control port, the
/// command's pipes, the output ports and a signalfd for SIGCHLD, so there is
/// no locking in PID 1 and nothing the kernel would have to schedule twice.
public final class Agent {
    public static let name = "airlock-init"

    /// Stdin the command has not read yet, held before the agent stops reading
    /// the control port (and so, through virtio, makes the host wait).
    static let stdinBufferLimit = 1 << 20
    /// How long the ports may take to appear after boot (they are announced by
    /// the host over the console's control queue, asynchronously to init).
    static let portWaitMilliseconds = 30_000
    /// After the command exits, how long its leftover output may take to drain.
    static let drainMilliseconds = 5_000

    /// Disks mounted at start (unmounted, after a sync, at power-off), and the
    /// mounts that failed: while any did, every run is refused with the reason.
    /// Set once by `main` before anything else runs; PID 1 is single-threaded.
    nonisolated(unsafe) static var mountedDisks: [GuestMount] = []
    nonisolated(unsafe) static var mountFailures: [String] = []
    /// Mount target to the uid its tree was last given to (`DiskMounts.give`).
    var givenTrees: [String: UInt32] = [:]

    let control: Int32
    let stdoutPort: Int32
    let stderrPort: Int32
    let signals: Int32
    var decoder = FrameDecoder()
    /// Reused for every read of the control port (one per stdin frame during a run).
    var controlBuffer = [UInt8](repeating: 0, count: 64 << 10)
    var inbox: [HostMessage] = []
    var stdoutTotal: UInt64 = 0
    var stderrTotal: UInt64 = 0

    init(control: Int32, stdoutPort: Int32, stderrPort: Int32, signals: Int32) {
        self.control = control
        self.stdoutPort = stdoutPort
        self.stderrPort = stderrPort
        self.signals = signals
    }

    /// PID 1's whole life. Never returns: the guest ends with a reboot.
    public static func main() -> Never {
        signal(SIGPIPE, SIG_IGN)
        var chld = sigset_t()
        sigemptyset(&chld)
        sigaddset(&chld, SIGCHLD)
        sigprocmask(SIG_BLOCK, &chld, nil)
        let signals = signalfd(-1, &chld, Int32(SFD_CLOEXEC | SFD_NONBLOCK))
        // Without it no child's exit would ever be seen: say so and end the VM.
        guard signals >= 0 else {
            console("signalfd: \(Sys.errorText(errno)); cannot watch the command")
            powerOff()
        }

        Mounts.setUp()
        let disks = DiskMounts.setUp()
        mountedDisks = disks.mounted
        mountFailures = disks.failures
        let agent: Agent
        switch Ports.open(waitMilliseconds: portWaitMilliseconds) {
        case let .success(p):
            agent = Agent(control: p.control, stdoutPort: p.stdout, stderrPort: p.stderr, signals: signals)
        case let .failure(e):
            console("\(e)")
            powerOff()
        }
        agent.serve()
        powerOff()
    }

    /// Writes a line on the kernel console (PID 1's stderr), where `airlock boot` and crash reports show it.
    static func console(_ text: String) {
        Sys.writeAll(2, Array("\(name): \(text)\n".utf8))
    }

    /// Kills what is left, flushes the disks and reboots: with reboot=k the
    /// VMM sees an i8042 reset, which is how an Airlock guest says it is done.
    static func powerOff() -> Never {
        kill(-1, SIGKILL)
        // Let the killed exit (and close their files) before the disks are unmounted.
        let deadline = Sys.monotonicMilliseconds() + 200
        while Sys.monotonicMilliseconds() < deadline {
            var status: Int32 = 0
            let pid = waitpid(-1, &status, WNOHANG)
            if pid < 0 && errno == ECHILD { break }
            if pid <= 0 { Sys.sleep(milliseconds: 2) }
        }
        sync()
        DiskMounts.tearDown(mountedDisks)
        reboot(RB_AUTOBOOT)
        // reboot only returns on failure (no CAP_SYS_BOOT cannot happen for PID 1):
        // exiting PID 1 panics the kernel, and panic=-1 reboots it, which ends the VM too.
        console("reboot failed: \(Sys.errorText(errno))")
        exit(1)
    }

    func send(_ message: GuestMessage) -> Bool {
        Sys.writeAll(control, message.encoded())
    }

    /// Serves runs until one asks to shut down, the host sends `shutdown`, or the channel breaks.
    func serve() {
        guard send(.hello(version: AgentProtocol.version, agent: "\(Self.name) \(AgentProtocol.version)")) else {
            Self.console("cannot write to the control port: \(Sys.errorText(errno))")
            return
        }
        while true {
            guard let message = nextMessage(blocking: true) else { return }
            switch message {
            case let .run(request):
                let stop = execute(request)
                if request.shutdownAfter || stop { return }
            case .shutdown:
                return
            case .stdin, .stdinEOF, .signal:
                continue  // for a run that has ended: its unread stdin and late signals are dropped here
            }
        }
    }

    /// The next host message; nil when the channel is broken (reported on the console).
    func nextMessage(blocking: Bool) -> HostMessage? {
        while true {
            if !inbox.isEmpty { return inbox.removeFirst() }
            if !blocking { return nil }
            var p = pollfd(fd: control, events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, -1)
            if r < 0 && errno != EINTR { Self.console("poll on the control port: \(Sys.errorText(errno))"); return nil }
            guard readControl() else { return nil }
            if inbox.isEmpty && p.revents & Int16(POLLHUP) != 0 { Sys.sleep(milliseconds: 10) }
        }
    }

    /// Reads what the control port has and decodes whole frames into the inbox.
    /// False when the stream is broken: a malformed frame cannot be skipped.
    func readControl() -> Bool {
        let n = controlBuffer.withUnsafeMutableBytes { read(control, $0.baseAddress, $0.count) }
        if n < 0 {
            if errno == EAGAIN || errno == EINTR { return true }
            Self.console("reading the control port: \(Sys.errorText(errno))")
            return false
        }
        decoder.feed(controlBuffer[0..<n])
        do {
            while let frame = try decoder.next() {
                inbox.append(try HostMessage.decode(type: frame.type, body: frame.body))
            }
        } catch {
            Self.console("the host sent \(error); shutting down")
            return false
        }
        return true
    }

    /// Runs one command to its end and reports it. Returns true when the agent must stop (channel broken).
    func execute(_ request: RunRequest) -> Bool {
        // Before anything of the command runs: the host's time, fresh randomness.
        for problem in Freshness.apply(request, clock: SystemWallClock(), addEntropy: Freshness.addKernelEntropy) {
            Self.console(problem)
        }
        switch prepare(request) {
        case let .failure(error):
            return !send(.runFailed(runID: request.runID, reason: error.failure, message: error.description,
                                    stdoutBytes: stdoutTotal, stderrBytes: stderrTotal))
        case let .success(run):
            guard send(.started(runID: request.runID, pid: UInt32(run.pid))) else { return true }
            var run = run
            let broken = pump(&run)
            let status = run.status ?? .signaled(SIGKILL)
            return !send(.exited(runID: request.runID, status: status, stdoutBytes: stdoutTotal, stderrBytes: stderrTotal)) || broken
        }
    }

    /// Resolves the user, environment and executable, makes the pipes and starts the command.
    func prepare(_ request: RunRequest) -> Result<RunningCommand, AgentError> {
        if !Self.mountFailures.isEmpty {
            return .failure(.setup("the disks the host attached could not all be mounted: \(Self.mountFailures.joined(separator: "; "))"))
        }
        let passwd = Accounts.parsePasswd(Sys.readFile("/etc/passwd") ?? "")
        let groups = Accounts.parseGroup(Sys.readFile("/etc/group") ?? "")
        let creds: Credentials
        switch Accounts.resolve(request.user, passwd: passwd, groups: groups) {
        case let .success(c): creds = c
        case let .failure(e): return .failure(.setup(e.description))
        }
        if creds.uid != 0, let problem = DiskMounts.give(Self.mountedDisks, to: creds, done: &givenTrees) {
            return .failure(.setup("the workspace could not be given to --user '\(request.user)' (uid \(creds.uid)): \(problem)"))
        }
        let cwd = request.workingDirectory.isEmpty ? "/" : request.workingDirectory
        guard Sys.isDirectory(cwd) else {
            return .failure(.setup("--workdir '\(cwd)' is not a directory in the guest: create it in the image or pick an existing one"))
        }
        let env = CommandLookup.environment(request.environment, home: creds.home)
        let path: String
        switch CommandLookup.resolve(request.arguments[0], path: CommandLookup.searchPath(in: env),
                                     workingDirectory: cwd, kind: Sys.pathKind) {
        case let .success(p): path = p
        case let .failure(e): return .failure(e)
        }

        var stdinPipe: [Int32] = [-1, -1], outPipe: [Int32] = [-1, -1], errPipe: [Int32] = [-1, -1]
        var opened: [Int32] = []
        defer { for fd in opened { close(fd) } }  // the child's ends; ours are moved out below
        if request.hasStdin {
            guard airlock_pipe_cloexec(&stdinPipe) == 0 else { return .failure(.setup("pipe: \(Sys.errorText(errno))")) }
        } else {
            stdinPipe[0] = open("/dev/null", O_RDONLY | O_CLOEXEC)
        }
        guard airlock_pipe_cloexec(&outPipe) == 0, airlock_pipe_cloexec(&errPipe) == 0, stdinPipe[0] >= 0 else {
            for fd in stdinPipe + outPipe + errPipe where fd >= 0 { close(fd) }
            return .failure(.setup("cannot create the command's pipes: \(Sys.errorText(errno))"))
        }
        opened = [stdinPipe[0], outPipe[1], errPipe[1]]

        var stage: Int32 = 0, error: Int32 = 0
        let pid: pid_t = Sys.withCStrings(request.arguments) { argv in
            Sys.withCStrings(env) { envp in
                creds.groups.map { gid_t($0) }.withUnsafeBufferPointer { groupList in
                    path.withCString { cPath in
                        cwd.withCString { cCwd in
                            var spec = airlock_spawn_spec(
                                path: cPath, argv: argv, envp: envp, cwd: cCwd, set_ids: 1,
                                uid: creds.uid, gid: creds.gid, groups: groupList.baseAddress, group_count: groupList.count,
                                stdin_fd: stdinPipe[0], stdout_fd: outPipe[1], stderr_fd: errPipe[1])
                            return airlock_spawn(&spec, &stage, &error)
                        }
                    }
                }
            }
        }
        guard pid > 0 else {
            for fd in [stdinPipe[1], outPipe[0], errPipe[0]] where fd >= 0 { close(fd) }
            return .failure(Self.spawnError(stage: stage, errno: error, request: request, creds: creds, path: path))
        }
        for fd in [stdinPipe[1], outPipe[0], errPipe[0]] where fd >= 0 { Sys.setNonBlocking(fd) }
        return .success(RunningCommand(runID: request.runID, pid: pid, stdinFD: stdinPipe[1],
                                       stdoutFD: outPipe[0], stderrFD: errPipe[0]))
    }

    static func spawnError(stage: Int32, errno e: Int32, request: RunRequest, creds: Credentials, path: String) -> AgentError {
        let why = Sys.errorText(e)
        switch UInt32(stage) {
        case AIRLOCK_SPAWN_EXEC.rawValue:
            // ENOENT from exec of a file that exists: its interpreter (#!) or loader is missing.
            if e == ENOENT { return .commandNotFound("\(request.arguments[0]): \(path) or its interpreter is missing in the guest (\(why))") }
            return .notExecutable("\(request.arguments[0]): cannot execute \(path): \(why)")
        case AIRLOCK_SPAWN_CHDIR.rawValue:
            return .setup("--workdir '\(request.workingDirectory)' cannot be entered as uid \(creds.uid): \(why)")
        case AIRLOCK_SPAWN_UID.rawValue, AIRLOCK_SPAWN_GID.rawValue, AIRLOCK_SPAWN_GROUPS.rawValue:
            return .setup("--user '\(request.user)' (uid \(creds.uid), gid \(creds.gid)) cannot be set: \(why)")
        default:
            return .setup("cannot start \(request.arguments[0]): \(why) (step \(stage))")
        }
    }
}

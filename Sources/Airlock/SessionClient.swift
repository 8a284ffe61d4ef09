import AgentProtocol
import AirlockOS
import Dispatch
import Jailer
import KVM
import Logging
import SessionProtocol
import Snapshot
import Synchronization
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// The supervisor's side of one VMM: starts it (jailed, or in-process for debugging), and
/// drives its session (SessionProtocol.swift): boot, runs, signals, shutdown. Every caller
/// of a sandbox (the `Sandbox` API, the CLI) goes through this one type.
///
/// The VMM is not trusted: every frame it sends is bounded and decoded with checks, a VMM
/// that sends a descriptor, breaks a frame, answers out of turn, stops reading, or dies is
/// ended and reported, and nothing of it (process, jail, cgroup, descriptors) stays behind.
/// Methods block (they wait on the VM) and are called from one thread at a time, except
/// `signal` and `terminate`, which may come from anywhere.
final class SessionClient: @unchecked Sendable {
    // @unchecked: `nextRunID` and `report` are touched only under `busy`; the rest is in Mutexes.
    let channel: SessionChannel
    let host: VMMHost
    let logger: Logger
    let config: SandboxConfig
    private let busy = DispatchSemaphore(value: 1)
    private var nextRunID: UInt32 = 1
    private let state = Mutex(State())
    /// The boot's timings, reported with the first run.
    private(set) var bootReport: BootReport?
    /// What the VM booted from: the images (the caller's paths), the host profile, and the
    /// snapshot it was restored from (nil: it booted), with what checking that took.
    let kernelPath: String, rootfsPath: String
    let hostProfile: HostProfile
    let restoredFrom: SnapshotUse?
    /// The host's wall clock for each run request (the agent sets the guest's clock to it); tests fake it.
    nonisolated(unsafe) var hostTime: @Sendable () -> UInt64 = SessionClient.realtimeNanoseconds

    struct State {
        var ended = false
        var systemEvent: String?
        /// The run in progress, for `signal`.
        var currentRun: UInt32?
        var terminated = false
        var reaped: VMMEnd?
    }

    /// How long the supervisor gives a VMM beyond the bounds the VMM enforces itself, before it
    /// counts it as hung: to enter its jail and say hello, to boot (beyond the boot timeout), to
    /// start and finish a run (beyond the run's own timeout and the output drain), and to exit
    /// once the VM has ended. A VMM that stops reading the socket for `send` seconds is stuck too.
    struct Margins: Sendable {
        var hello = 30.0, boot = 60.0, run = 60.0, exit = 30.0
        var send = 30
    }
    /// Tests shorten these to exercise hung VMMs quickly.
    nonisolated(unsafe) static var margins = Margins()
    /// What the VMM allows for output after the command's exit report, and for a reboot.
    static let drainSeconds = 30.0, rebootSeconds = 60.0

    private init(channel: SessionChannel, host: VMMHost, config: SandboxConfig, logger: Logger, kernelPath: String, rootfsPath: String,
                 hostProfile: HostProfile, restoredFrom: SnapshotUse?) {
        self.channel = channel
        self.host = host
        self.config = config
        self.logger = logger
        self.kernelPath = kernelPath
        self.rootfsPath = rootfsPath
        self.hostProfile = hostProfile
        self.restoredFrom = restoredFrom
    }

    static func realtimeNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(max(0, ts.tv_sec)) * 1_000_000_000 + UInt64(max(0, ts.tv_nsec))
    }

    deinit {
        if !state.withLock({ $0.ended }) { host.terminate() }
        if state.withLock({ $0.reaped }) == nil { _ = host.reap(seconds: 5) }
    }

    /// Validates `config`, opens what the VM boots from, starts the VMM and boots the VM to
    /// its agent's hello. `stop` can end it from another thread from the moment the VMM exists.
    /// With `snapshot` (opened and checked whole by the caller, before any VM), the VM is
    /// restored from it instead of booted: its descriptor goes with the boot request.
    static func boot(_ config: SandboxConfig, requestedAt: UInt64, logger: Logger, stop: StopHandle = StopHandle(),
                     snapshot: CheckedSnapshot? = nil) throws(SandboxError) -> SessionClient {
        let images = try ImageResolution.resolve(config)
        let disks = try DiskFiles.open(config.disks)  // the workspace and --disk images (BuildStep.swift)
        if snapshot != nil && !config.disks.isEmpty {
            throw .invalidConfiguration("a sandbox with disks (a workspace or --disk) cannot be restored from a snapshot: a snapshot holds no disks; boot it cold")
        }
        try HostMemory.check(guestMiB: config.memoryMiB)
        let profile = config.effectiveHostProfile  // here, outside the jail: it has no /sys
        let (ours, theirs): (UnixSocket, UnixSocket)
        do { (ours, theirs) = try UnixSocket.pair() } catch { throw .vmm("cannot create the session socket: \(error)") }
        do { try ours.setSendTimeout(seconds: margins.send) } catch { throw .vmm("\(error)") }
        // A booted sandbox without disks may be saved as a snapshot: the save file then is the
        // only regular file its VMM can write (outputs are pipes), and RLIMIT_FSIZE must let
        // it hold the whole RAM image. A restored one is never saved and keeps the disks' bound.
        var writable = disks.writableBytes
        if snapshot == nil && config.disks.isEmpty {
            writable = max(writable, SnapshotFormat.maximumFileSize(memoryBytes: UInt64(config.memoryMiB) << 20))
        }
        // The VMM's end must not stay open here as well: its EOF is how a VMM's death shows.
        let host = try launch(config, socket: consume theirs, writableBytes: writable, logger: logger)
        let client = SessionClient(channel: SessionChannel(socket: ours), host: host, config: config, logger: logger,
                                   kernelPath: images.kernelName, rootfsPath: images.rootfsName, hostProfile: profile,
                                   restoredFrom: snapshot.map { SnapshotUse(path: $0.file.path, restored: true, checkMs: $0.checkMs,
                                                                            allocatedBytes: $0.allocatedBytes) })
        stop.set(client)
        try client.start(images: images, disks: disks, profile: profile, requestedAt: requestedAt, snapshot: snapshot?.file)
        return client
    }

    /// Starts the VMM on its end of the session socket (the caller keeps none of it).
    private static func launch(_ config: SandboxConfig, socket theirs: consuming UnixSocket, writableBytes: UInt64,
                               logger: Logger) throws(SandboxError) -> VMMHost {
        let host: VMMHost
        switch config.isolation {
        case .jailed:
            var arguments = ["--log-level", config.vmmLogLevel.rawValue]
            #if DEBUG
            if let v = config.testViolation { arguments += ["--test-violation", v] }
            #endif
            host = try JailedVMM.launch(
                executable: try VMMJail.executable(config.vmmExecutable), arguments: arguments, socket: theirs,
                limits: CgroupLimits(memoryBytes: (UInt64(config.memoryMiB) << 20) + VMMJail.memoryAllowance, tasks: 64,
                                     cpus: Double(config.cpus) + VMMJail.cpuAllowance),
                writableBytes: writableBytes, stderr: config.consoleFD ?? 2, tag: config.jailTag, logger: logger)
        case .unjailed:
            host = try InProcessVMM(socket: theirs, logger: Logger(label: "airlock.vmm"))
        }
        return host
    }

    private func start(images: ImageResolution.Images, disks: DiskFiles, profile: HostProfile, requestedAt: UInt64,
                       snapshot: SnapshotFile?) throws(SandboxError) {
        busy.wait()
        defer { busy.signal() }
        switch try receive(until: Self.deadline(after: Self.margins.hello), while: "starting") {
        case .hello: break
        case let other: throw lost("sent \(other.name) before its hello")
        }
        let request = BootRequest(
            memoryMiB: UInt32(config.memoryMiB), cpus: UInt32(config.cpus), bootTimeoutSeconds: config.bootTimeoutSeconds,
            kernelCommandLine: [config.extraKernelCommandLine, disks.commandLine].filter { !$0.isEmpty }.joined(separator: " "),
            agentPath: config.agentPath, hostProfile: profile.wireName,
            kernelName: images.kernelName, rootfsName: images.rootfsName, disks: disks.request, copyConsoleToStderr: config.consoleFD != nil,
            logLevel: config.vmmLogLevel.rawValue, requestedAt: requestedAt, snapshotName: snapshot?.path)
        try send(.boot(request), descriptors: [images.kvm.fileDescriptor, images.kernel.rawValue, images.rootfs.rawValue]
                    + disks.files.map(\.rawValue) + (snapshot.map { [$0.file.rawValue] } ?? []),
                 while: snapshot == nil ? "booting" : "restoring")
        // A margin over the VMM's own boot timeout: it reports that itself.
        switch try receive(until: Self.deadline(after: config.bootTimeoutSeconds + Self.margins.boot), while: "booting") {
        case let .booted(report):
            guard report.restored == (snapshot != nil) else {
                throw lost(snapshot == nil ? "reported a restore it was not asked for" : "booted instead of restoring")
            }
            // Reported, never acted on; still only one of the names this build knows goes into a receipt.
            guard HostProfile.GuestMode(rawValue: report.guestMode) != nil else {
                throw lost("reported an unknown guest mode '\(report.guestMode)'")
            }
            bootReport = report
        case let .failed(failure):
            throw finish(failure)
        case let other:
            throw lost("sent \(other.name) instead of booting")
        }
    }

    // MARK: - Runs

    /// Runs one validated command and waits for its end; with `shutdownAfter` the VM ends after it.
    func run(_ command: Command, shutdownAfter: Bool) throws(SandboxError) -> RunResult {
        busy.wait()
        defer { busy.signal() }
        if let ended = endedDescription { throw .ended("the sandbox has ended: \(ended)") }
        let runID = nextRunID
        nextRunID &+= 1
        let first = runID == 1

        let out = try OutputRoute(command.stdout, limit: command.maxOutputBytes, stream: "stdout", logger: logger)
        let err = try OutputRoute(command.stderr, limit: command.maxOutputBytes, stream: "stderr", logger: logger)
        let input = try InputRoute(command.stdin, logger: logger)
        // The host's time and fresh randomness go with every request: a restored guest wakes
        // with the snapshot's clock and random pool (and a fresh one with no wall clock at all).
        let entropy: [UInt8]
        do { entropy = try Machine.hostRandomBytes(32) } catch { throw .vmm("cannot draw random bytes for the guest: \(error)") }
        let spec = RunSpec(runID: runID, arguments: command.arguments,
                           environment: command.environment.map { "\($0.name)=\($0.value)" },
                           workingDirectory: command.workingDirectory, user: command.user, timeoutSeconds: command.timeoutSeconds,
                           maxStdoutBytes: out.limit, maxStderrBytes: err.limit, hasStdin: input != nil, shutdownAfter: shutdownAfter,
                           hostTimeNanoseconds: hostTime(), entropy: entropy)
        var fds = [out.vmmEnd, err.vmmEnd]
        if let input { fds.append(input.vmmEnd) }
        state.withLock { $0.currentRun = runID }
        defer { state.withLock { $0.currentRun = nil } }
        do {
            try send(.run(spec), descriptors: fds, while: "starting run \(runID)")
        } catch {
            out.abandon(); err.abandon(); input?.abandon()
            throw error
        }
        // Our copies of the VMM's ends go now: EOF on our ends then means the VMM is done with them.
        out.releaseVMMEnd(); err.releaseVMMEnd(); input?.releaseVMMEnd()

        // The VMM enforces every limit itself; these bound a VMM that does not. It may take as
        // long to start the command as to boot; then, with a timeout, that, the output's drain
        // and a reboot. Without a timeout a command may run as long as it likes.
        let m = Self.margins
        var deadline: UInt64? = Self.deadline(after: config.bootTimeoutSeconds + m.run)
        var started = false
        var outcome: RunOutcome?
        while outcome == nil {
            let message: VMMMessage
            do { message = try receive(until: deadline, while: "running \(command.arguments[0])") } catch {
                out.abandon(); err.abandon(); input?.abandon()
                throw error
            }
            switch message {
            case .started(runID) where !started:
                started = true
                deadline = command.timeoutSeconds.map {
                    Self.deadline(after: $0 + Self.drainSeconds + (shutdownAfter ? Self.rebootSeconds : 0) + m.run)
                }
            case let .exited(id, o) where id == runID:
                outcome = o
            case let .failed(failure):
                out.abandon(); err.abandon(); input?.abandon()
                throw finish(failure)
            case let other:
                out.abandon(); err.abandon(); input?.abandon()
                throw lost("sent \(other.name) during run \(runID)")
            }
        }
        let o = outcome!
        input?.abandon()
        var result = RunResult()
        result.stdout = out.finish(seconds: Self.margins.exit)
        result.stderr = err.finish(seconds: Self.margins.exit)
        result.exitCode = o.exitCode
        result.signal = o.signal
        result.timedOut = o.timedOut
        result.failure = o.failure
        result.stdoutDroppedBytes = o.stdoutDropped
        result.stderrDroppedBytes = o.stderrDropped
        result.outputTruncated = o.stdoutDropped > 0 || o.stderrDropped > 0 || out.truncated || err.truncated
        result.stderrEndsMidLine = o.stderrEndsMidLine
        result.systemEvent = o.systemEvent
        result.guestMode = bootReport?.guestMode
        var t = RunTimings()
        t.vmmStartMs = o.timings.vmmStartMs; t.kernelBootMs = o.timings.kernelBootMs; t.agentReadyMs = o.timings.agentReadyMs
        t.commandMs = o.timings.commandMs; t.shutdownMs = o.timings.shutdownMs; t.totalMs = o.timings.totalMs
        if !first { t.vmmStartMs = 0; t.kernelBootMs = 0 }
        if first, let restoredFrom, let boot = bootReport {
            t.kernelBootMs = 0
            t.restoreMs = boot.restoreMs
            var use = restoredFrom
            use.restoreMs = boot.restoreMs
            result.snapshot = use
        }
        result.timings = t

        // A run that ended the VM (asked to, timed out, or the guest died) is followed by `ended`.
        if shutdownAfter || o.timedOut || o.systemEvent != nil {
            awaitEnd(seconds: Self.rebootSeconds + Self.margins.exit)
        }
        return result
    }

    // MARK: - Snapshots

    /// Saves the booted VM, which has run nothing yet, into `file` (an empty regular file
    /// this side opened for writing, named `save.name`); the VM goes on afterwards. What the
    /// VMM wrote is not trusted: the caller checks the file whole before it keeps it.
    func saveSnapshot(_ save: SnapshotSave, into file: Int32) throws(SandboxError) -> SnapshotSaveReport {
        busy.wait()
        defer { busy.signal() }
        if let ended = endedDescription { throw .ended("the sandbox has ended: \(ended)") }
        guard nextRunID == 1, restoredFrom == nil else {
            throw .invalidConfiguration("only a sandbox that booted and has run no command can be saved as a snapshot")
        }
        try send(.snapshot(save), descriptors: [file], while: "saving a snapshot")
        // The VMM bounds its pause (30 s) itself; the write is a pass over the guest's RAM.
        let seconds = 30 + Double(config.memoryMiB) / 16 + Self.margins.run
        switch try receive(until: Self.deadline(after: seconds), while: "saving a snapshot") {
        case let .snapshotSaved(report):
            return report
        case let .failed(failure):
            throw finish(failure)
        case let other:
            throw lost("sent \(other.name) while saving a snapshot")
        }
    }

    /// Delivers `signal` to the command that is running, if one is.
    func signal(_ signo: Int32) {
        guard let run = state.withLock({ $0.currentRun }) else { return }
        do { try channel.send(SupervisorMessage.signal(runID: run, signal: signo).encoded()) } catch {
            logger.debug("signal \(signo) not sent: \(error)")
        }
    }

    /// Syncs the guest's disks and ends the VM, then the VMM.
    func shutdown() {
        busy.wait()
        defer { busy.signal() }
        guard endedDescription == nil else { reapIfNeeded(); return }
        do { try channel.send(SupervisorMessage.shutdown.encoded()) } catch {
            terminate()
            reapIfNeeded()
            return
        }
        awaitEnd(seconds: Self.rebootSeconds + Self.margins.exit)
    }

    /// Ends the VMM now (the guest gets no say). Any thread; a run in progress then fails.
    func terminate() {
        state.withLock { $0.terminated = true }
        host.terminate()
    }

    var systemEvent: String? { state.withLock { $0.systemEvent } }

    private var endedDescription: String? {
        state.withLock { s in
            guard s.ended else { return nil }
            return s.systemEvent.map { "the guest ended (\($0))" } ?? "the VM was stopped"
        }
    }

    /// Waits for `ended` (the VMM then exits), ending the VMM if it does not come.
    private func awaitEnd(seconds: Double) {
        let deadline = Self.deadline(after: seconds)
        while true {
            guard let message = try? receive(until: deadline, while: "ending") else { break }
            if case let .ended(event) = message {
                state.withLock { $0.systemEvent = event ?? $0.systemEvent; $0.ended = true }
                break
            }
        }
        state.withLock { $0.ended = true }
        reapIfNeeded()
    }

    private func reapIfNeeded() {
        guard state.withLock({ $0.reaped }) == nil else { return }
        let end = host.reap(seconds: Self.margins.exit)
        state.withLock { $0.reaped = end; $0.ended = true }
        if end != .clean { logger.warning("the VMM ended uncleanly: \(end)") }
    }

    // MARK: - The channel

    private static func deadline(after seconds: Double) -> UInt64 {
        monotonicNanoseconds() &+ UInt64(max(0, min(seconds, 1e9)) * 1e9)
    }

    private func send(_ message: SupervisorMessage, descriptors: [Int32] = [], while doing: String) throws(SandboxError) {
        do { try channel.send(message.encoded(), descriptors: descriptors) } catch {
            throw lost("stopped reading its session while \(doing) (\(error))")
        }
    }

    /// The next message from the VMM, or the error that ends it: a closed or broken channel,
    /// a descriptor it had no business sending, or no answer in time.
    private func receive(until deadline: UInt64?, while doing: String) throws(SandboxError) -> VMMMessage {
        let got: SessionChannel.Received
        do { got = try channel.receive(until: deadline) } catch {
            throw lost("broke the session protocol while \(doing): \(error)")
        }
        switch got {
        case let .frame(type, body):
            guard channel.unclaimedDescriptors == 0 else {
                channel.dropUnclaimedDescriptors()
                throw lost("sent descriptors, which the protocol never does")
            }
            do { return try VMMMessage.decode(type: type, body: body) } catch {
                throw lost("broke the session protocol while \(doing): \(error)")
            }
        case .closed:
            // Its end closed: it is exiting. Let it, so its own status (a seccomp kill) is what we see.
            throw lost(state.withLock { $0.terminated } ? "was stopped while \(doing)" : "ended while \(doing)", exiting: true)
        case .timedOut:
            throw lost("did not answer while \(doing)")
        }
    }

    /// The VMM is of no further use: end it, reap it, and say why in the caller's terms. One
    /// that is `exiting` already gets a moment to finish (reap ends it if it does not).
    private func lost(_ what: String, exiting: Bool = false) -> SandboxError {
        if !exiting { host.terminate() }
        state.withLock { $0.ended = true }
        let end: VMMEnd
        if let r = state.withLock({ $0.reaped }) { end = r } else {
            end = host.reap(seconds: exiting ? Self.margins.exit : 5)
            state.withLock { $0.reaped = end }
        }
        switch end {
        case .seccompViolation:
            return .sandboxViolation("the VMM broke its seccomp sandbox (the line above names the system call) and was stopped: this is a bug in Airlock, please report it")
        case .jailSetupFailed:
            return .jail("the VMM could not enter its jail (the line above says why)")
        case .clean, .other:
            if state.withLock({ $0.terminated }) { return .ended("the sandbox was stopped") }
            let how = if case let .other(d) = end { " (\(d))" } else { "" }
            return .vmm("the VMM \(what)\(how): it was stopped")
        }
    }

    /// A failure the VMM reported: the VM may be gone with it.
    private func finish(_ failure: SessionFailure) -> SandboxError {
        if failure.vmEnded {
            state.withLock { $0.ended = true }
            reapIfNeeded()
        }
        switch failure.kind {
        case .invalidConfiguration: return .invalidConfiguration(failure.message)
        case .vmm: return .vmm(failure.message)
        case .agentDidNotStart: return .agentDidNotStart(failure.message, console: failure.console)
        case .protocolViolation: return .protocolViolation(failure.message)
        case .ended: return .ended(failure.message)
        }
    }
}

extension VMMMessage {
    var name: String {
        switch self {
        case .hello: return "hello"
        case .booted: return "booted"
        case .started: return "started"
        case .exited: return "exited"
        case .failed: return "failed"
        case .ended: return "ended"
        case .snapshotSaved: return "snapshotSaved"
        }
    }
}

/// A snapshot file the supervisor opened and checked whole (SnapshotStore.openChecked),
/// ready to go to a VMM with its boot request.
struct CheckedSnapshot: Sendable {
    let file: SnapshotFile
    /// Choosing and checking it, in ms (for the receipt).
    var checkMs: Double
    /// What it takes on disk.
    var allocatedBytes: UInt64
}

// MARK: - Where a run's streams go

/// One output stream of a run: the descriptor the VMM writes, and what this side does with
/// what arrives. A terminal or pipe the caller gave is handed over as it is; a regular file
/// is written through a pipe here, so the jailed VMM never writes a regular file (its
/// RLIMIT_FSIZE covers only its disks); capture and handlers read a pipe on a thread.
final class OutputRoute: @unchecked Sendable {
    // @unchecked: `vmmEndFD` is released once by the run's thread; the collector's state is in Mutexes.
    private var vmmEndFD: OwnedFileDescriptor?
    private let passed: Int32?
    private let collector: Collector?
    /// The limit the VMM applies (nil: none).
    let limit: UInt64?

    var vmmEnd: Int32 { passed ?? vmmEndFD!.rawValue }
    var truncated: Bool { collector?.truncated ?? false }

    init(_ destination: OutputDestination, limit requested: Int?, stream: String, logger: Logger) throws(SandboxError) {
        switch destination {
        case let .fileDescriptor(fd) where !Self.isRegularFile(fd):
            passed = fd
            collector = nil
            limit = requested.map { UInt64(max(0, $0)) }
        case let .fileDescriptor(fd):
            (vmmEndFD, collector) = try Self.pipe(.relay(fd), stream: stream)
            passed = nil
            limit = requested.map { UInt64(max(0, $0)) }
        case .capture:
            let keep = Command.capturedBytesLimit(requested)
            (vmmEndFD, collector) = try Self.pipe(.capture(keep), stream: stream)
            passed = nil
            limit = UInt64(keep)
        case let .handler(h):
            (vmmEndFD, collector) = try Self.pipe(.handler(h), stream: stream)
            passed = nil
            limit = requested.map { UInt64(max(0, $0)) }
        }
    }

    private static func isRegularFile(_ fd: Int32) -> Bool {
        var info = stat()
        return fstat(fd, &info) == 0 && (info.st_mode & S_IFMT) == S_IFREG
    }

    private static func pipe(_ mode: Collector.Mode, stream: String) throws(SandboxError) -> (OwnedFileDescriptor, Collector) {
        var fds: [Int32] = [-1, -1]
        guard Glibc.pipe(&fds) == 0 else { throw .vmm("cannot create a pipe for the run's \(stream): \(String(cString: strerror(errno)))") }
        // Close-on-exec before anything else can run a child (a jailed spawn passes only what it names anyway).
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        let collector = Collector(read: OwnedFileDescriptor(adopting: fds[0]), mode: mode)
        do { try collector.start() } catch { throw .vmm("cannot start the \(stream) reader: \(error)") }
        return (OwnedFileDescriptor(adopting: fds[1]), collector)
    }

    func releaseVMMEnd() { vmmEndFD = nil }

    /// Waits for the VMM's end to close (it has written everything) and returns what was captured.
    func finish(seconds: Double) -> [UInt8] {
        releaseVMMEnd()
        return collector?.finish(seconds: seconds) ?? []
    }

    /// The run failed: stop reading.
    func abandon() {
        releaseVMMEnd()
        _ = collector?.finish(seconds: 1)
    }

    /// Reads one pipe to EOF on a thread of its own.
    final class Collector: @unchecked Sendable {
        // @unchecked: `bytes` and `truncated` are written by the reader thread and read after `done`.
        enum Mode {
            case capture(Int)
            case handler(@Sendable ([UInt8]) -> Void)
            case relay(Int32)
        }
        let read: OwnedFileDescriptor
        let mode: Mode
        private var bytes: [UInt8] = []
        private(set) var truncated = false
        private let done = OneShotLatch()
        private let stop = Atomic<Bool>(false)

        init(read: OwnedFileDescriptor, mode: Mode) {
            self.read = read
            self.mode = mode
        }

        func start() throws(SystemError) {
            try startDetachedThread { [self] in loop() }
        }

        private func loop() {
            var buffer = [UInt8](repeating: 0, count: 64 << 10)
            while !stop.load(ordering: .relaxed) {
                var p = pollfd(fd: read.rawValue, events: Int16(POLLIN), revents: 0)
                let r = poll(&p, 1, 200)
                if r == 0 { continue }
                if r < 0 { if errno == EINTR { continue }; break }
                let n = buffer.withUnsafeMutableBytes { Glibc.read(read.rawValue, $0.baseAddress, $0.count) }
                if n < 0 { if errno == EINTR || errno == EAGAIN { continue }; break }
                if n == 0 { break }
                let chunk = buffer[0..<n]
                switch mode {
                case let .capture(limit):
                    // The VMM cut the stream at the limit already; a VMM that did not gets no further.
                    let room = max(0, limit - bytes.count)
                    bytes += chunk.prefix(room)
                    if n > room { truncated = true }
                case let .handler(h):
                    h(Array(chunk))
                case let .relay(fd):
                    chunk.withUnsafeBytes { try? AirlockOS.writeAll(fd: fd, $0) }
                }
            }
            done.open()
        }

        func finish(seconds: Double) -> [UInt8] {
            if !done.wait(seconds: seconds) {
                stop.store(true, ordering: .relaxed)
                _ = done.wait(seconds: 1)
            }
            return bytes
        }
    }
}

/// A run's stdin: the caller's descriptor as it is, or bytes fed through a socket (a socket,
/// not a pipe, so that a VMM that stops reading gives this side EPIPE rather than SIGPIPE).
final class InputRoute: @unchecked Sendable {
    // @unchecked: `vmmEndSocket` is released once by the run's thread; the feeder only sends.
    private var vmmEndSocket: UnixSocket?
    private let passed: Int32?
    private let stop = StopFlag()
    private let feeder: UnixSocket?

    var vmmEnd: Int32 { passed ?? vmmEndSocket!.descriptor.rawValue }

    init?(_ source: StdinSource, logger: Logger) throws(SandboxError) {
        switch source {
        case .none:
            return nil
        case let .fileDescriptor(fd):
            passed = fd
            vmmEndSocket = nil
            feeder = nil
        case let .bytes(bytes):
            let pair: (UnixSocket, UnixSocket)
            do { pair = try UnixSocket.pair() } catch { throw .vmm("cannot create the run's stdin: \(error)") }
            passed = nil
            feeder = pair.0
            vmmEndSocket = pair.1
            let ours = pair.0, stop = self.stop
            do {
                try startDetachedThread {
                    var offset = 0
                    while offset < bytes.count && !stop.isSet {
                        let end = min(bytes.count, offset + (64 << 10))
                        do { try ours.send(Array(bytes[offset..<end])) } catch { return }
                        offset = end
                    }
                    ours.shutdownWrites()
                }
            } catch {
                throw .vmm("cannot start the stdin feeder: \(error)")
            }
        }
    }

    func releaseVMMEnd() { vmmEndSocket = nil }

    func abandon() {
        releaseVMMEnd()
        stop.set()
        feeder?.shutdownWrites()
    }
}

/// A flag one thread raises and another polls (a feeder's stop).
final class StopFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    var isSet: Bool { flag.load(ordering: .relaxed) }
    func set() { flag.store(true, ordering: .relaxed) }
}

// MARK: - Host memory

/// Whether the host can give a guest the memory it asks for, checked before any VM exists.
enum HostMemory {
    /// MemAvailable from /proc/meminfo, in bytes; nil when it cannot be read.
    static func available(meminfo: String? = try? FileIORead.read("/proc/meminfo")) -> UInt64? {
        guard let meminfo else { return nil }
        for line in meminfo.split(separator: "\n") where line.hasPrefix("MemAvailable:") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            if fields.count >= 2, let kib = UInt64(fields[1]) { return kib * 1024 }
        }
        return nil
    }

    /// Refuses a guest (plus what its VMM needs) larger than what the host has available now.
    static func check(guestMiB: Int, meminfo: String? = try? FileIORead.read("/proc/meminfo")) throws(SandboxError) {
        guard let available = available(meminfo: meminfo) else { return }
        let needed = (UInt64(max(0, guestMiB)) << 20) + VMMJail.memoryAllowance
        guard needed <= available else {
            throw .invalidConfiguration("--memory \(guestMiB) MiB is more than this host can give: \(available >> 20) MiB is available now (MemAvailable in /proc/meminfo), and the VMM needs \(VMMJail.memoryAllowance >> 20) MiB beside the guest; ask for at most \(max(0, Int(available >> 20) - Int(VMMJail.memoryAllowance >> 20))) MiB")
        }
    }
}

/// Reads a small text file whole (a /proc file is read to its end, not to the first 4 KiB).
enum FileIORead {
    static func read(_ path: String) throws -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open", subject: path, errno: errno) }
        defer { close(fd) }
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 16 << 10)
        while true {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n > 0 { out += buffer[0..<n]; continue }
            if n < 0 && errno == EINTR { continue }
            break
        }
        return String(decoding: out, as: UTF8.self)
    }
}

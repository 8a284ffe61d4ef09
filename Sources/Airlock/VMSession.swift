import AgentProtocol
import AirlockOS
import Dispatch
import Logging
import Snapshot
import Synchronization
import Virtio
import VirtioDevices
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// The host side of the control port: frames from the guest are decoded where
/// they arrive (a vCPU thread, with the console's lock held, so nothing here
/// may call back into the device) and posted to the session's controller.
final class ControlChannel: ConsoleOutput, @unchecked Sendable {
    // @unchecked: all state is in the Mutex.
    private let state = Mutex((decoder: FrameDecoder(), failed: false))
    private let post: @Sendable (VMSession.Event) -> Void

    init(post: @escaping @Sendable (VMSession.Event) -> Void) { self.post = post }

    func write(_ bytes: UnsafeRawBufferPointer) {
        let (messages, failure) = state.withLock { s -> ([GuestMessage], ProtocolError?) in
            // After a bad frame nothing on the stream can be trusted; it was reported once.
            guard !s.failed else { return ([], nil) }
            s.decoder.feed(bytes)
            var out: [GuestMessage] = []
            do throws(ProtocolError) {
                while let frame = try s.decoder.next() {
                    // The agent sends a handful of messages per run: a buffer packed with
                    // more than the event queue holds is a flood, stopped here on the
                    // vCPU thread before it becomes millions of decoded messages.
                    guard out.count < VMSession.maxPendingEvents else {
                        throw .malformed("more than \(VMSession.maxPendingEvents) messages in one write: the agent is flooding the control port")
                    }
                    out.append(try GuestMessage.decode(type: frame.type, body: frame.body))
                }
                return (out, nil)
            } catch {
                s.failed = true
                s.decoder = FrameDecoder()
                return (out, error)
            }
        }
        for m in messages { post(.guest(m)) }
        if let failure { post(.protocolError(failure)) }
    }
}

/// Kernel console output: kept (bounded) for error reports, and copied to a host fd when asked.
final class ConsoleLog: ConsoleOutput, @unchecked Sendable {
    // @unchecked: `capture` is thread-safe; `copy` is immutable.
    let capture = BoundedCapture(limit: 1 << 20)
    let copy: Int32?
    init(copyTo fd: Int32?) { copy = fd }
    func write(_ bytes: UnsafeRawBufferPointer) {
        capture.write(bytes)
        if let copy { try? AirlockOS.writeAll(fd: copy, bytes) }
    }
}

extension RunRequest {
    /// The agent's view of `command`.
    init(_ command: Command, runID: UInt32, shutdownAfter: Bool, hostTimeNanoseconds: UInt64 = 0, entropy: [UInt8] = []) {
        self.init(runID: runID, arguments: command.arguments,
                  environment: command.environment.map { "\($0.name)=\($0.value)" },
                  workingDirectory: command.workingDirectory, user: command.user,
                  hasStdin: command.stdin != .none, shutdownAfter: shutdownAfter,
                  hostTimeNanoseconds: hostTimeNanoseconds, entropy: entropy)
    }
}

/// One booted VM with its agent: the engine behind `Sandbox`. Its methods
/// block (they wait on the guest) and are called from a dedicated thread.
///
/// Threads: the vCPU thread runs the machine and decodes guest frames; one
/// writer thread per output port delivers output; a feeder thread pushes a
/// run's stdin; the caller's thread is the controller, which waits on
/// `events` and makes every decision (timeouts included).
final class VMSession: @unchecked Sendable {
    // @unchecked: mutable state below is touched only by the controller (the
    // caller of boot/run/shutdown, serialised by `busy`), or is in Mutexes.
    enum Event: Sendable {
        case guest(GuestMessage)
        case protocolError(ProtocolError)
        case vmEnded(Result<MachineExit, VMMError>)
        case progress
    }

    /// A guest that floods the control port faster than the controller reads is broken or hostile.
    static let maxPendingEvents = 4096
    /// How long output may take to arrive after the exit report, and the guest to reboot after it.
    static let drainSeconds = 30.0
    static let shutdownSeconds = 60.0

    let config: SandboxConfig
    let logger: Logger
    let machine: Machine
    let console: ConsoleDevice
    let transport: MMIOTransport
    let stdoutPump = OutputPump(name: AgentProtocol.stdoutPortName)
    let stderrPump = OutputPump(name: AgentProtocol.stderrPortName)
    let consoleLog: ConsoleLog
    let rootfsPath: String
    let kernelPath: String
    let hooks: SessionHooks

    private let events = EventQueue()
    private let inputSpace = DispatchSemaphore(value: 0)
    /// Held while one whole frame is pushed into the control port, so frames never interleave.
    private let controlWrite = DispatchSemaphore(value: 1)
    private let busy = DispatchSemaphore(value: 1)
    /// Set by the machine's thread when `Machine.run` has returned (before the event is posted).
    private let vmFinished = OneWayFlag()

    private let requestedAt: UInt64
    private var helloAt: UInt64 = 0
    private var nextRunID: UInt32 = 1
    private(set) var exit: MachineExit?
    private(set) var endError: String?
    private var firstRunDone = false

    /// Where the machine thread waits while the VM is paused for a snapshot.
    private let pauseGate = PauseGate()
    /// The snapshot this VM was restored from (nil: it booted), and when the restore was done (monotonic ns).
    private(set) var restoredFrom: String?
    private var restoredAt: UInt64 = 0
    private var restoreStartedAt: UInt64 = 0
    private var restoredAllocatedBytes: UInt64 = 0
    /// The host's wall clock for each run request (the agent sets the guest's clock to it); tests fake it.
    var hostTime: @Sendable () -> UInt64 = VMSession.realtimeNanoseconds

    static let controlPort = 0, stdoutPort = 1, stderrPort = 2

    /// Builds the machine (KVM objects, memory, devices, kernel) without starting it.
    /// With `snapshot`, the machine is built from the snapshot instead of
    /// booted: guest RAM mapped from its memory image, the same devices bound
    /// to this session's root filesystem (reopened read-only) and console
    /// ports, the saved state restored; `start` then runs it.
    init(config: SandboxConfig, kernelPath: String, rootfsPath: String, requestedAt: UInt64, logger: Logger,
         hooks: SessionHooks = SessionHooks(), snapshot: SnapshotFile? = nil) throws(SandboxError) {
        let initStarted = monotonicNanoseconds()
        self.config = config
        self.hooks = hooks
        self.logger = logger
        self.requestedAt = requestedAt
        self.rootfsPath = rootfsPath
        self.kernelPath = kernelPath
        consoleLog = ConsoleLog(copyTo: config.consoleFD)

        var mc = MachineConfig()
        mc.memoryBytes = UInt64(config.memoryMiB) << 20
        mc.vcpuCount = config.cpus
        mc.console = consoleLog
        mc.logger = logger
        mc.vcpuThreadSetup = hooks.vcpuThreadSetup
        if let profile = config.hostProfile { mc.hostProfile = profile }
        mc.memoryImage = snapshot?.memoryImage

        let inputSpace = self.inputSpace
        let events = self.events
        let post: @Sendable (Event) -> Void = { events.post($0) }
        let control = ControlChannel(post: post)
        do {
            machine = try Machine(mc)
            try machine.addBlockDevice(path: rootfsPath, readOnly: true)
            let consoleIndex = machine.virtioDeviceCount
            let added = try machine.addConsoleDevice(ports: [
                .init(name: AgentProtocol.controlPortName, output: control, inputConsumed: { inputSpace.signal() }),
                .init(name: AgentProtocol.stdoutPortName, output: stdoutPump),
                .init(name: AgentProtocol.stderrPortName, output: stderrPump),
            ])
            console = added.console
            transport = added.transport
            let cmdline = Self.sessionCommandLine(config, consoleIndex: consoleIndex)
            if let snapshot {
                // The snapshot's guest booted with the command line this session would have
                // given it, or its devices and agent ports are not where this session puts them.
                let expected = Machine.kernelCommandLine(hostProfile: mc.hostProfile, virtioDeviceCount: machine.virtioDeviceCount, extra: cmdline)
                guard snapshot.manifest.commandLine == expected else {
                    throw SandboxError.invalidConfiguration(SnapshotError.foreign(
                        path: snapshot.path, detail: "its guest booted with '\(snapshot.manifest.commandLine)', this sandbox's would boot with '\(expected ?? "")'").description)
                }
                try machine.restore(snapshot.state)
            } else {
                try machine.loadLinux(kernelPath: kernelPath, initrdPath: nil, extraCommandLine: cmdline)
            }
        } catch let e as SandboxError {
            throw e
        } catch let e as VMMError {
            if let snapshot { throw .invalidConfiguration("snapshot \(snapshot.path) cannot be restored here: \(e.description)") }
            throw .vmm(e.description)
        } catch {
            throw .vmm("\(error)")
        }
        if let snapshot {
            restoredFrom = snapshot.path
            restoredAt = monotonicNanoseconds()
            restoreStartedAt = initStarted
            var info = stat()
            if fstat(snapshot.file.rawValue, &info) == 0 { restoredAllocatedBytes = UInt64(info.st_blocks) * 512 }
        }
        let transport = self.transport
        // Weak: the transport's console holds the pumps as its ports' outputs, so a strong
        // reference here would be a cycle that keeps the whole VM (its fd, its RAM) after the session.
        stdoutPump.resume = { [weak transport] in transport?.serviceQueue(ConsoleDevice.transmitQueue(port: Self.stdoutPort)) }
        stderrPump.resume = { [weak transport] in transport?.serviceQueue(ConsoleDevice.transmitQueue(port: Self.stderrPort)) }
        stdoutPump.progress = { post(.progress) }
        stderrPump.progress = { post(.progress) }
    }

    // MARK: - Events

    private func nextEvent(until deadline: UInt64?) -> Event? { events.next(until: deadline) }

    private static func deadline(after seconds: Double) -> UInt64 {
        monotonicNanoseconds() &+ UInt64(max(0, min(seconds, 1e9)) * 1e9)
    }

    private func record(_ result: Result<MachineExit, VMMError>) {
        switch result {
        case let .success(e): exit = e
        case let .failure(e): endError = e.description
        }
    }

    private var ended: Bool { exit != nil || endError != nil }

    private var endDescription: String {
        if let endError { return "the VMM failed: \(endError)" }
        if let event = exit?.event { return "the guest ended (\(event))" }
        return "the VM was stopped"
    }

    // MARK: - Boot

    /// Starts the vCPUs and waits for the agent's hello.
    func boot() throws(SandboxError) {
        busy.wait()
        defer { busy.signal() }
        do {
            // The machine is built; from here on threads touch guest data (the jail's seccomp goes on now,
            // and every thread started below inherits it).
            try hooks.beforeThreads?()
        } catch {
            throw .vmm("the sandbox could not lock the VMM down before starting it: \(error)")
        }
        try startThreads()
        let deadline = Self.deadline(after: config.bootTimeoutSeconds)
        while true {
            guard let event = nextEvent(until: deadline) else {
                destroy()
                throw .agentDidNotStart("the agent did not say hello within the \(Int(config.bootTimeoutSeconds)) s boot timeout: check that \(rootfsPath) has Airlock's agent at \(config.agentPath) (make rootfs), or raise --boot-timeout on a slow host",
                                        console: consoleLog.capture.text)
            }
            switch event {
            case let .guest(.hello(version, agent)):
                helloAt = monotonicNanoseconds()
                logger.debug("agent ready: \(agent), protocol \(version)")
                return
            case let .guest(other):
                destroy()
                throw .protocolViolation("the agent sent \(other) before its hello: the guest is not running Airlock's agent")
            case let .protocolError(e):
                destroy()
                throw .protocolViolation("the agent in \(rootfsPath): \(e)")
            case let .vmEnded(result):
                record(result)
                throw .agentDidNotStart("\(endDescription) before the agent said hello: check that \(rootfsPath) has Airlock's agent at \(config.agentPath) (rebuild it with make rootfs)",
                                        console: consoleLog.capture.text)
            case .progress:
                continue
            }
        }
    }

    /// Starts the output pumps and the machine's thread. The machine thread
    /// runs the vCPUs until the VM ends; while a snapshot is taken it waits,
    /// paused, at the gate, and then runs them on.
    private func startThreads() throws(SandboxError) {
        do {
            try stdoutPump.start()
            try stderrPump.start()
            let machine = self.machine
            let events = self.events, finished = self.vmFinished, gate = self.pauseGate
            try startDetachedThread {
                while true {
                    let result: Result<MachineExit, VMMError>
                    do throws(VMMError) { result = .success(try machine.run()) } catch { result = .failure(error) }
                    if case let .success(e) = result, e.paused {
                        gate.pausedAndWait()
                        continue
                    }
                    gate.ended()
                    finished.set()
                    events.post(.vmEnded(result), always: true)
                    return
                }
            }
        } catch {
            throw .vmm("cannot start the VM's threads: \(error)")
        }
    }

    /// The part of the kernel command line a session adds: the root
    /// filesystem, the agent as init, where its ports are (port n of virtio
    /// device k is /dev/vport{k}p{n} in the guest: the agent opens these
    /// directly instead of scanning sysfs for the names), quiet unless the
    /// console is shown, and the caller's own parameters.
    static func sessionCommandLine(_ config: SandboxConfig, consoleIndex: Int) -> String {
        let ports = (0..<AgentProtocol.portNames.count).map { "vport\(consoleIndex)p\($0)" }.joined(separator: ",")
        var cmdline = "root=/dev/vda ro rootfstype=ext4 init=\(config.agentPath) AIRLOCK_PORTS=\(ports)"
        // The kernel's own messages cost emulated UART work per character; errors still show.
        if config.consoleFD == nil { cmdline += " quiet" }
        if !config.extraKernelCommandLine.isEmpty { cmdline += " " + config.extraKernelCommandLine }
        return cmdline
    }

    /// The whole command line a session with `config` boots its kernel with
    /// (a root filesystem, then the console: two virtio devices), without
    /// building anything: what a snapshot for this configuration must record.
    static func bootCommandLine(_ config: SandboxConfig, hostProfile: HostProfile) -> String {
        Machine.kernelCommandLine(hostProfile: hostProfile, virtioDeviceCount: 2,
                                  extra: sessionCommandLine(config, consoleIndex: 1)) ?? ""
    }

    static func realtimeNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(max(0, ts.tv_sec)) * 1_000_000_000 + UInt64(max(0, ts.tv_nsec))
    }

    // MARK: - Snapshots

    /// Starts a VM restored from a snapshot (instead of `boot`): its agent
    /// said hello before the snapshot was taken and waits for a run request.
    func start() throws(SandboxError) {
        busy.wait()
        defer { busy.signal() }
        guard restoredFrom != nil else { throw .invalidConfiguration("start() is for a restored sandbox; boot() starts a fresh one") }
        do { try hooks.beforeThreads?() } catch {
            throw .vmm("the sandbox could not lock the VMM down before starting it: \(error)")
        }
        try startThreads()
        helloAt = monotonicNanoseconds()
    }

    /// Pauses this VM, writes a snapshot of it into `fd` (an empty file opened
    /// for writing, named `path` in messages), and lets it run on. Only a VM
    /// that has booted to its agent's hello and run nothing yet is saved: its
    /// guest holds nothing of any command, and its agent waits for the first
    /// request, which is where every restore takes over.
    func saveSnapshot(into fd: Int32, path: String, kernelSHA256: String, rootfsSHA256: String) throws(SandboxError) -> SnapshotWriteReport {
        busy.wait()
        defer { busy.signal() }
        guard !ended else { throw .ended("the sandbox has ended: \(endDescription)") }
        guard helloAt != 0, !firstRunDone, restoredFrom == nil else {
            throw .invalidConfiguration("only a sandbox that booted and has run no command can be saved as a snapshot")
        }
        machine.pause()
        guard pauseGate.waitUntilPaused(seconds: 30) else {
            destroy()
            throw .vmm("the VM did not pause within 30 s to be saved; it was stopped")
        }
        defer { pauseGate.resume() }
        do {
            let state = try machine.captureState()
            guard let vcpu = state.vcpus.first else { throw SandboxError.vmm("the VM has no vCPU to save") }
            let profile = machine.config.hostProfile
            let manifest = SnapshotManifest(
                createdAt: UInt64(max(0, time(nil))), kernelSHA256: kernelSHA256, rootfsSHA256: rootfsSHA256,
                commandLine: machine.commandLine, hostBackend: profile.snapshotBackendName,
                guestMode: profile.guestMode(savedMSRs: vcpu.msrs), memoryBytes: state.memoryBytes, vcpuCount: state.vcpus.count,
                tscKHz: vcpu.tscKHz, xsaveSize: machine.xsaveSize, cpuid: vcpu.cpuid, dataPages: 0)
            return try SnapshotWriter.write(fd: fd, path: path, manifest: manifest, state: state, memory: machine.memory)
        } catch let e as SandboxError {
            throw e
        } catch {
            throw .vmm("the VM could not be saved to \(path): \(error)")
        }
    }

    // MARK: - Control port input

    /// Pushes one whole frame into the control port, waiting for the guest to take it.
    /// False when the VM ended or `cancelled` says so first.
    private func pushFrame(_ frame: [UInt8], cancelled: () -> Bool = { false }) -> Bool {
        controlWrite.wait()
        defer { controlWrite.signal() }
        var rest = frame[...]
        while !rest.isEmpty {
            let n = console.queueInput(port: Self.controlPort, Array(rest))
            rest = rest.dropFirst(n)
            transport.serviceQueue(ConsoleDevice.receiveQueue(port: Self.controlPort))
            if rest.isEmpty { break }
            if cancelled() { return false }
            _ = inputSpace.wait(timeout: .now() + .milliseconds(50))
        }
        return true
    }

    /// Feeds a run's stdin on its own thread; the returned flag stops it.
    private func startStdinFeeder(_ source: StdinSource, runID: UInt32) -> OneWayFlag? {
        if case .none = source { return nil }
        let flag = OneWayFlag()
        do {
            try startDetachedThread { [self] in feedStdin(source, runID: runID, flag: flag) }
        } catch {
            logger.error("cannot start the stdin thread: \(error); the command gets no input")
            return nil
        }
        return flag
    }

    private func feedStdin(_ source: StdinSource, runID: UInt32, flag: OneWayFlag) {
        let cancelled = { flag.isSet }
        let chunk = AgentProtocol.Limits.stdinChunk
        switch source {
        case .none:
            return
        case let .bytes(bytes):
            var offset = 0
            while offset < bytes.count {
                let end = min(bytes.count, offset + chunk)
                guard pushFrame(HostMessage.stdin(runID: runID, data: Array(bytes[offset..<end])).encoded(), cancelled: cancelled) else { return }
                offset = end
            }
        case let .fileDescriptor(fd):
            reading: while true {
                switch Self.readChunk(fd: fd, max: chunk, flag: flag) {
                case let .data(d):
                    guard pushFrame(HostMessage.stdin(runID: runID, data: d).encoded(), cancelled: cancelled) else { return }
                case .endOfFile:
                    break reading
                case .cancelled:
                    return
                }
            }
        }
        _ = pushFrame(HostMessage.stdinEOF(runID: runID).encoded(), cancelled: cancelled)
    }

    enum ReadOutcome { case data([UInt8]), endOfFile, cancelled }

    /// One read from a host fd, polling so that a stop request is seen within 100 ms
    /// even when the fd never becomes readable (a terminal nobody types into).
    static func readChunk(fd: Int32, max: Int, flag: OneWayFlag) -> ReadOutcome {
        var buffer = [UInt8](repeating: 0, count: max)
        while !flag.isSet {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, 100)
            if r < 0 && errno != EINTR { return .endOfFile }
            guard r > 0 else { continue }
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n > 0 { return .data(Array(buffer[0..<n])) }
            if n == 0 { return .endOfFile }
            if errno == EINTR || errno == EAGAIN { continue }
            return .endOfFile  // a read error ends the input as EOF would; the command decides what that means
        }
        return .cancelled
    }
}

/// Points where a jailed VMM tightens its own sandbox.
public struct SessionHooks: Sendable {
    /// After the machine is built, before any thread that touches guest data starts.
    public var beforeThreads: (@Sendable () throws -> Void)?
    /// On each vCPU thread before its first KVM_RUN.
    public var vcpuThreadSetup: (@Sendable (UInt32) throws -> Void)?
    public init(beforeThreads: (@Sendable () throws -> Void)? = nil, vcpuThreadSetup: (@Sendable (UInt32) throws -> Void)? = nil) {
        self.beforeThreads = beforeThreads
        self.vcpuThreadSetup = vcpuThreadSetup
    }
}

/// The controller's inbox. Bounded: a guest that floods the control port
/// faster than the controller reads is broken or hostile, and is told so once.
final class EventQueue: Sendable {
    private let queue = Mutex<(events: [VMSession.Event], overflowed: Bool, progressPending: Bool)>(([], false, false))
    private let signal = DispatchSemaphore(value: 0)

    func post(_ event: VMSession.Event, always: Bool = false) {
        queue.withLock { q in
            // Progress only wakes the controller to re-check: one pending is as good as many
            // (a flag, not a scan: output posts progress from the vCPU thread for every buffer).
            let isProgress = if case .progress = event { true } else { false }
            if isProgress && q.progressPending { return }
            if q.events.count < VMSession.maxPendingEvents || always {
                q.events.append(event)
                if isProgress { q.progressPending = true }
            } else if !q.overflowed {
                q.overflowed = true
                q.events.append(.protocolError(.malformed("more than \(VMSession.maxPendingEvents) unread messages: the agent is flooding the control port")))
            }
        }
        signal.signal()
    }

    /// The oldest event, waiting until `deadline` (monotonic ns; nil: forever); nil on timeout.
    func next(until deadline: UInt64?) -> VMSession.Event? {
        while true {
            if let e = queue.withLock({ q -> VMSession.Event? in
                guard !q.events.isEmpty else { return nil }
                let e = q.events.removeFirst()
                if case .progress = e { q.progressPending = false }
                return e
            }) { return e }
            if let deadline {
                let now = monotonicNanoseconds()
                guard now < deadline else { return nil }
                _ = signal.wait(timeout: .now() + .nanoseconds(Int(min(deadline - now, UInt64(Int.max)))))
            } else {
                signal.wait()
            }
        }
    }
}

/// Where the machine thread waits while its VM is paused for a snapshot,
/// and how the controller knows it has stopped there (or that the VM ended).
final class PauseGate: Sendable {
    private let state = Mutex<(paused: Bool, ended: Bool, resumeSent: Bool)>((false, false, false))
    private let changed = DispatchSemaphore(value: 0)
    private let resumeSignal = DispatchSemaphore(value: 0)

    /// Machine thread: `run` returned paused; waits until `resume`.
    func pausedAndWait() {
        state.withLock { $0.paused = true; $0.resumeSent = false }
        changed.signal()
        resumeSignal.wait()
        state.withLock { $0.paused = false }
    }

    /// Machine thread: the VM has ended for good.
    func ended() {
        state.withLock { $0.ended = true }
        changed.signal()
    }

    /// Controller: waits until the machine thread is paused (true) or the VM ended or time ran out (false).
    func waitUntilPaused(seconds: Double) -> Bool {
        let deadline = DispatchTime.now() + .nanoseconds(Int(seconds * 1e9))
        while true {
            let (paused, ended) = state.withLock { ($0.paused, $0.ended) }
            if paused { return true }
            if ended { return false }
            if changed.wait(timeout: deadline) == .timedOut { return state.withLock { $0.paused } }
        }
    }

    /// Lets a paused machine thread go on; nothing when it is not paused.
    func resume() {
        let send = state.withLock { s -> Bool in
            guard s.paused, !s.resumeSent else { return false }
            s.resumeSent = true
            return true
        }
        if send { resumeSignal.signal() }
    }
}

/// A flag one thread raises once and others poll: a stop request for a
/// feeder, or the machine thread's "Machine.run has returned".
final class OneWayFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    var isSet: Bool { flag.load(ordering: .relaxed) }
    func set() { flag.store(true, ordering: .relaxed) }
}

extension VMSession {
    /// Runs one command and waits for its end. With `shutdownAfter` the agent
    /// syncs and reboots after reporting, and this waits for the VM to end.
    func run(_ command: Command, shutdownAfter: Bool) throws(SandboxError) -> RunResult {
        busy.wait()
        defer { busy.signal() }
        guard !ended else { throw .ended("the sandbox has ended: \(endDescription)") }
        // Sandbox.validate checked the command (its limits too); the run ID is the session's.
        // The host's time and fresh randomness go with every request: a restored guest wakes with the
        // snapshot's clock and random pool (and a fresh one with no wall clock at all).
        let request = RunRequest(command, runID: nextRunID, shutdownAfter: shutdownAfter,
                                 hostTimeNanoseconds: hostTime(), entropy: (try? Machine.hostRandomBytes(32)) ?? [])
        if let problem = request.limitProblem { throw .invalidConfiguration("\(problem): pass large inputs on stdin or in a file instead") }
        let runID = nextRunID
        nextRunID &+= 1
        let firstRun = !firstRunDone
        firstRunDone = true
        let requested = firstRun ? helloAt : monotonicNanoseconds()

        stdoutPump.begin(command.stdout, limit: command.maxOutputBytes)
        stderrPump.begin(command.stderr, limit: command.maxOutputBytes)
        var result = RunResult()
        let finished = vmFinished
        // A guest that never posts receive buffers on the control port must not hold the caller forever.
        let takeBy = Self.deadline(after: Self.shutdownSeconds)
        guard pushFrame(HostMessage.run(request).encoded(), cancelled: { finished.isSet || monotonicNanoseconds() >= takeBy }) else {
            if !finished.isSet {
                destroy()
                throw .protocolViolation("the agent did not take the run request within \(Int(Self.shutdownSeconds)) s: the VM was stopped")
            }
            _ = waitForEnd(seconds: Self.shutdownSeconds)
            throw .ended("\(endDescription) before the run request was delivered")
        }

        var startedAt: UInt64 = 0, exitedAt: UInt64 = 0
        var report: (status: CommandStatus?, out: UInt64, err: UInt64)?
        var stdinFlag: OneWayFlag?
        defer { stdinFlag?.set() }
        var deadline: UInt64? = Self.deadline(after: config.bootTimeoutSeconds)
        waiting: while report == nil {
            guard let event = nextEvent(until: deadline) else {
                if startedAt == 0 {
                    destroy()
                    throw .protocolViolation("the agent did not start the command within \(Int(config.bootTimeoutSeconds)) s")
                }
                // The command's time is up: the VM goes, with whatever it was doing.
                exitedAt = monotonicNanoseconds()
                result.timedOut = true
                result.exitCode = SandboxExitCode.timeout
                destroy()
                break waiting
            }
            switch event {
            case let .guest(.started(id, pid)) where id == runID && startedAt == 0:
                startedAt = monotonicNanoseconds()
                logger.debug("run \(runID) started as guest pid \(pid)")
                stdinFlag = startStdinFeeder(command.stdin, runID: runID)
                deadline = command.timeoutSeconds.map { startedAt &+ UInt64(max(0, min($0, 1e9)) * 1e9) }
            case let .guest(.exited(id, status, out, err)) where id == runID && startedAt != 0:
                exitedAt = monotonicNanoseconds()
                report = (status, out, err)
            case let .guest(.runFailed(id, reason, message, out, err)) where id == runID && startedAt == 0:
                startedAt = monotonicNanoseconds()
                exitedAt = startedAt
                result.failure = message
                result.exitCode = reason.exitCode
                report = (nil, out, err)
            case let .guest(other):
                destroy()
                throw .protocolViolation("the agent sent \(other) during run \(runID): the guest is not following Airlock's protocol")
            case let .protocolError(e):
                destroy()
                throw .protocolViolation("the agent broke the protocol: \(e)")
            case let .vmEnded(r):
                record(r)
                exitedAt = monotonicNanoseconds()
                result.failure = "\(endDescription) before the command finished"
                result.exitCode = SandboxExitCode.airlockFailed
                break waiting
            case .progress:
                continue
            }
        }
        stdinFlag?.set()

        if let report {
            switch report.status {
            case let .exited(code)?: result.exitCode = code
            case let .signaled(sig)?:
                result.signal = sig
                result.exitCode = 128 + sig
            case nil: break
            }
            if !drainOutput(stdout: report.out, stderr: report.err) {
                logger.warning("the guest reported more output than it sent within \(Int(Self.drainSeconds)) s; the rest is lost")
            }
        }
        let out = stdoutPump.finish(), err = stderrPump.finish()
        result.stdout = out.captured
        result.stderr = err.captured
        result.outputTruncated = out.truncated || err.truncated

        if shutdownAfter && !ended {
            if !waitForEnd(seconds: Self.shutdownSeconds) {
                logger.warning("the guest did not reboot within \(Int(Self.shutdownSeconds)) s of the command's end; stopping it")
                destroy()
            }
        }
        let endedAt = monotonicNanoseconds()
        result.systemEvent = exit?.event?.description
        if let endError, result.failure == nil { result.failure = "the VMM failed: \(endError)" }

        func ms(_ from: UInt64, _ to: UInt64) -> Double { to > from ? Double(to - from) / 1e6 : 0 }
        let firstKVMRun = machine.firstRunNanoseconds
        if firstRun {
            result.timings.vmmStartMs = ms(requestedAt, firstKVMRun)
            result.timings.kernelBootMs = restoredFrom == nil ? ms(firstKVMRun, helloAt) : 0
            if let restoredFrom {
                result.timings.restoreMs = ms(restoreStartedAt, restoredAt)
                result.snapshot = SnapshotUse(path: restoredFrom, restored: true, restoreMs: result.timings.restoreMs,
                                              allocatedBytes: restoredAllocatedBytes)
            }
        }
        result.timings.agentReadyMs = ms(requested, startedAt)
        result.timings.commandMs = ms(startedAt, exitedAt)
        result.timings.shutdownMs = ended ? ms(exitedAt, endedAt) : 0
        result.timings.totalMs = ms(firstRun ? requestedAt : requested, endedAt)
        return result
    }

    /// Waits until both output ports have delivered what the agent reported sending.
    /// The guest gets `drainSeconds` from the exit report to send the rest, and
    /// cannot stretch that by trickling bytes; a slow reader on the host may take
    /// as long as it likes while the host still holds output to deliver.
    private func drainOutput(stdout: UInt64, stderr: UInt64) -> Bool {
        let guestDeadline = Self.deadline(after: Self.drainSeconds)
        var deadline = guestDeadline
        while true {
            if stdoutPump.received >= stdout && stderrPump.received >= stderr && stdoutPump.idle && stderrPump.idle { return true }
            guard let event = nextEvent(until: deadline) else { return false }
            switch event {
            case let .vmEnded(r): record(r)
            case .progress where !(stdoutPump.idle && stderrPump.idle):
                deadline = max(guestDeadline, Self.deadline(after: Self.drainSeconds))
            default: break
            }
        }
    }

    /// Waits for the machine's thread to report the end; false on timeout.
    @discardableResult
    private func waitForEnd(seconds: Double) -> Bool {
        let deadline = Self.deadline(after: seconds)
        while !ended {
            guard let event = nextEvent(until: deadline) else { return false }
            if case let .vmEnded(r) = event { record(r) }
        }
        return true
    }

    /// Asks the agent to sync and reboot, and waits for the VM to end (stopping it if it does not).
    func shutdown() {
        busy.wait()
        defer { busy.signal() }
        guard !ended else { return }
        let finished = vmFinished
        let takeBy = Self.deadline(after: Self.shutdownSeconds)
        if pushFrame(HostMessage.shutdown.encoded(), cancelled: { finished.isSet || monotonicNanoseconds() >= takeBy }),
           waitForEnd(seconds: Self.shutdownSeconds) {
            closePumps()
            return
        }
        destroy()
    }

    /// Stops the vCPUs now (the guest gets no say) and waits for the machine's thread.
    func destroy() {
        machine.stop(with: nil)
        pauseGate.resume()
        if !waitForEnd(seconds: 30) { logger.error("the vCPU threads did not stop within 30 s") }
        closePumps()
    }

    /// Stops the VM without waiting (the owner is gone); the machine's and the pumps' threads then end.
    func abandon() {
        machine.stop(with: nil)
        pauseGate.resume()
        closePumps()
    }

    private func closePumps() {
        stdoutPump.close()
        stderrPump.close()
    }
}

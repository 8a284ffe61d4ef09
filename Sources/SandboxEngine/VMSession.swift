import AgentProtocol
import AirlockOS
import Dispatch
import KVM
import Logging
import SessionProtocol
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

/// Points where a jailed VMM tightens its own sandbox.
public struct EngineHooks: Sendable {
    /// After the machine is built, before any thread that touches guest data starts.
    public var beforeThreads: (@Sendable () throws -> Void)?
    /// On each vCPU thread before its first KVM_RUN.
    public var vcpuThreadSetup: (@Sendable (UInt32) throws -> Void)?
    public init(beforeThreads: (@Sendable () throws -> Void)? = nil, vcpuThreadSetup: (@Sendable (UInt32) throws -> Void)? = nil) {
        self.beforeThreads = beforeThreads
        self.vcpuThreadSetup = vcpuThreadSetup
    }
}

/// The descriptors `boot` came with, owned: /dev/kvm, the kernel, the root filesystem, the
/// disks, and the snapshot to restore (nil: boot the kernel).
struct BootFiles {
    let kvm: OwnedFileDescriptor
    let kernel: OwnedFileDescriptor
    let rootfs: OwnedFileDescriptor
    let disks: [OwnedFileDescriptor]
    var snapshot: OwnedFileDescriptor? = nil
}

/// The kernel command line of a session's guest: one rule, for the VMM that boots it and
/// for the supervisor that keys and checks snapshots by it before any VM exists.
public enum SessionCommandLine {
    /// What a session adds: the root filesystem, the agent as init, where its ports are
    /// (port n of virtio device k is /dev/vport{k}p{n} in the guest: the agent opens these
    /// directly instead of scanning sysfs for the names), quiet unless the console is
    /// shown (the kernel's own messages cost emulated UART work per character; errors still
    /// show), and the caller's own parameters.
    public static func sessionPart(agentPath: String, consoleIndex: Int, copyConsole: Bool, extra: String) -> String {
        let ports = (0..<AgentProtocol.portNames.count).map { "vport\(consoleIndex)p\($0)" }.joined(separator: ",")
        var cmdline = Machine.rootFilesystemCommandLine(init: agentPath) + " AIRLOCK_PORTS=\(ports)"
        if !copyConsole { cmdline += " quiet" }
        if !extra.isEmpty { cmdline += " " + extra }
        return cmdline
    }

    /// The whole command line the kernel of a session with `diskCount` disks beside the
    /// root filesystem boots with (the devices come first, then the console), computed
    /// without building anything; nil when it would not fit.
    public static func whole(guestMode: HostProfile.GuestMode, diskCount: Int, agentPath: String, copyConsole: Bool, extra: String) -> String? {
        let consoleIndex = 1 + diskCount
        return Machine.kernelCommandLine(guestMode: guestMode, virtioDeviceCount: consoleIndex + 1,
                                         extra: sessionPart(agentPath: agentPath, consoleIndex: consoleIndex, copyConsole: copyConsole, extra: extra))
    }
}

/// One booted VM with its agent: the engine behind a session. Its methods
/// block (they wait on the guest) and are called from one controller thread.
///
/// Threads: the vCPU thread runs the machine and decodes guest frames; one
/// writer thread per output port delivers output; a feeder thread pushes a
/// run's stdin; the controller (the session server's main thread) waits on
/// `events` and makes every decision (timeouts included). `signal` may come
/// from any thread.
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
    static let controlPort = 0, stdoutPort = 1, stderrPort = 2

    let request: BootRequest
    let logger: Logger
    let machine: Machine
    let console: ConsoleDevice
    let transport: MMIOTransport
    let stdoutPump = OutputPump(name: AgentProtocol.stdoutPortName)
    let stderrPump = OutputPump(name: AgentProtocol.stderrPortName)
    let consoleLog: ConsoleLog

    private let events = EventQueue()
    private let inputSpace = DispatchSemaphore(value: 0)
    /// Held while one whole frame is pushed into the control port, so frames never interleave.
    private let controlWrite = DispatchSemaphore(value: 1)
    private let busy = DispatchSemaphore(value: 1)
    /// Set by the machine's thread when `Machine.run` has returned (before the event is posted).
    private let vmFinished = OneWayFlag()

    private var helloAt: UInt64 = 0
    private var firstRunDone = false
    /// Where the machine thread waits while the VM is paused for a snapshot.
    private let pauseGate = PauseGate()
    /// The snapshot this VM was restored from (nil: it booted), and what building it took (ms).
    private(set) var restoredFrom: String?
    private var restoreMs = 0.0
    private(set) var exit: MachineExit?
    private(set) var endError: String?

    /// Builds the machine (KVM objects, memory, devices, kernel) without starting it. With a
    /// snapshot among `files`, the machine is built from it instead: guest RAM mapped
    /// copy-on-write from its memory image, the same devices bound to this session's root
    /// filesystem and console ports, the saved state restored (all before any filter).
    init(_ request: BootRequest, files: BootFiles, hostProfile: HostProfile, logger: Logger,
         vcpuThreadSetup: (@Sendable (UInt32) throws -> Void)?) throws(SessionFailure) {
        self.request = request
        self.logger = logger
        consoleLog = ConsoleLog(copyTo: request.copyConsoleToStderr ? 2 : nil)
        let initStarted = monotonicNanoseconds()
        // The supervisor checked the file whole; this process trusts no file all the same, and
        // reads the header, manifest and state again (not the RAM image: the supervisor
        // verified its digest, and the mapping is private, so nothing here can change it).
        var snapshot: SnapshotFile?
        if let fd = files.snapshot {
            let name = request.snapshotName ?? "the snapshot"
            do throws(SnapshotError) { snapshot = try SnapshotFile(file: fd, path: name) } catch {
                throw SessionFailure(kind: .invalidConfiguration, message: error.description, vmEnded: true)
            }
        }

        var mc = MachineConfig()
        mc.memoryBytes = UInt64(request.memoryMiB) << 20
        mc.vcpuCount = Int(request.cpus)
        mc.console = consoleLog
        mc.logger = logger
        mc.vcpuThreadSetup = vcpuThreadSetup
        mc.hostProfile = hostProfile
        mc.memoryImage = snapshot?.memoryImage

        let inputSpace = self.inputSpace
        let events = self.events
        let post: @Sendable (Event) -> Void = { events.post($0) }
        let control = ControlChannel(post: post)
        do throws(VMMError) {
            do { mc.kvm = try KVMSystem(descriptor: files.kvm) } catch { throw .kvm(error) }
            machine = try Machine(mc)
            let kernel: MappedFile
            var disks: [BlockDevice] = []
            do throws(FileAccessError) {
                kernel = try MappedFile(descriptor: files.kernel, path: request.kernelName, role: "guest kernel")
                disks.append(try BlockDevice(descriptor: files.rootfs, path: request.rootfsName, readOnly: true))
                for (disk, fd) in zip(request.disks, files.disks) {
                    disks.append(try BlockDevice(descriptor: fd, path: disk.name, readOnly: disk.readOnly))
                }
            } catch { throw .invalidConfiguration(error.description) }
            for disk in disks { try machine.addBlockDevice(disk) }
            let consoleIndex = machine.virtioDeviceCount
            let added = try machine.addConsoleDevice(ports: [
                .init(name: AgentProtocol.controlPortName, output: control, inputConsumed: { inputSpace.signal() }),
                .init(name: AgentProtocol.stdoutPortName, output: stdoutPump),
                .init(name: AgentProtocol.stderrPortName, output: stderrPump),
            ])
            console = added.console
            transport = added.transport
            let cmdline = SessionCommandLine.sessionPart(agentPath: request.agentPath, consoleIndex: consoleIndex,
                                                         copyConsole: request.copyConsoleToStderr, extra: request.kernelCommandLine)
            if let snapshot {
                // The snapshot's guest booted with the command line this session would have
                // given it, or its devices and agent ports are not where this session puts them.
                guard let mode = HostProfile.GuestMode(rawValue: snapshot.manifest.guestMode) else {
                    throw VMMError.invalidConfiguration(SnapshotError.foreign(
                        path: snapshot.path, detail: "its guest ran in mode '\(snapshot.manifest.guestMode)', which this Airlock does not know").description)
                }
                let expected = Machine.kernelCommandLine(guestMode: mode, virtioDeviceCount: machine.virtioDeviceCount, extra: cmdline)
                guard snapshot.manifest.commandLine == expected else {
                    throw VMMError.invalidConfiguration(SnapshotError.foreign(
                        path: snapshot.path, detail: "its guest booted with '\(snapshot.manifest.commandLine)', this sandbox's would boot with '\(expected ?? "")'").description)
                }
                try machine.restore(snapshot.state, guestMode: mode)
            } else {
                try machine.loadLinux(kernel: kernel, initrd: nil, extraCommandLine: cmdline)
            }
        } catch {
            if let snapshot {
                throw SessionFailure(kind: .invalidConfiguration, message: "snapshot \(snapshot.path) cannot be restored here: \(error.description)", vmEnded: true)
            }
            throw SessionFailure(kind: .vmm, message: error.description, vmEnded: true)
        }
        if let snapshot {
            restoredFrom = snapshot.path
            restoreMs = Double(monotonicNanoseconds() &- initStarted) / 1e6
        }
        // Weak: the transport reaches the pumps through the console's ports, so a strong capture
        // would be a cycle that keeps the machine (its guest RAM, the VM and /dev/kvm descriptors)
        // alive after the session is gone: a long-lived program with in-process VMMs leaked one per VM.
        let transport = self.transport
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

    var ended: Bool { exit != nil || endError != nil }

    /// How the VM ended, once it has ("reset on vCPU 0: i8042 reset ...").
    var systemEvent: String? { exit?.event?.description }

    private var endDescription: String {
        if let endError { return "the VMM failed: \(endError)" }
        if let event = exit?.event { return "the guest ended (\(event))" }
        return "the VM was stopped"
    }

    private func failure(_ kind: SessionFailure.Kind, _ message: String, console: Bool = false) -> SessionFailure {
        SessionFailure(kind: kind, message: message, console: console ? consoleLog.capture.text : "", vmEnded: ended)
    }

    // MARK: - Boot

    /// Starts the vCPUs and waits for the agent's hello. The caller has locked the process
    /// down (seccomp) by now: every thread started here touches guest data.
    /// A VM restored from a snapshot is started and reported at once: its agent said hello
    /// before the snapshot was taken and waits for a run request.
    func boot() throws(SessionFailure) -> BootReport {
        busy.wait()
        defer { busy.signal() }
        func ms(_ from: UInt64, _ to: UInt64) -> Double { to > from ? Double(to - from) / 1e6 : 0 }
        if let restoredFrom {
            helloAt = monotonicNanoseconds()
            try startThreads()
            return BootReport(vmmStartMs: ms(request.requestedAt, monotonicNanoseconds()), kernelBootMs: 0, agent: restoredFrom,
                              guestMode: machine.guestMode.rawValue,
                              restored: true, restoreMs: restoreMs)
        }
        try startThreads()
        let rootfs = request.rootfsName, agentPath = request.agentPath
        let deadline = Self.deadline(after: request.bootTimeoutSeconds)
        while true {
            guard let event = nextEvent(until: deadline) else {
                destroy()
                throw failure(.agentDidNotStart, "the agent did not say hello within the \(Int(request.bootTimeoutSeconds)) s boot timeout: check that \(rootfs) has Airlock's agent at \(agentPath) (make rootfs), or raise --boot-timeout on a slow host", console: true)
            }
            switch event {
            case let .guest(.hello(version, agent)):
                helloAt = monotonicNanoseconds()
                logger.debug("agent ready: \(agent), protocol \(version)")
                let firstKVMRun = machine.firstRunNanoseconds
                return BootReport(vmmStartMs: ms(request.requestedAt, firstKVMRun), kernelBootMs: ms(firstKVMRun, helloAt), agent: agent,
                                  guestMode: machine.guestMode.rawValue)
            case let .guest(other):
                destroy()
                throw failure(.protocolViolation, "the agent sent \(other) before its hello: the guest is not running Airlock's agent")
            case let .protocolError(e):
                destroy()
                throw failure(.protocolViolation, "the agent in \(rootfs): \(e)")
            case let .vmEnded(result):
                record(result)
                throw failure(.agentDidNotStart, "\(endDescription) before the agent said hello: check that \(rootfs) has Airlock's agent at \(agentPath) (rebuild it with make rootfs)", console: true)
            case .progress:
                continue
            }
        }
    }

    /// Starts the output pumps and the machine's thread. The machine thread runs the vCPUs
    /// until the VM ends; while a snapshot is taken it waits, paused, at the gate, and then
    /// runs them on.
    private func startThreads() throws(SessionFailure) {
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
            throw SessionFailure(kind: .vmm, message: "cannot start the VM's threads: \(error)", vmEnded: true)
        }
    }

    // MARK: - Snapshots

    /// Pauses this VM, writes a snapshot of it into `file` (an empty file opened for
    /// writing by the supervisor), and lets it run on. Only a VM that has booted to its
    /// agent's hello and run nothing yet is saved: its guest holds nothing of any command,
    /// and its agent waits for the first request, which is where every restore takes over.
    func saveSnapshot(_ save: SnapshotSave, into file: OwnedFileDescriptor) throws(SessionFailure) -> SnapshotSaveReport {
        busy.wait()
        defer { busy.signal() }
        guard !ended else { throw failure(.ended, "the sandbox has ended: \(endDescription)") }
        guard helloAt != 0, !firstRunDone, restoredFrom == nil else {
            throw failure(.invalidConfiguration, "only a sandbox that booted and has run no command can be saved as a snapshot")
        }
        let pausedAt = monotonicNanoseconds()
        machine.pause()
        guard pauseGate.waitUntilPaused(seconds: 30) else {
            destroy()
            throw failure(.vmm, "the VM did not pause within 30 s to be saved; it was stopped")
        }
        defer { pauseGate.resume() }
        do throws(SnapshotError) {
            let state: MachineState
            do { state = try machine.captureState() } catch { throw SnapshotError.cannotSave(error.description) }
            guard let vcpu = state.vcpus.first else { throw SnapshotError.cannotSave("the VM has no vCPU to save") }
            let profile = machine.config.hostProfile
            let manifest = SnapshotManifest(
                createdAt: save.createdAt, kernelSHA256: save.kernelSHA256, rootfsSHA256: save.rootfsSHA256,
                commandLine: machine.commandLine, hostBackend: profile.snapshotBackendName,
                guestMode: machine.guestMode.rawValue, memoryBytes: state.memoryBytes, vcpuCount: state.vcpus.count,
                tscKHz: vcpu.tscKHz, xsaveSize: machine.xsaveSize, cpuid: vcpu.cpuid, dataPages: 0)
            let written = try SnapshotWriter.write(fd: file.rawValue, path: save.name, manifest: manifest, state: state, memory: machine.memory)
            var report = SnapshotSaveReport()
            report.fileSize = written.fileSize
            report.allocatedBytes = written.allocatedBytes
            report.dataPages = UInt64(written.dataPages)
            report.residentPages = UInt64(written.residentPages)
            report.totalPages = UInt64(written.totalPages)
            report.writeMs = written.seconds * 1000
            report.pausedMs = Double(monotonicNanoseconds() &- pausedAt) / 1e6
            return report
        } catch {
            throw failure(.vmm, "the VM could not be saved to \(save.name): \(error)")
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

    /// Delivers `signal` to run `runID`'s command (the agent ignores it once the command has
    /// ended). Safe from any thread; it waits at most a few seconds for the guest to take it.
    func signal(runID: UInt32, signal: Int32) {
        let finished = vmFinished
        let by = Self.deadline(after: 5)
        if !pushFrame(HostMessage.signal(runID: runID, signal: signal).encoded(), cancelled: { finished.isSet || monotonicNanoseconds() >= by }) {
            logger.warning("signal \(signal) for run \(runID) was not taken by the guest")
        }
    }

    /// Feeds a run's stdin from `descriptor` on its own thread; the returned flag stops it.
    private func startStdinFeeder(_ descriptor: OwnedFileDescriptor, runID: UInt32) -> OneWayFlag? {
        let flag = OneWayFlag()
        do {
            try startDetachedThread { [self] in feedStdin(descriptor, runID: runID, flag: flag) }
        } catch {
            logger.error("cannot start the stdin thread: \(error); the command gets no input")
            return nil
        }
        return flag
    }

    private func feedStdin(_ descriptor: OwnedFileDescriptor, runID: UInt32, flag: OneWayFlag) {
        let cancelled = { flag.isSet }
        reading: while true {
            switch Self.readChunk(fd: descriptor.rawValue, max: AgentProtocol.Limits.stdinChunk, flag: flag) {
            case let .data(d):
                guard pushFrame(HostMessage.stdin(runID: runID, data: d).encoded(), cancelled: cancelled) else { return }
            case .endOfFile:
                break reading
            case .cancelled:
                return
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

/// The exit statuses a run reports for its own failures (shared with every caller through
/// `SandboxExitCode`, which repeats these values).
public enum RunExitCode {
    public static let timeout: Int32 = 124
    public static let airlockFailed: Int32 = 125
    public static let notExecutable: Int32 = 126
    public static let commandNotFound: Int32 = 127
}

extension RunFailure {
    var exitCode: Int32 {
        switch self {
        case .commandNotFound: return RunExitCode.commandNotFound
        case .notExecutable: return RunExitCode.notExecutable
        case .setup: return RunExitCode.airlockFailed
        }
    }
}

extension VMSession {
    /// Runs one command and waits for its end, writing its output to `stdout` and `stderr`
    /// (and feeding `stdin`, when given). With `shutdownAfter` the agent syncs and reboots
    /// after reporting, and this waits for the VM to end. `onStarted` runs when the command
    /// has started in the guest.
    func run(_ spec: RunSpec, stdin: OwnedFileDescriptor?, stdout: OwnedFileDescriptor, stderr: OwnedFileDescriptor,
             onStarted: (UInt32) -> Void = { _ in }) throws(SessionFailure) -> RunOutcome {
        busy.wait()
        defer { busy.signal() }
        guard !ended else { throw failure(.ended, "the sandbox has ended: \(endDescription)") }
        let request = spec.agentRequest
        if let problem = request.limitProblem {
            throw failure(.invalidConfiguration, "\(problem): pass large inputs on stdin or in a file instead")
        }
        let runID = spec.runID
        let firstRun = !firstRunDone
        firstRunDone = true
        let requested = firstRun ? helloAt : monotonicNanoseconds()

        stdoutPump.begin(stdout, limit: spec.maxStdoutBytes)
        stderrPump.begin(stderr, limit: spec.maxStderrBytes)
        var result = RunOutcome()
        let finished = vmFinished
        // A guest that never posts receive buffers on the control port must not hold the caller forever.
        let takeBy = Self.deadline(after: Self.shutdownSeconds)
        guard pushFrame(HostMessage.run(request).encoded(), cancelled: { finished.isSet || monotonicNanoseconds() >= takeBy }) else {
            _ = stdoutPump.finish(); _ = stderrPump.finish()
            if !finished.isSet {
                destroy()
                throw failure(.protocolViolation, "the agent did not take the run request within \(Int(Self.shutdownSeconds)) s: the VM was stopped")
            }
            _ = waitForEnd(seconds: Self.shutdownSeconds)
            throw failure(.ended, "\(endDescription) before the run request was delivered")
        }

        var startedAt: UInt64 = 0, exitedAt: UInt64 = 0
        var report: (status: CommandStatus?, out: UInt64, err: UInt64)?
        var stdinFlag: OneWayFlag?
        defer { stdinFlag?.set() }
        // The agent may take as long to start the command as the guest may take to boot.
        var deadline: UInt64? = Self.deadline(after: self.request.bootTimeoutSeconds)
        waiting: while report == nil {
            guard let event = nextEvent(until: deadline) else {
                if startedAt == 0 {
                    destroy()
                    throw failure(.protocolViolation, "the agent did not start the command within \(Int(self.request.bootTimeoutSeconds)) s")
                }
                // The command's time is up: the VM goes, with whatever it was doing.
                exitedAt = monotonicNanoseconds()
                result.timedOut = true
                result.exitCode = RunExitCode.timeout
                destroy()
                break waiting
            }
            switch event {
            case let .guest(.started(id, pid)) where id == runID && startedAt == 0:
                startedAt = monotonicNanoseconds()
                logger.debug("run \(runID) started as guest pid \(pid)")
                onStarted(runID)
                if let stdin { stdinFlag = startStdinFeeder(stdin, runID: runID) }
                deadline = spec.timeoutSeconds.map { startedAt &+ UInt64(max(0, min($0, 1e9)) * 1e9) }
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
                throw failure(.protocolViolation, "the agent sent \(other) during run \(runID): the guest is not following Airlock's protocol")
            case let .protocolError(e):
                destroy()
                throw failure(.protocolViolation, "the agent broke the protocol: \(e)")
            case let .vmEnded(r):
                record(r)
                exitedAt = monotonicNanoseconds()
                result.failure = "\(endDescription) before the command finished"
                result.exitCode = RunExitCode.airlockFailed
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
        result.stdoutBytes = out.delivered
        result.stderrBytes = err.delivered
        result.stdoutDropped = out.dropped
        result.stderrDropped = err.dropped
        result.stderrEndsMidLine = err.endsMidLine

        if spec.shutdownAfter && !ended {
            if !waitForEnd(seconds: Self.shutdownSeconds) {
                logger.warning("the guest did not reboot within \(Int(Self.shutdownSeconds)) s of the command's end; stopping it")
                destroy()
            }
        }
        let endedAt = monotonicNanoseconds()
        result.systemEvent = systemEvent
        if let endError, result.failure == nil { result.failure = "the VMM failed: \(endError)" }

        // 0 for a phase that never began (a guest that ended before the command started).
        func ms(_ from: UInt64, _ to: UInt64) -> Double { from != 0 && to > from ? Double(to - from) / 1e6 : 0 }
        let firstKVMRun = machine.firstRunNanoseconds
        if firstRun {
            result.timings.vmmStartMs = ms(self.request.requestedAt, firstKVMRun)
            result.timings.kernelBootMs = restoredFrom == nil ? ms(firstKVMRun, helloAt) : 0
        }
        result.timings.agentReadyMs = ms(requested, startedAt)
        result.timings.commandMs = ms(startedAt, exitedAt)
        result.timings.shutdownMs = ended ? ms(exitedAt, endedAt) : 0
        result.timings.totalMs = ms(firstRun ? self.request.requestedAt : requested, endedAt)
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

    /// Stops the vCPUs from any thread (the supervisor hung up mid-run): a run in progress
    /// sees the VM end and returns.
    func stop() {
        machine.stop(with: nil)
        pauseGate.resume()
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

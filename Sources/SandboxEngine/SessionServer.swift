import AgentProtocol
import AirlockOS
import Dispatch
import Logging
import SessionProtocol
import Snapshot
import Synchronization
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// The VMM side of a session: hosts one VM for its whole life and serves the session
/// protocol (SessionProtocol.swift) to one supervisor over `channel`.
///
/// The same code runs jailed in `airlock-vmm` and, for the unjailed debug mode, on a thread
/// of the caller's process (the supervisor then talks to it over a socketpair all the same).
///
/// Threads: the thread that calls `serve` reads the boot request, builds the machine,
/// locks the process down (`hooks.beforeThreads`, the jail's seccomp), and only then starts
/// the others, which therefore inherit that lockdown: a reader that takes the supervisor's
/// messages (signals are delivered at once, the rest is queued) and the VM's own threads.
/// `serve` then carries out boot, runs and shutdown one at a time.
public final class SessionServer: @unchecked Sendable {
    // @unchecked: `session` is set once by the serving thread before the reader starts; the
    // inbox is a Mutex plus a semaphore.
    let channel: SessionChannel
    let hooks: EngineHooks
    let logger: Logger
    private var session: VMSession?
    private let inbox = Mutex<[Incoming]>([])
    private let inboxSignal = DispatchSemaphore(value: 0)

    /// What the reader hands the serving thread.
    enum Incoming {
        case message(SupervisorMessage, [OwnedFileDescriptor])
        case closed
        case broken(String)
    }

    /// At most this many requests wait: a supervisor sends one at a time.
    static let inboxLimit = 64

    public init(channel: SessionChannel, hooks: EngineHooks = EngineHooks(), logger: Logger) {
        self.channel = channel
        self.hooks = hooks
        self.logger = logger
    }

    /// Serves the session to its end. Returns the process exit status: 0 when it ended as
    /// asked, with a failure it reported, or because the supervisor went away; 1 when the
    /// supervisor broke the protocol or the process could not lock itself down.
    public func serve() -> Int32 {
        // A reader that went away must be an EPIPE for the thread that writes, never a SIGPIPE for
        // the process (in the debug mode this process is the caller's). Every thread started from
        // here inherits the mask.
        var pipeSignal = sigset_t()
        sigemptyset(&pipeSignal)
        sigaddset(&pipeSignal, SIGPIPE)
        pthread_sigmask(SIG_BLOCK, &pipeSignal, nil)
        guard send(.hello(version: SessionProtocol.version)) else { return 0 }
        // The boot request, on this thread: nothing else runs before the lockdown.
        let boot: BootRequest
        let files: BootFiles
        switch receiveDirectly() {
        case let .message(.boot(request), fds)?:
            guard fds.count == request.descriptorCount else {
                return refuse("boot came with \(fds.count) descriptors, not the \(request.descriptorCount) it names")
            }
            boot = request
            let diskEnd = 3 + request.disks.count
            files = BootFiles(kvm: fds[0], kernel: fds[1], rootfs: fds[2], disks: Array(fds[3..<diskEnd]),
                              snapshot: request.snapshotName == nil ? nil : fds[diskEnd])
        case let .message(other, _)?:
            return refuse("the first request was \(other.name), not boot")
        case let .broken(why)?:
            return refuse(why)
        case .closed?, nil:
            return 0
        }
        guard let profile = HostProfile(wireName: boot.hostProfile) else {
            return refuse("unknown host profile '\(boot.hostProfile)': the supervisor and airlock-vmm must come from the same Airlock build")
        }
        let session: VMSession
        do {
            session = try VMSession(boot, files: files, hostProfile: profile, logger: logger, vcpuThreadSetup: hooks.vcpuThreadSetup)
        } catch {
            _ = send(.failed(error))
            return 0
        }
        self.session = session
        // libcrypto sets itself up on its first digest (it may read its configuration files):
        // done now, before the filters forbid opening anything, so a later snapshot save can hash.
        SnapshotWriter.prepare()
        do {
            // The machine is built; from here on threads touch guest data.
            try hooks.beforeThreads?()
        } catch {
            _ = send(.failed(SessionFailure(kind: .vmm, message: "the sandbox could not lock the VMM down before starting it: \(error)", vmEnded: true)))
            return 1
        }
        do {
            try startDetachedThread { [self] in readLoop() }
        } catch {
            _ = send(.failed(SessionFailure(kind: .vmm, message: "cannot start the session's reader thread: \(error)", vmEnded: true)))
            return 1
        }

        do {
            let report = try session.boot()
            guard send(.booted(report)) else { session.destroy(); return 0 }
        } catch {
            _ = send(.failed(error))
            if !session.ended { session.destroy() }
            return 0
        }

        while true {
            switch nextIncoming() {
            case let .message(.snapshot(save), fds):
                guard fds.count == 1 else {
                    session.destroy()
                    return refuse("snapshot came with \(fds.count) descriptors, not the 1 it names")
                }
                do {
                    guard send(.snapshotSaved(try session.saveSnapshot(save, into: fds[0]))) else { session.destroy(); return 0 }
                } catch {
                    _ = send(.failed(error))
                    if session.ended {
                        _ = send(.ended(systemEvent: session.systemEvent))
                        return 0
                    }
                }
            case let .message(.run(spec), fds):
                guard fds.count == spec.descriptorCount else {
                    session.destroy()
                    return refuse("run \(spec.runID) came with \(fds.count) descriptors, not the \(spec.descriptorCount) it names")
                }
                do {
                    let outcome = try session.run(spec, stdin: spec.hasStdin ? fds[2] : nil, stdout: fds[0], stderr: fds[1],
                                                  onStarted: { [self] id in _ = send(.started(runID: id)) })
                    guard send(.exited(runID: spec.runID, outcome)) else { session.destroy(); return 0 }
                } catch {
                    _ = send(.failed(error))
                }
                if session.ended {
                    _ = send(.ended(systemEvent: session.systemEvent))
                    return 0
                }
            case .message(.shutdown, _):
                session.shutdown()
                _ = send(.ended(systemEvent: session.systemEvent))
                return 0
            case let .message(other, _):
                session.destroy()
                return refuse("\(other.name) is not a request the VMM takes now")
            case .closed:
                // The supervisor is gone: nobody will read what the VM does.
                session.destroy()
                return 0
            case let .broken(why):
                session.destroy()
                return refuse(why)
            }
        }
    }

    /// Tells the supervisor why the session ends here, and returns the exit status for it.
    private func refuse(_ why: String) -> Int32 {
        logger.error("session: \(why)")
        _ = send(.failed(SessionFailure(kind: .protocolViolation, message: "the supervisor broke the session protocol: \(why)", vmEnded: true)))
        return 1
    }

    /// False when the supervisor is gone (it reads nothing more).
    private func send(_ message: VMMMessage) -> Bool {
        do { try channel.send(message.encoded()); return true } catch {
            logger.debug("session: the supervisor is gone (\(error))")
            return false
        }
    }

    /// One request read on the calling thread (before the reader thread exists).
    private func receiveDirectly() -> Incoming? {
        do {
            switch try channel.receive() {
            case let .frame(type, body):
                let message = try SupervisorMessage.decode(type: type, body: body)
                guard let fds = channel.takeDescriptors(message.descriptorCount) else {
                    return .broken("\(message.name) came without the \(message.descriptorCount) descriptors it names")
                }
                return .message(message, fds)
            case .closed: return .closed
            case .timedOut: return nil
            }
        } catch {
            return .broken("\(error)")
        }
    }

    /// The reader thread: signals go straight to the VM, everything else to the inbox.
    private func readLoop() {
        while true {
            let next = receiveDirectly() ?? .closed
            if case let .message(.signal(runID, signo), _) = next {
                session?.signal(runID: runID, signal: signo)
                continue
            }
            let ends: Bool
            switch next {
            case .closed, .broken: ends = true
            case .message: ends = false
            }
            if ends { session?.stop() }
            let queued = inbox.withLock { q -> Bool in
                guard q.count < Self.inboxLimit else { return false }
                q.append(next)
                return true
            }
            if !queued {
                inbox.withLock { $0.append(.broken("more than \(Self.inboxLimit) requests waiting: the supervisor is flooding the session")) }
                session?.stop()
                inboxSignal.signal()
                return
            }
            inboxSignal.signal()
            if ends { return }
        }
    }

    private func nextIncoming() -> Incoming {
        while true {
            if let item = inbox.withLock({ q -> Incoming? in q.isEmpty ? nil : q.removeFirst() }) { return item }
            inboxSignal.wait()
        }
    }
}

extension SupervisorMessage {
    var name: String {
        switch self {
        case .boot: return "boot"
        case .run: return "run"
        case .signal: return "signal"
        case .shutdown: return "shutdown"
        case .snapshot: return "snapshot"
        }
    }
}

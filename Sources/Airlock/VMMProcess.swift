import AirlockOS
import Dispatch
import Jailer
import Logging
import SandboxEngine
import SessionProtocol
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Where a sandbox's VMM runs: a jailed `airlock-vmm` process (the default), or, for
/// debugging, a thread of this process serving the same protocol.
protocol VMMHost: Sendable {
    /// Ends the VMM now (the VM with it). Safe from any thread, more than once.
    func terminate()
    /// Waits (up to `seconds`) for the VMM to be gone, removes what it leaves (its jail),
    /// and says how it ended when that is not a clean exit.
    func reap(seconds: Double) -> VMMEnd
}

/// How a VMM ended, as far as the supervisor can tell.
enum VMMEnd: Equatable, Sendable {
    case clean
    case seccompViolation
    case jailSetupFailed
    case other(String)
}

/// The jail's limits for one VM, and who runs it.
enum VMMJail {
    /// Guest RAM plus this for the VMM process itself (measured peaks: 23-33 MB).
    static let memoryAllowance: UInt64 = 128 << 20
    /// CPUs beyond one per vCPU for the VMM's own threads (output, stdin, the controller).
    static let cpuAllowance = 0.5
    /// The session socket's descriptor number in `airlock-vmm`.
    static let sessionDescriptor: Int32 = 3

    /// One supervisor per process: it sweeps jails that dead supervisors left, once.
    private static let shared = Mutex<JailSupervisor?>(nil)

    static func supervisor(logger: Logger) throws(SandboxError) -> JailSupervisor {
        let made: Result<JailSupervisor, SandboxError> = shared.withLock { s in
            if let s { return .success(s) }
            do {
                let supervisor = try JailSupervisor()
                let swept = try supervisor.sweep()
                if !swept.isEmpty { logger.notice("removed \(swept.count) jails left by earlier runs: \(swept)") }
                s = supervisor
                return .success(supervisor)
            } catch {
                return .failure(.jail("\(error)"))
            }
        }
        return try made.get()
    }

    /// The `airlock-vmm` to run: the configured one, $AIRLOCK_VMM, or the one installed beside
    /// this program. Named explicitly, never this program itself.
    static func executable(_ configured: String?) throws(SandboxError) -> String {
        func usable(_ path: String) -> Bool { access(path, X_OK) == 0 }
        if let configured {
            guard usable(configured) else {
                throw .invalidConfiguration("the VMM executable '\(configured)' (SandboxConfig.vmmExecutable) is not an executable file: give the path of airlock-vmm")
            }
            return configured
        }
        if let env = getenv("AIRLOCK_VMM").map({ String(cString: $0) }), !env.isEmpty {
            guard usable(env) else {
                throw .invalidConfiguration("AIRLOCK_VMM='\(env)' is not an executable file: point it at airlock-vmm (swift build --product airlock-vmm)")
            }
            return env
        }
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        if n > 0 {
            let exe = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            let beside = String(exe[..<(exe.lastIndex(of: "/") ?? exe.startIndex)]) + "/airlock-vmm"
            if usable(beside) { return beside }
        }
        throw .invalidConfiguration("airlock-vmm, the program that runs the jailed VM, was not found beside this program: install it beside it, or set SandboxConfig.vmmExecutable or $AIRLOCK_VMM to the airlock-vmm built with this Airlock (swift build --product airlock-vmm)")
    }
}

/// A jailed `airlock-vmm`.
final class JailedVMM: VMMHost {
    let jail: PreparedJail
    let child: JailedChild
    private let supervisor: JailSupervisor
    private let logger: Logger

    /// Makes the VM's jail and starts `executable` in it with the session socket on fd 3.
    /// `stderr` is the VMM's fd 2 (its log lines, the guest console when asked, a seccomp report).
    static func launch(executable: String, arguments: [String], socket: UnixSocket, limits: CgroupLimits,
                       writableBytes: UInt64, stderr: Int32, tag: String, logger: Logger) throws(SandboxError) -> JailedVMM {
        let supervisor = try VMMJail.supervisor(logger: logger)
        let id = "\(tag)-\(getpid())-\(VMMIDs.next())"
        let jail: PreparedJail
        do {
            jail = try supervisor.prepare(id: id, JailRequest(limits: limits, fileSizeLimit: writableBytes))
        } catch {
            throw .jail("\(error)")
        }
        let devNull = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { if devNull >= 0 { close(devNull) } }
        guard devNull >= 0 else { throw .vmm("cannot open /dev/null: \(String(cString: strerror(errno)))") }
        let child: JailedChild
        do {
            child = try jail.spawn(executable: executable, arguments: arguments,
                                   fds: [0: devNull, 1: devNull, 2: stderr, VMMJail.sessionDescriptor: socket.descriptor.rawValue])
        } catch {
            try? jail.destroy()
            supervisor.removeEmptyCgroupParents()
            throw .jail("\(error)")
        }
        return JailedVMM(jail: jail, child: child, supervisor: supervisor, logger: logger)
    }

    private init(jail: PreparedJail, child: JailedChild, supervisor: JailSupervisor, logger: Logger) {
        self.jail = jail
        self.child = child
        self.supervisor = supervisor
        self.logger = logger
    }

    func terminate() { child.terminate() }

    func reap(seconds: Double) -> VMMEnd {
        var exit = try? child.wait(timeout: seconds)
        if exit == nil {
            child.terminate()
            exit = try? child.wait(timeout: nil)
        }
        do { try jail.destroy() } catch { logger.error("cleaning up jail \(jail.id): \(error)") }
        supervisor.removeEmptyCgroupParents()
        switch exit {
        case .exited(0)?: return .clean
        case let e? where e.isSeccompViolation: return .seccompViolation
        case .exited(JailExitCode.setupFailed)?: return .jailSetupFailed
        case let e?: return .other("\(e)")
        case nil: return .other("it could not be waited for")
        }
    }
}

/// The unjailed debug mode: the same session server on a thread of this process.
final class InProcessVMM: VMMHost {
    private let done = OneShotLatch()
    private let socket: UnixSocket
    private let status = Mutex<Int32?>(nil)

    init(socket: UnixSocket, logger: Logger) throws(SandboxError) {
        self.socket = socket
        do {
            try startDetachedThread { [self] in
                let code = SessionServer(channel: SessionChannel(socket: socket), logger: logger).serve()
                status.withLock { $0 = code }
                done.open()
            }
        } catch {
            throw .vmm("cannot start the VMM thread: \(error)")
        }
    }

    /// The server sees its supervisor hang up and stops the VM.
    func terminate() { _ = shutdown(socket.descriptor.rawValue, Int32(SHUT_RDWR)) }

    func reap(seconds: Double) -> VMMEnd {
        if !done.wait(seconds: seconds) {
            terminate()
            _ = done.wait(seconds: 60)
        }
        switch status.withLock({ $0 }) {
        case 0?: return .clean
        case let code?: return .other("the in-process VMM ended with status \(code)")
        case nil: return .other("the in-process VMM did not stop within \(Int(seconds + 60)) s")
        }
    }
}

/// Opens once and stays open; waiters wake when it does.
final class OneShotLatch: Sendable {
    private let group = DispatchGroup()
    init() { group.enter() }
    func open() { group.leave() }
    func wait(seconds: Double) -> Bool {
        group.wait(timeout: .now() + .nanoseconds(Int(max(0, min(seconds, 1e6)) * 1e9))) == .success
    }
}

enum VMMIDs {
    private static let counter = Atomic<UInt64>(0)
    static func next() -> UInt64 { counter.wrappingAdd(1, ordering: .relaxed).newValue }
}

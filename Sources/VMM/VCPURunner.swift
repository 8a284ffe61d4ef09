import AirlockOS
import CAirlockShim
import KVM
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The signal that interrupts a vCPU thread blocked in KVM_RUN.
let kickSignal = SIGUSR2

/// How one vCPU thread ended.
public enum VCPUOutcome: Sendable {
    /// The guest ended itself.
    case event(SystemEvent)
    /// The machine asked this vCPU to stop (another vCPU's event, a device, a timeout).
    case stopped
    case failed(VMMError)
}

/// One vCPU's thread: an explicit state machine driven by a control channel
/// (`requestStop`) and a kick (immediate_exit plus a signal).
///
///     created --start()--> running --exit handled as stop / error--> finished
///                             \--requestStop()--> stopping --> finished
final class VCPURunner: @unchecked Sendable {
    // @unchecked: `vcpu` is used only by the thread this runner starts (and by
    // requestImmediateExit, which is thread-safe); all other state is in Mutexes.
    enum State: Equatable { case created, running, stopping, finished }

    let vcpu: VCPU
    let handler: ExitHandler
    private let state = Mutex<State>(.created)
    private let outcome = Mutex<VCPUOutcome?>(nil)
    private let thread = Mutex<pthread_t?>(nil)
    /// Called once, on the vCPU thread, when the loop ends.
    private let onFinish: @Sendable (VCPURunner) -> Void
    /// Set when the first KVM_RUN is entered (monotonic ns), for start-up timing.
    let firstRunAt = Atomic<UInt64>(0)

    /// Runs on the vCPU thread before the first KVM_RUN (seccomp, in a jail).
    private let threadSetup: (@Sendable (UInt32) throws -> Void)?

    init(vcpu: VCPU, handler: ExitHandler, threadSetup: (@Sendable (UInt32) throws -> Void)? = nil,
         onFinish: @escaping @Sendable (VCPURunner) -> Void) {
        self.vcpu = vcpu
        self.handler = handler
        self.threadSetup = threadSetup
        self.onFinish = onFinish
    }

    /// How the thread ended; nil until it has.
    var finalOutcome: VCPUOutcome? { outcome.withLock { $0 } }

    func start() throws(VMMError) {
        state.withLock { $0 = .running }
        var tid = pthread_t()
        let box = Unmanaged.passRetained(self)
        let rc = pthread_create(&tid, nil, { raw in
            let runner = Unmanaged<VCPURunner>.fromOpaque(raw!).takeRetainedValue()
            runner.loop()
            return nil
        }, box.toOpaque())
        guard rc == 0 else {
            box.release()
            state.withLock { $0 = .finished }
            throw .thread("could not start the thread for vCPU \(vcpu.id): \(String(cString: strerror(rc)))")
        }
        thread.withLock { $0 = tid }
    }

    /// Asks the vCPU to stop at its next exit, and kicks it out of the guest now.
    func requestStop() {
        let wasRunning = state.withLock { s -> Bool in
            guard s == .running else { return false }
            s = .stopping
            return true
        }
        guard wasRunning else { return }
        // Order matters: the state first (checked before each KVM_RUN), then
        // immediate_exit (covers a thread about to enter KVM_RUN), then the
        // signal (interrupts one already inside it).
        vcpu.requestImmediateExit()
        if let tid = thread.withLock({ $0 }) { pthread_kill(tid, kickSignal) }
    }

    func join() {
        guard let tid = thread.withLock({ t -> pthread_t? in let v = t; t = nil; return v }) else { return }
        pthread_join(tid, nil)
    }

    private func loop() {
        var sigs = sigset_t()
        sigemptyset(&sigs)
        sigaddset(&sigs, kickSignal)
        pthread_sigmask(SIG_UNBLOCK, &sigs, nil)

        let result = runUntilStop()
        outcome.withLock { $0 = result }
        state.withLock { $0 = .finished }
        onFinish(self)
    }

    private func runUntilStop() -> VCPUOutcome {
        let handler = self.handler
        let vcpu = self.vcpu
        do {
            if let threadSetup {
                do { try threadSetup(vcpu.id) } catch {
                    return .failed(.thread("vCPU \(vcpu.id) thread set-up failed: \(error)"))
                }
            }
            firstRunAt.store(monotonicNanoseconds(), ordering: .relaxed)
            while true {
                if state.withLock({ $0 }) == .stopping {
                    // The last exit may be a port or MMIO read KVM completes only on the
                    // next KVM_RUN: let it complete now, so a saved state holds the value.
                    try vcpu.completePendingExit()
                    return .stopped
                }
                let exit = try vcpu.run()
                let action = try vcpu.withExitData { (data) throws(VMMError) -> ExitAction in
                    try handler.handle(exit, data: data, vcpu: vcpu)
                }
                if case let .stop(event) = action { return .event(event) }
            }
        } catch let error as VMMError {
            return .failed(error)
        } catch let error as KVMError {
            return .failed(.kvm(error))
        } catch {
            return .failed(.thread("vCPU \(vcpu.id): \(error)"))
        }
    }
}

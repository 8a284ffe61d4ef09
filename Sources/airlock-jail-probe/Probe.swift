import CAirlockShim
import CJailShim
import Jailer
#if canImport(Glibc)
import Glibc
#endif

func say(_ line: String) {
    let text = line + "\n"
    _ = text.utf8CString.withUnsafeBufferPointer { Glibc.write(1, $0.baseAddress, $0.count - 1) }
}

func fail(_ message: String, code: Int32) -> Never {
    let text = "airlock-jail-probe: \(message)\n"
    _ = text.utf8CString.withUnsafeBufferPointer { Glibc.write(2, $0.baseAddress, $0.count - 1) }
    exit(code)
}

struct Options: Sendable {
    var violation: String?
    var violationThread = "main"
    var allowedIoctl = false
    var hold = false
    var mallocChurn = false

    init(_ arguments: [String]) {
        var args = arguments[...]
        while let arg = args.popFirst() {
            switch arg {
            case "--violate": violation = args.popFirst()
            case "--on": violationThread = args.popFirst() ?? "main"
            case "--allowed-ioctl": allowedIoctl = true
            case "--hold": hold = true
            case "--malloc-churn": mallocChurn = true
            default: fail("unknown argument \(arg)", code: 2)
            }
        }
    }
}

/// Makes the forbidden call; returns only if the filter let it through.
func breakRule(_ kind: String, kvmFd: Int32) -> String {
    switch kind {
    case "execve": return "execve -> \(airlock_jail_probe_execve())"
    case "socket": return "socket(AF_INET) -> \(airlock_jail_probe_socket_inet())"
    case "open": return "openat(/etc/passwd) -> \(airlock_jail_probe_open("/etc/passwd"))"
    case "ioctl": return "ioctl(KVM_CREATE_VM) -> \(airlock_jail_probe_ioctl(kvmFd, KVMRequest.createVM.number))"
    case "mmap-exec": return "mmap(PROT_EXEC) -> \(airlock_jail_probe_mmap_exec())"
    case "fork":
        // A plain fork through clone(2) without CLONE_THREAD; a child, if the
        // filter let one be made, leaves at once.
        let r = airlock_jail_probe_fork()
        if r == 0 { _exit(0) }
        return "clone(SIGCHLD) -> \(r)"
    default: fail("unknown violation \(kind)", code: 2)
    }
}

func allowedIoctl(on thread: String, kvmFd: Int32) {
    say("allowed ioctl(KVM_IRQ_LINE) on \(thread) -> \(airlock_jail_probe_ioctl(kvmFd, KVMRequest.irqLine.number))")
}

/// What the main thread and the vCPU-role thread share.
final class Shared: @unchecked Sendable {
    // @unchecked: the mutable fields are guarded by `mutex`; the rest never change.
    let options: Options
    let kvmFd: Int32
    private var mutex = pthread_mutex_t()
    private var cond = pthread_cond_t()
    var installed = false
    var failure: String?
    var go = false
    var done = false

    init(options: Options, kvmFd: Int32) {
        self.options = options
        self.kvmFd = kvmFd
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&cond, nil)
    }

    func update(_ body: (Shared) -> Void) {
        pthread_mutex_lock(&mutex)
        body(self)
        pthread_cond_broadcast(&cond)
        pthread_mutex_unlock(&mutex)
    }

    func wait(until ready: (Shared) -> Bool) {
        pthread_mutex_lock(&mutex)
        while !ready(self) { pthread_cond_wait(&cond, &mutex) }
        pthread_mutex_unlock(&mutex)
    }
}

/// The second thread, in the vCPU role, like VCPURunner: its filter first,
/// then it waits for "go" and does what it was asked.
func vcpuThread(_ context: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let shared = Unmanaged<Shared>.fromOpaque(context!).takeUnretainedValue()
    do { try Seccomp.install(.vcpu) } catch {
        shared.update { $0.failure = "\(error)"; $0.installed = true }
        return nil
    }
    shared.update { $0.installed = true }
    shared.wait { $0.go }
    if shared.options.allowedIoctl { allowedIoctl(on: "vcpu", kvmFd: shared.kvmFd) }
    if shared.options.mallocChurn {
        // Megabytes in blocks under malloc's mmap threshold, freed again: the
        // heap shrinks, as it does after a vCPU thread captured guest output.
        for _ in 0..<4 {
            let blocks = (0..<128).compactMap { _ in malloc(64 << 10) }
            for b in blocks { memset(b, 0x5A, 64 << 10) }
            for b in blocks.reversed() { free(b) }
        }
        say("malloc churn survived on vcpu")
    }
    if shared.options.violationThread == "vcpu", let rule = shared.options.violation {
        say("survived on vcpu: \(breakRule(rule, kvmFd: shared.kvmFd))")
        exit(3)
    }
    // Stays alive (as a vCPU thread does) until the main thread is done.
    shared.wait { $0.done }
    return nil
}

func probeMain() {
    let options = Options(Array(CommandLine.arguments.dropFirst()))
    do { _ = try Jail.enter() } catch { fail("\(error)", code: JailExitCode.setupFailed) }

    // What the jail looks like from inside, before any filter.
    var rootEntries: [String] = []
    if let dir = opendir("/") {
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            if name != "." && name != ".." { rootEntries.append(name) }
        }
        closedir(dir)
    }
    say("root \(rootEntries.sorted().joined(separator: " "))")
    say("ids \(getuid()) \(geteuid()) \(getgid()) \(getegid()) pid \(getpid())")
    // /dev/kvm for the ioctl checks: the jail has no /dev; the supervisor passes it on fd 3,
    // as Airlock's passes it to the VMM.
    let kvmFd: Int32 = fcntl(3, F_GETFD) >= 0 ? 3 : -1
    say("kvm \(kvmFd >= 0 ? "passed" : "absent")")
    if (options.violation == "ioctl" || options.allowedIoctl) && kvmFd < 0 {
        fail("no /dev/kvm descriptor on fd 3: the test must pass one", code: 4)
    }

    do { try Seccomp.install(.main) } catch { fail("\(error)", code: 5) }

    let shared = Shared(options: options, kvmFd: kvmFd)
    var thread = pthread_t()
    let started = pthread_create(&thread, nil, vcpuThread, Unmanaged.passUnretained(shared).toOpaque())
    if started != 0 { fail("pthread_create: \(String(cString: strerror(started)))", code: 6) }
    shared.wait { $0.installed }
    if let failure = shared.failure { fail("vcpu filter: \(failure)", code: 5) }
    say("ready")

    if options.allowedIoctl { allowedIoctl(on: "main", kvmFd: kvmFd) }
    if options.violationThread == "main", let rule = options.violation {
        say("survived on main: \(breakRule(rule, kvmFd: kvmFd))")
        exit(3)
    }
    shared.update { $0.go = true }

    if options.hold {
        var byte: UInt8 = 0
        while Glibc.read(0, &byte, 1) > 0 {}
    }
    shared.update { $0.done = true }
    pthread_join(thread, nil)
    withExtendedLifetime(shared) {}
    exit(0)
}

import AirlockOS
import CJailShim
import CSeccomp
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Installs the seccomp filters of `SeccompPolicy`.
///
/// How a violation surfaces: the filters' default action is SCMP_ACT_TRAP, so
/// a forbidden call is not executed and the kernel sends SIGSYS to the thread
/// that made it. The handler (C, async-signal-safe) writes one line to fd 2,
///
///     airlock: sandbox violation: the seccomp filter blocked system call execve (59) on the vcpu thread 7; the VMM exits with status 159
///
/// and ends the process with `JailExitCode.seccompViolation` (159). Should the
/// handler be unable to run (SIGSYS blocked or ignored when the trap fires),
/// the kernel kills the process with SIGSYS instead, and stage 1 of the jail
/// turns that death into the same exit status. Calls made under a foreign
/// architecture (int 0x80, x32) kill the process outright (SIGSYS).
/// The supervisor therefore sees exit status 159 for every violation
/// (`JailExit.isSeccompViolation`).
public enum Seccomp {
    /// Installs `role`'s filter on the calling thread.
    ///
    /// `.main` first (on the main thread, after the machine is built and
    /// before any thread that touches guest data starts): it compiles every
    /// role's filter while that is still allowed, installs the SIGSYS
    /// reporter, sets no_new_privs, and loads the main filter on all the
    /// process's threads (TSYNC), so threads started earlier are bound too.
    /// Then `.vcpu` at the start of each vCPU thread, before its first KVM_RUN.
    public static func install(_ role: ThreadRole) throws(JailError) {
        let programs = try compiledPrograms()
        let program = programs[role]!
        switch role {
        case .main:
            try prepareProcess()
            airlock_jail_set_thread_role(UnsafeRawPointer(role.cName.utf8Start).assumingMemoryBound(to: CChar.self))
            try load(program, flags: AIRLOCK_SECCOMP_FILTER_FLAG_TSYNC, role: role)
            mainInstalled.withLock { $0 = true }
        case .vcpu:
            // Under the main filter nothing but the seccomp call itself may
            // happen here: the program was compiled before it was loaded.
            if !mainInstalled.withLock({ $0 }) { try prepareProcess() }
            airlock_jail_set_thread_role(UnsafeRawPointer(role.cName.utf8Start).assumingMemoryBound(to: CChar.self))
            try load(program, flags: 0, role: role)
        }
    }

    /// The BPF program for every role, built once with libseccomp.
    public static func compiledPrograms() throws(JailError) -> [ThreadRole: [UInt8]] {
        try programs.withLock { (cached) throws(JailError) -> [ThreadRole: [UInt8]] in
            if let cached { return cached }
            var built: [ThreadRole: [UInt8]] = [:]
            for role in ThreadRole.allCases { built[role] = try compile(SeccompPolicy.rules(for: role), role: role) }
            cached = built
            return built
        }
    }

    /// The syscall number libseccomp gives `name` on this architecture, or nil.
    public static func syscallNumber(_ name: String) -> Int32? {
        let nr = seccomp_syscall_resolve_name(name)
        return nr == __NR_SCMP_ERROR ? nil : nr
    }

    private static let programs = Mutex<[ThreadRole: [UInt8]]?>(nil)
    private static let mainInstalled = Mutex(false)

    /// Builds one role's filter: default action TRAP, the rules, and a
    /// process kill for calls made under any other architecture.
    static func compile(_ rules: [SyscallRule], role: ThreadRole) throws(JailError) -> [UInt8] {
        guard let ctx = seccomp_init(SCMP_ACT_TRAP) else { throw .seccomp("seccomp_init failed (out of memory?)") }
        defer { seccomp_release(ctx) }
        var rc = seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS)
        guard rc == 0 else { throw .seccomp("cannot make foreign-architecture calls kill the process: \(String(cString: strerror(-rc)))") }
        for rule in rules {
            guard let nr = syscallNumber(rule.name) else {
                throw .seccomp("the \(role) allowlist names '\(rule.name)', which libseccomp does not know on this architecture: fix the name in SeccompPolicy")
            }
            let action: UInt32
            switch rule.action {
            case .allow: action = SCMP_ACT_ALLOW
            case let .errno(code): action = 0x0005_0000 | (UInt32(code) & 0xFFFF)  // SCMP_ACT_ERRNO(code)
            }
            for conditions in argumentConditions(rule.filter) {
                rc = conditions.withUnsafeBufferPointer {
                    seccomp_rule_add_exact_array(ctx, action, nr, UInt32($0.count), $0.baseAddress)
                }
                guard rc == 0 else {
                    throw .seccomp("libseccomp refused the \(role) rule for \(rule.name) (\(rule.filter)): \(String(cString: strerror(-rc)))")
                }
            }
        }
        return try export(ctx, role: role)
    }

    /// Each inner array is one libseccomp rule (its comparisons all hold);
    /// the rules for one syscall are alternatives.
    static func argumentConditions(_ filter: ArgumentFilter) -> [[scmp_arg_cmp]] {
        func cmp(_ arg: UInt32, _ op: scmp_compare, _ a: UInt64, _ b: UInt64 = 0) -> scmp_arg_cmp {
            scmp_arg_cmp(arg: arg, op: op, datum_a: a, datum_b: b)
        }
        switch filter {
        case .none:
            return [[]]
        case let .kvmRequests(requests):
            // The kernel reads the request as an unsigned int: compare the low 32 bits.
            return requests.map { [cmp(1, SCMP_CMP_MASKED_EQ, 0xFFFF_FFFF, UInt64($0.number))] }
        case .withoutProtExec:
            return [[cmp(2, SCMP_CMP_MASKED_EQ, UInt64(PROT_EXEC), 0)]]
        case .cloneThreadOnly:
            return [[cmp(0, SCMP_CMP_MASKED_EQ, UInt64(AIRLOCK_CLONE_THREAD), UInt64(AIRLOCK_CLONE_THREAD))]]
        case let .signalOtherThan(signal):
            return [[cmp(0, SCMP_CMP_NE, UInt64(signal))]]
        case .seccompFilterOnly:
            return [[cmp(0, SCMP_CMP_EQ, UInt64(AIRLOCK_SECCOMP_SET_MODE_FILTER)), cmp(1, SCMP_CMP_EQ, 0)]]
        }
    }

    /// libseccomp 2.5 exports BPF only to a descriptor: a pipe, read back.
    /// (Not a memfd: RLIMIT_FSIZE, 0 in a jail without writable disks,
    /// applies to it.) A filter is at most 4096 instructions, 32 KiB, which
    /// fits the pipe's 64 KiB; the write end is non-blocking all the same.
    private static func export(_ ctx: scmp_filter_ctx, role: ThreadRole) throws(JailError) -> [UInt8] {
        var fds: [Int32] = [-1, -1]
        _ = try jailCall("pipe2", "the \(role) seccomp program") { airlock_jail_pipe(&fds) }
        defer { close(fds[0]); close(fds[1]) }
        _ = fcntl(fds[1], F_SETFL, O_NONBLOCK)
        _ = fcntl(fds[0], F_SETFL, O_NONBLOCK)
        let rc = seccomp_export_bpf(ctx, fds[1])
        guard rc == 0 else { throw .seccomp("cannot export the \(role) filter: \(String(cString: strerror(-rc)))") }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fds[0], $0.baseAddress, $0.count) }
            if n <= 0 { break }
            bytes += chunk[0..<n]
        }
        guard !bytes.isEmpty, bytes.count % 8 == 0 else {
            throw .seccomp("the exported \(role) filter has \(bytes.count) bytes, not whole BPF instructions")
        }
        return bytes
    }

    /// Before the first filter: names for the report, the SIGSYS handler,
    /// glibc's time zone (a first localtime_r would open /etc/localtime, which
    /// a filter forbids), and no_new_privs (a filter needs it without CAP_SYS_ADMIN).
    private static func prepareProcess() throws(JailError) {
        for nr in Int32(0)..<512 {
            if let name = seccomp_syscall_resolve_num_arch(UInt32(SCMP_ARCH_NATIVE), nr) {
                airlock_jail_sigsys_set_name(nr, name)
                free(name)
            }
        }
        _ = try jailCall("sigaction(SIGSYS)") { airlock_jail_install_sigsys_reporter(JailExitCode.seccompViolation) }
        var now = time(nil)
        var parts = tm()
        _ = localtime_r(&now, &parts)
        // One malloc arena for every thread. glibc shrinks a thread's own arena
        // only after reading /proc/sys/vm/overcommit_memory once, with openat:
        // a vCPU thread that captured megabytes of guest output and freed them
        // was killed for that call. The main arena shrinks with brk instead.
        _ = airlock_jail_single_malloc_arena()
        _ = try jailCall("prctl(PR_SET_NO_NEW_PRIVS)") { airlock_jail_set_no_new_privs() }
    }

    private static func load(_ program: [UInt8], flags: UInt32, role: ThreadRole) throws(JailError) {
        let rc = program.withUnsafeBytes { airlock_jail_seccomp_load($0.baseAddress, UInt32($0.count / 8), flags) }
        if rc == 0 { return }
        if rc > 0 {
            throw .seccomp("thread \(rc) runs under a different filter, so the \(role) filter cannot be synchronised to it: install .main before starting threads")
        }
        throw .system(SystemError("seccomp(SECCOMP_SET_MODE_FILTER)", subject: "the \(role) filter", errno: errno),
                      hint: "the kernel needs CONFIG_SECCOMP_FILTER")
    }
}

import AirlockOS
#if canImport(Glibc)
import Glibc
#endif

/// Everything that can go wrong building, entering or removing a jail.
///
/// Each message names the path or value involved and what to do about it;
/// most of them mean the host is set up differently from what Airlock needs
/// (not root, no cgroup controller, a kernel without a feature).
public enum JailError: Error, CustomStringConvertible, Sendable, Equatable {
    /// A system call failed on a path or value; `hint` says what to do.
    case system(SystemError, hint: String)
    /// The spec or the supervisor's request is not usable as given.
    case invalid(String)
    /// Jail.enter was called with other threads already running.
    case multithreaded(threads: Int)
    /// No cgroup hierarchy offers the controllers the jail needs.
    case cgroupsUnavailable(String)
    /// libseccomp refused a rule or could not build a filter.
    case seccomp(String)
    /// libcap could not change the capability sets.
    case capabilities(String)
    /// Tearing a jail down left something behind; each entry names it.
    case cleanup([String])

    public var description: String {
        switch self {
        case let .system(error, hint):
            return hint.isEmpty ? "\(error)" : "\(error): \(hint)"
        case let .invalid(message):
            return message
        case let .multithreaded(threads):
            return "Jail.enter must run before the process starts any thread, but \(threads) threads are running: call it first thing in the jailed child, before logging, Dispatch or any async code"
        case let .cgroupsUnavailable(message):
            return message
        case let .seccomp(message):
            return "seccomp: \(message)"
        case let .capabilities(message):
            return "capabilities: \(message)"
        case let .cleanup(leftovers):
            return "jail clean-up left \(leftovers.count) thing(s) behind: " + leftovers.joined(separator: "; ")
        }
    }
}

/// Exit statuses the jail gives the VMM process (stage 1 passes them on).
public enum JailExitCode {
    /// A thread made a system call its seccomp filter forbids: the SIGSYS
    /// handler logged it and exited with this, and a kernel SIGSYS kill is
    /// turned into it by stage 1. 128 + SIGSYS, what a shell shows for a
    /// SIGSYS death.
    public static let seccompViolation: Int32 = 159
    /// The jail could not be set up (or stage 1 lost track of the VMM).
    public static let setupFailed: Int32 = 158
}

/// Runs a syscall wrapper that returns -1 with errno, retrying EINTR, and
/// turns a failure into `JailError.system` with a hint for the user.
@inline(__always)
func jailCall<T: FixedWidthInteger>(
    _ operation: @autoclosure () -> String, _ subject: String? = nil, hint: @autoclosure () -> String = "",
    _ body: () -> T
) throws(JailError) -> T {
    while true {
        let result = body()
        if result != -1 { return result }
        let code = errno
        if code == EINTR { continue }
        throw .system(SystemError(operation(), subject: subject, errno: code), hint: hint())
    }
}

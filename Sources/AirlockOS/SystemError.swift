#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A failed system call: which operation, on what, and the errno it returned.
public struct SystemError: Error, CustomStringConvertible, Equatable, Sendable {
    public let operation: String
    public let subject: String?
    public let errno: Int32

    public init(_ operation: String, subject: String? = nil, errno: Int32) {
        self.operation = operation
        self.subject = subject
        self.errno = errno
    }

    public var description: String {
        let reason = String(cString: strerror(errno))
        if let subject { return "\(operation) \(subject): \(reason) (errno \(errno))" }
        return "\(operation): \(reason) (errno \(errno))"
    }
}

/// Runs a system call that returns -1 and sets errno on failure, retrying on EINTR.
///
/// EBADF and EFAULT are bugs in Airlock (a closed fd or a bad pointer), never
/// something a user can act on, so they stop the process rather than propagate.
@inline(__always)
public func retryingSyscall<T: FixedWidthInteger>(
    _ operation: @autoclosure () -> String, subject: String? = nil, _ body: () -> T
) throws(SystemError) -> T {
    while true {
        let result = body()
        if result != -1 { return result }
        let code = Glibc.errno
        if code == EINTR { continue }
        if code == EBADF || code == EFAULT {
            preconditionFailure("\(operation()) failed with \(code == EBADF ? "EBADF" : "EFAULT"): a bug in Airlock")
        }
        throw SystemError(operation(), subject: subject, errno: code)
    }
}

/// Like `retryingSyscall`, but returns EINTR to the caller instead of retrying;
/// used where an interrupted call is the signal (KVM_RUN after a kick).
@inline(__always)
public func interruptibleSyscall<T: FixedWidthInteger>(
    _ operation: @autoclosure () -> String, _ body: () -> T
) -> Result<T, SystemError> {
    let result = body()
    if result != -1 { return .success(result) }
    let code = Glibc.errno
    if code == EBADF || code == EFAULT {
        preconditionFailure("\(operation()) failed with \(code == EBADF ? "EBADF" : "EFAULT"): a bug in Airlock")
    }
    return .failure(SystemError(operation(), errno: code))
}

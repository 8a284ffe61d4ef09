import AirlockOS
#if canImport(Glibc)
import Glibc
#endif

/// Errors from the KVM layer, phrased for the person running Airlock.
public enum KVMError: Error, CustomStringConvertible, Sendable {
    case deviceMissing(path: String)
    case deviceNotAccessible(path: String, errno: Int32)
    /// The file opens but is not KVM (KVM_GET_API_VERSION fails with ENOTTY).
    case notKVM(path: String)
    case unsupportedAPIVersion(Int32)
    case missingCapability(String)
    case ioctl(SystemError)
    /// A saved state (read from a snapshot) that this KVM cannot take back.
    case invalidState(String)

    public var description: String {
        switch self {
        case let .deviceMissing(path):
            return "\(path) does not exist: this host has no KVM. Load the kvm module (kvm_intel, kvm_amd or kvm_pvm) or run on a host with virtualization"
        case let .deviceNotAccessible(path, errno):
            return "\(path) is not accessible (\(String(cString: strerror(errno)))): run as root or add your user to the group that owns \(path) (often 'kvm')"
        case let .notKVM(path):
            return "\(path) is not the KVM device (it does not answer KVM_GET_API_VERSION): something else is mounted or linked there; give this process the real /dev/kvm (character device 10:232)"
        case let .unsupportedAPIVersion(v):
            return "KVM API version \(v) is not 12: this kernel's KVM is not supported"
        case let .missingCapability(name):
            return "KVM lacks \(name), which Airlock needs: use a newer host kernel"
        case let .ioctl(e):
            return "KVM: \(e)"
        case let .invalidState(why):
            return "KVM state: \(why)"
        }
    }
}

@inline(__always)
func kvmIoctl(_ fd: Int32, _ request: UInt, _ name: @autoclosure () -> String, _ arg: UnsafeMutableRawPointer?) throws(KVMError) -> Int32 {
    do {
        return try retryingSyscall(name()) { airlockIoctlPtr(fd, request, arg) }
    } catch { throw .ioctl(error) }
}

@inline(__always)
func kvmIoctl(_ fd: Int32, _ request: UInt, _ name: @autoclosure () -> String, value: UInt) throws(KVMError) -> Int32 {
    do {
        return try retryingSyscall(name()) { airlockIoctlVal(fd, request, value) }
    } catch { throw .ioctl(error) }
}

/// An ioctl whose argument is a byte buffer holding a KVM structure.
func kvmIoctl(_ fd: Int32, _ request: UInt, _ name: String, bytes: inout [UInt8]) throws(KVMError) -> Int32 {
    // Array's withUnsafeMutableBytes is rethrows, which erases the error type: carry it in a Result.
    let result = bytes.withUnsafeMutableBytes { p in
        Result { () throws(KVMError) -> Int32 in try kvmIoctl(fd, request, name, p.baseAddress) }
    }
    return try result.get()
}

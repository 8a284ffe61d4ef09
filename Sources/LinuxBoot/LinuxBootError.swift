import GuestMemory

/// Why a kernel, initrd or command line cannot be used, naming the file and what to do.
public enum LinuxBootError: Error, CustomStringConvertible, Equatable, Sendable {
    case unknownFormat(path: String, firstBytes: [UInt8])
    case truncated(path: String, what: String, needed: UInt64, fileSize: UInt64)
    case unsupportedELF(path: String, reason: String)
    case malformed(path: String, reason: String)
    case segmentOutsideMemory(path: String, segment: Int, address: UInt64, size: UInt64, ramEnd: UInt64)
    case unsupportedBzImage(path: String, reason: String)
    case initrdDoesNotFit(path: String, size: UInt64, room: UInt64)
    case commandLineTooLong(length: Int, capacity: Int)
    case commandLineInvalid(String)
    case tooManyMemoryRanges(Int)
    case memory(GuestMemoryError)

    static func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

    public var description: String {
        switch self {
        case let .unknownFormat(path, bytes):
            let shown = bytes.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined(separator: " ")
            return "kernel '\(path)' is neither an ELF vmlinux nor a bzImage (first bytes: \(shown)): pass an x86-64 vmlinux or bzImage"
        case let .truncated(path, what, needed, size):
            return "kernel '\(path)' is truncated: \(what) needs \(Self.hex(needed)) bytes but the file has \(Self.hex(size)): rebuild or re-copy it"
        case let .unsupportedELF(path, reason):
            return "kernel '\(path)' is not an x86-64 Linux vmlinux: \(reason)"
        case let .malformed(path, reason):
            return "kernel '\(path)' is malformed: \(reason)"
        case let .segmentOutsideMemory(path, segment, address, size, end):
            return "kernel '\(path)' segment \(segment) (\(Self.hex(address))+\(Self.hex(size))) does not fit in guest memory (RAM ends at \(Self.hex(end))): give the VM more --memory"
        case let .unsupportedBzImage(path, reason):
            return "kernel '\(path)' cannot be booted: \(reason)"
        case let .initrdDoesNotFit(path, size, room):
            return "initrd '\(path)' (\(size) bytes) does not fit in guest memory above the kernel (\(room) bytes free): give the VM more --memory or use a smaller initrd"
        case let .commandLineTooLong(length, capacity):
            return "kernel command line is \(length) bytes, more than the \(capacity - 1) the kernel accepts: shorten --cmdline"
        case let .commandLineInvalid(reason):
            return "kernel command line: \(reason)"
        case let .tooManyMemoryRanges(n):
            return "the memory map has \(n) ranges, more than the 128 boot_params can hold"
        case let .memory(e):
            return "loading the kernel: \(e)"
        }
    }
}

import GuestMemory

/// Why a kernel, initrd, command line or memory map cannot be used.
///
/// One case per kind of violation, so tests (and callers) can tell them apart;
/// every description names the file, the offending value and what to do, because
/// these reach the user of `airlock run` verbatim.
public enum LinuxBootError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The first bytes match neither an ELF header nor a bzImage setup header.
    case unrecognizedKernel(path: String, firstBytes: [UInt8])
    /// A structure the file describes lies (partly) past the end of the file.
    case truncated(path: String, what: String, start: UInt64, end: UInt64, fileSize: UInt64)
    /// An offset plus a length taken from the file passes 2^64: the file is corrupt or hostile.
    case rangeOverflows(path: String, what: String, offset: UInt64, length: UInt64)
    /// An ELF file that is not an x86-64 Linux vmlinux, or whose headers are inconsistent.
    case invalidELF(path: String, problem: ELFProblem)
    /// A bzImage this loader cannot boot through the 64-bit entry.
    case invalidBzImage(path: String, problem: BzImageProblem)
    /// An ELF PT_LOAD segment whose physical range is not guest RAM.
    case segmentOutsideMemory(path: String, segment: Int, address: UInt64, size: UInt64, ramEnd: UInt64)
    /// The memory a bzImage needs from its load address (file plus init_size) is not guest RAM.
    case bzImageOutsideMemory(path: String, address: UInt64, size: UInt64, ramEnd: UInt64)
    /// No RAM region has `size` bytes free above the kernel and below `limit` (inclusive).
    case initrdDoesNotFit(path: String, size: UInt64, room: UInt64, limit: UInt64)
    /// The command line (without its NUL) would be `length` bytes; `capacity` counts the NUL.
    case commandLineTooLong(length: Int, capacity: Int)
    /// A parameter that the kernel would misparse.
    case commandLineInvalid(parameter: String, reason: String)
    /// boot_params holds at most 128 e820 entries.
    case tooManyE820Entries(count: Int)
    /// The zero page's guest address is not RAM.
    case bootParamsOutsideMemory(address: GuestAddress)
    /// A guest write failed after validation said it would fit: a bug in this module.
    case guestMemory(path: String, GuestMemoryError)

    public var description: String {
        switch self {
        case let .unrecognizedKernel(path, bytes):
            let shown = bytes.isEmpty ? "the file is empty" : "first bytes " + bytes.map(Self.hexByte).joined(separator: " ")
            return "kernel '\(path)' is neither an ELF vmlinux nor a bzImage (\(shown)): pass an x86-64 vmlinux or bzImage"
        case let .truncated(path, what, start, end, size):
            return "kernel '\(path)' is truncated: \(what) needs bytes \(hex(start))-\(hex(end)) but the file has "
                + "\(hex(size)) bytes: the file is incomplete or damaged; copy or build it again"
        case let .rangeOverflows(path, what, offset, length):
            return "kernel '\(path)' is corrupt: \(what) at \(hex(offset)) + \(hex(length)) overflows 64 bits: "
                + "pass an unmodified x86-64 vmlinux or bzImage"
        case let .invalidELF(path, problem):
            return "kernel '\(path)' \(problem)"
        case let .invalidBzImage(path, problem):
            return "kernel '\(path)' \(problem)"
        case let .segmentOutsideMemory(path, segment, address, size, ramEnd):
            return "kernel '\(path)' segment \(segment) (\(hex(address))+\(hex(size))) does not fit in guest memory "
                + "(RAM ends at \(hex(ramEnd))): give the VM more --memory"
        case let .bzImageOutsideMemory(path, address, size, ramEnd):
            return "kernel '\(path)' needs guest memory \(hex(address))-\(hex(address &+ size)) to load and decompress "
                + "(RAM ends at \(hex(ramEnd))): give the VM more --memory"
        case let .initrdDoesNotFit(path, size, room, limit):
            return "initrd '\(path)' (\(size) bytes) does not fit in guest memory: at most \(room) bytes are free "
                + "above the kernel and below \(hex(limit &+ 1)): give the VM more --memory or use a smaller initrd"
        case let .commandLineTooLong(length, capacity):
            return "kernel command line would be \(length) bytes, but the kernel accepts at most \(capacity - 1) "
                + "(\(capacity) with the terminating NUL): shorten the extra command-line parameters"
        case let .commandLineInvalid(parameter, reason):
            return "kernel command-line parameter '\(Self.printable(parameter))' \(reason)"
        case let .tooManyE820Entries(count):
            return "the guest memory map has \(count) ranges, more than the \(BootParams.e820MaxEntries) boot_params "
                + "can hold: use fewer memory regions"
        case let .bootParamsOutsideMemory(address):
            return "boot_params at guest address \(address) is outside guest RAM: place the zero page inside RAM"
        case let .guestMemory(path, error):
            return "loading '\(path)' into guest memory failed after validation (\(error)): this is a bug in Airlock's loader"
        }
    }

    private static func hexByte(_ b: UInt8) -> String { b < 0x10 ? "0" + String(b, radix: 16) : String(b, radix: 16) }

    /// Control characters (a NUL, say) are shown escaped, so the message itself stays one clean line.
    static func printable(_ s: String) -> String {
        var out = ""
        for scalar in s.unicodeScalars {
            if scalar.value < 0x20 || scalar.value == 0x7F { out += "\\u{" + String(scalar.value, radix: 16) + "}" } else {
                out.unicodeScalars.append(scalar)
            }
        }
        return out
    }
}

/// "0x" and lowercase hex: the form addresses and sizes take in every message here.
func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

/// What is wrong with an ELF file. Descriptions read as a predicate on "kernel 'path' ...".
public enum ELFProblem: Equatable, Sendable, CustomStringConvertible {
    case notELF64(elfClass: UInt8)
    case notLittleEndian(encoding: UInt8)
    case notExecutable(type: UInt16)
    case notX86_64(machine: UInt16)
    case programHeaderSize(UInt16)
    case programHeaderCount(UInt16)
    case fileSizeExceedsMemorySize(segment: Int, fileSize: UInt64, memorySize: UInt64)
    case noLoadableSegment
    case entryOutsideSegments(entry: UInt64)

    public var description: String {
        let fix = "pass an x86-64 vmlinux (built with ARCH=x86_64)"
        switch self {
        case let .notELF64(c):
            return "is not a 64-bit ELF (EI_CLASS is \(c), 64-bit is 2): \(fix)"
        case let .notLittleEndian(d):
            return "is not a little-endian ELF (EI_DATA is \(d), little-endian is 1): \(fix)"
        case let .notExecutable(t):
            return "is not an executable ELF (e_type is \(t), ET_EXEC is 2; a module or object file?): \(fix)"
        case let .notX86_64(m):
            return "is an ELF for machine \(m), not x86-64 (62): \(fix)"
        case let .programHeaderSize(s):
            return "is corrupt: its program headers are \(s) bytes each, not 56: \(fix)"
        case let .programHeaderCount(n):
            return "is corrupt: it has \(n) program headers (expected 1 to \(ELFLoader.maxProgramHeaders)): \(fix)"
        case let .fileSizeExceedsMemorySize(i, f, m):
            return "is corrupt: segment \(i) has more file bytes (\(hex(f))) than memory bytes (\(hex(m))): \(fix)"
        case .noLoadableSegment:
            return "has no loadable (PT_LOAD) segment: \(fix)"
        case let .entryOutsideSegments(e):
            return "is corrupt: its entry point \(hex(e)) is outside every loadable segment: \(fix)"
        }
    }
}

/// What is wrong with a bzImage. Descriptions read as a predicate on "kernel 'path' ...".
public enum BzImageProblem: Equatable, Sendable, CustomStringConvertible {
    case badBootFlag(UInt16)
    case protocolTooOld(version: UInt16)
    case setupHeaderTooShort(end: UInt64)
    case notLoadedHigh
    case no64BitEntry
    case badKernelAlignment(UInt32)
    case runsBelowLoadAddress(UInt64)

    public var description: String {
        switch self {
        case let .badBootFlag(f):
            return "is not a bootable bzImage: boot_flag is \(hex(UInt64(f))), not 0xaa55: pass an x86-64 vmlinux or bzImage"
        case let .protocolTooOld(v):
            return "is a bzImage with boot protocol \(v >> 8).\(String(format2: v & 0xFF)), older than 2.12, which the "
                + "64-bit entry needs: use a Linux 3.8 or newer kernel"
        case let .setupHeaderTooShort(end):
            return "is corrupt: its setup header ends at \(hex(end)), before the fields boot protocol 2.12 defines "
                + "(up to 0x268): pass an unmodified bzImage"
        case .notLoadedHigh:
            return "is a zImage (loads below 1 MiB, LOADED_HIGH clear), not a bzImage: build a bzImage or pass the vmlinux"
        case .no64BitEntry:
            return "is a bzImage without a 64-bit entry point (XLF_KERNEL_64 is clear): build it for x86-64"
        case let .badKernelAlignment(a):
            return "is corrupt: it is relocatable but its kernel_alignment \(hex(UInt64(a))) is not a power of two: "
                + "pass an unmodified bzImage"
        case let .runsBelowLoadAddress(a):
            return "is not relocatable and runs at \(hex(a)), below the 1 MiB load address where the VMM keeps its "
                + "boot data: build it with CONFIG_RELOCATABLE or a CONFIG_PHYSICAL_START of 1 MiB or more"
        }
    }
}

extension String {
    /// Two decimal digits, as boot protocol minor versions are written (2.12, 2.05).
    init(format2 v: UInt16) { self = v < 10 ? "0\(v)" : "\(v)" }
}

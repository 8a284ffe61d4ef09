import AirlockOS
import GuestMemory

/// A kernel file's bytes, read only through bounds-checked accessors.
///
/// Every offset and length in a kernel image comes from the file itself, so it
/// is hostile until proven otherwise: each access checks offset + length for
/// 64-bit overflow and against the file size before a byte is read, and fails
/// with an error that names the structure being read.
///
/// The bytes are borrowed (an array's storage or a file mapping): an
/// `UntrustedFile` lives only inside the call that lends them.
struct UntrustedFile {
    let bytes: UnsafeRawBufferPointer
    let path: String
    /// The open file behind `bytes`, when the image came from disk: page-aligned
    /// parts of it can then be mapped into guest RAM instead of copied.
    let descriptor: Int32?

    var size: UInt64 { UInt64(bytes.count) }

    /// The index range [offset, offset + length), proven to lie inside the file.
    func range(_ offset: UInt64, length: UInt64, _ what: @autoclosure () -> String) throws(LinuxBootError) -> Range<Int> {
        let (end, overflow) = offset.addingReportingOverflow(length)
        if overflow { throw .rangeOverflows(path: path, what: what(), offset: offset, length: length) }
        if end > size { throw .truncated(path: path, what: what(), start: offset, end: end, fileSize: size) }
        // Both fit in Int: end <= size, which is a buffer count.
        return Int(offset)..<Int(end)
    }

    /// A little-endian integer at `offset`.
    func read<T: FixedWidthInteger>(_: T.Type, at offset: UInt64, _ what: @autoclosure () -> String) throws(LinuxBootError) -> T {
        let r = try range(offset, length: UInt64(MemoryLayout<T>.size), what())
        var value: T = 0
        for (i, byte) in bytes[r].enumerated() { value |= T(byte) << (8 * i) }
        return value
    }

    /// The bytes of a checked range, without copying, indexed from 0.
    func slice(_ offset: UInt64, length: UInt64, _ what: @autoclosure () -> String) throws(LinuxBootError) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: bytes[try range(offset, length: length, what())])
    }
}

/// Puts validated file bytes into guest RAM; the one place loaders write guest memory.
enum GuestMemoryWriter {
    static func copy(_ source: UnsafeRawBufferPointer, to address: UInt64, memory: GuestMemory, path: String) throws(LinuxBootError) {
        do { try memory.write(at: GuestAddress(address), from: source) } catch { throw .guestMemory(path: path, error) }
    }

    /// Places file bytes [offset, offset + length) at guest `address`: the
    /// whole pages in the middle are mapped from the file copy-on-write when
    /// the file is open and the offset and address agree modulo the page size
    /// (a vmlinux's segments do: the linker aligns them), the partial pages at
    /// either end are copied. Anything else is copied whole. The caller has
    /// checked that the file holds the range and guest RAM holds the target.
    static func place(_ f: UntrustedFile, offset: UInt64, length: UInt64, at address: UInt64,
                      memory: GuestMemory, what: @autoclosure () -> String) throws(LinuxBootError) {
        let source = try f.slice(offset, length: length, what())
        let page = UInt64(MemoryMapping.pageSize)
        // No overflow: the caller proved [address, address + length) lies in guest RAM, whose
        // regions are page-aligned and end at or below 2^64 - page, so rounding up stays below 2^64.
        let first = (address + page - 1) / page * page
        let last = (address + length) / page * page
        guard let fd = f.descriptor, offset % page == address % page, first < last else {
            return try copy(source, to: address, memory: memory, path: f.path)
        }
        let head = Int(first - address), middle = last - first
        do {
            try memory.mapFile(fd: fd, fileOffset: offset + UInt64(head), at: GuestAddress(first), length: middle)
        } catch .hostMappingFailed {
            // The range is RAM again, zeroed (mapFile restored it); the copy writes all of it.
            return try copy(source, to: address, memory: memory, path: f.path)
        } catch {
            throw .guestMemory(path: f.path, error)
        }
        try copy(UnsafeRawBufferPointer(rebasing: source[..<head]), to: address, memory: memory, path: f.path)
        try copy(UnsafeRawBufferPointer(rebasing: source[(head + Int(middle))...]), to: last, memory: memory, path: f.path)
    }

    static func zero(at address: UInt64, count: UInt64, memory: GuestMemory, path: String) throws(LinuxBootError) {
        do { try memory.fill(at: GuestAddress(address), count: count) } catch { throw .guestMemory(path: path, error) }
    }
}

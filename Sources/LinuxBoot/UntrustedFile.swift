import GuestMemory

/// A kernel file's bytes, read only through bounds-checked accessors.
///
/// Every offset and length in a kernel image comes from the file itself, so it
/// is hostile until proven otherwise: each access checks offset + length for
/// 64-bit overflow and against the file size before a byte is read, and fails
/// with an error that names the structure being read.
struct UntrustedFile {
    let bytes: [UInt8]
    let path: String

    var size: UInt64 { UInt64(bytes.count) }

    /// The index range [offset, offset + length), proven to lie inside the file.
    func range(_ offset: UInt64, length: UInt64, _ what: @autoclosure () -> String) throws(LinuxBootError) -> Range<Int> {
        let (end, overflow) = offset.addingReportingOverflow(length)
        if overflow { throw .rangeOverflows(path: path, what: what(), offset: offset, length: length) }
        if end > size { throw .truncated(path: path, what: what(), start: offset, end: end, fileSize: size) }
        // Both fit in Int: end <= size, which is an array count.
        return Int(offset)..<Int(end)
    }

    /// A little-endian integer at `offset`.
    func read<T: FixedWidthInteger>(_: T.Type, at offset: UInt64, _ what: @autoclosure () -> String) throws(LinuxBootError) -> T {
        let r = try range(offset, length: UInt64(MemoryLayout<T>.size), what())
        var value: T = 0
        for (i, byte) in bytes[r].enumerated() { value |= T(byte) << (8 * i) }
        return value
    }

    /// The bytes of a checked range, without copying.
    func slice(_ offset: UInt64, length: UInt64, _ what: @autoclosure () -> String) throws(LinuxBootError) -> ArraySlice<UInt8> {
        bytes[try range(offset, length: length, what())]
    }
}

/// Copies validated file bytes into guest RAM; the one place loaders write guest memory.
enum GuestMemoryWriter {
    static func copy(_ source: ArraySlice<UInt8>, to address: UInt64, memory: GuestMemory, path: String) throws(LinuxBootError) {
        // withUnsafeBytes is rethrows, which erases the typed error: carry it out in a Result.
        let result = source.withUnsafeBytes { buffer in
            Result { () throws(GuestMemoryError) in try memory.write(at: GuestAddress(address), from: buffer) }
        }
        do { try result.get() } catch { throw .guestMemory(path: path, error) }
    }

    static func zero(at address: UInt64, count: UInt64, memory: GuestMemory, path: String) throws(LinuxBootError) {
        do { try memory.fill(at: GuestAddress(address), count: count) } catch { throw .guestMemory(path: path, error) }
    }
}

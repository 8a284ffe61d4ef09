import AirlockOS

/// A guest-physical address. A distinct type so host offsets and guest
/// addresses cannot be mixed up.
public struct GuestAddress: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let raw: UInt64
    public init(_ raw: UInt64) { self.raw = raw }
    public static func < (a: GuestAddress, b: GuestAddress) -> Bool { a.raw < b.raw }
    public var description: String { "0x" + String(raw, radix: 16) }

    /// `self + offset`, or nil if it would pass 2^64.
    public func adding(_ offset: UInt64) -> GuestAddress? {
        let (sum, overflow) = raw.addingReportingOverflow(offset)
        return overflow ? nil : GuestAddress(sum)
    }
}

public enum GuestMemoryError: Error, Equatable, CustomStringConvertible, Sendable {
    /// The range [address, address+length) is not wholly inside one RAM region.
    case outOfBounds(address: GuestAddress, length: UInt64)
    /// address + length passes 2^64.
    case overflow(address: GuestAddress, length: UInt64)
    /// A page-granular operation (mapping a file into RAM) got a range or file offset that is not page-aligned.
    case notPageAligned(address: GuestAddress, length: UInt64, fileOffset: UInt64)
    /// The host refused to map a file into guest RAM (errno text); the range reads as zeros.
    case hostMappingFailed(address: GuestAddress, length: UInt64, reason: String)

    public var description: String {
        switch self {
        case let .outOfBounds(a, l): return "guest range \(a)+0x\(String(l, radix: 16)) is outside guest RAM"
        case let .overflow(a, l): return "guest range \(a)+0x\(String(l, radix: 16)) overflows 64 bits"
        case let .notPageAligned(a, l, o):
            return "guest range \(a)+0x\(String(l, radix: 16)) and file offset 0x\(String(o, radix: 16)) are not all page-aligned"
        case let .hostMappingFailed(a, l, reason):
            return "cannot map a file at guest range \(a)+0x\(String(l, radix: 16)): \(reason)"
        }
    }
}

/// One contiguous range of guest RAM backed by one host mapping.
public struct GuestRegion: Sendable {
    public let start: GuestAddress
    public let size: UInt64
    fileprivate let mapping: MemoryMapping

    /// The host virtual address of the region, as a number for KVM_SET_USER_MEMORY_REGION.
    /// It is deliberately not a pointer: nothing outside this file dereferences guest RAM.
    public var hostAddressForKVM: UInt64 { UInt64(UInt(bitPattern: mapping.base)) }

    var end: UInt64 { start.raw + size }  // cannot overflow: checked in GuestMemory.init
}

/// Guest RAM: the only code that reads or writes it.
///
/// Every access names a guest range, which is checked (with overflow-checked
/// arithmetic) to lie inside a single region before any byte is touched. A range
/// that crosses a hole between regions is rejected, never split.
///
/// The guest may write its RAM concurrently with the host (from vCPUs); the host
/// treats whatever it reads as untrusted bytes, validated by the caller.
public final class GuestMemory: @unchecked Sendable {
    // @unchecked: regions are immutable after init; the bytes they hold are
    // shared with the guest by design and accessed with memcpy only.
    public let regions: [GuestRegion]

    /// Creates anonymous RAM for each (start, size); regions must not overlap.
    public init(layout: [(start: GuestAddress, size: UInt64)]) throws {
        var built: [GuestRegion] = []
        for (start, size) in layout.sorted(by: { $0.start < $1.start }) {
            guard size > 0, size % 4096 == 0, start.raw % 4096 == 0 else {
                throw GuestMemoryError.outOfBounds(address: start, length: size)
            }
            guard start.adding(size) != nil else { throw GuestMemoryError.overflow(address: start, length: size) }
            if let last = built.last, last.end > start.raw {
                throw GuestMemoryError.outOfBounds(address: start, length: size)
            }
            guard let length = Int(exactly: size) else { throw GuestMemoryError.overflow(address: start, length: size) }
            built.append(GuestRegion(start: start, size: size, mapping: try MemoryMapping.anonymous(length: length)))
        }
        self.regions = built
    }

    /// Total RAM in bytes.
    public var totalSize: UInt64 { regions.reduce(0) { $0 + $1.size } }

    /// The end of the highest region (one past its last byte).
    public var highestAddress: GuestAddress { GuestAddress(regions.last.map { $0.end } ?? 0) }

    /// Checks that [address, address+length) lies inside one region; returns the
    /// region index and the offset into it.
    @inline(__always)
    public func check(_ address: GuestAddress, length: UInt64) throws(GuestMemoryError) -> (region: Int, offset: Int) {
        let (end, overflow) = address.raw.addingReportingOverflow(length)
        if overflow { throw .overflow(address: address, length: length) }
        for (i, r) in regions.enumerated() where address.raw >= r.start.raw && address.raw < r.end {
            if end > r.end { break }
            // Fits in Int: region sizes were converted to Int at init.
            return (i, Int(address.raw - r.start.raw))
        }
        // A zero-length range at the very end of a region is still "inside".
        if length == 0, regions.contains(where: { address.raw == $0.end }) { return (0, 0) }
        throw .outOfBounds(address: address, length: length)
    }

    /// True when the whole range is guest RAM.
    public func contains(_ address: GuestAddress, length: UInt64) -> Bool {
        (try? check(address, length: length)) != nil
    }

    /// Copies guest bytes out to `buffer`.
    public func read(at address: GuestAddress, into buffer: UnsafeMutableRawBufferPointer) throws(GuestMemoryError) {
        guard buffer.count > 0 else { return }
        let (i, offset) = try check(address, length: UInt64(buffer.count))
        // Sound: check() proved [offset, offset+count) lies inside the mapping.
        buffer.baseAddress!.copyMemory(from: regions[i].mapping.base + offset, byteCount: buffer.count)
    }

    /// Copies `bytes` into guest RAM.
    public func write(at address: GuestAddress, from bytes: UnsafeRawBufferPointer) throws(GuestMemoryError) {
        guard bytes.count > 0 else { return }
        let (i, offset) = try check(address, length: UInt64(bytes.count))
        // Sound: check() proved the destination lies inside the mapping.
        (regions[i].mapping.base + offset).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
    }

    public func write(_ bytes: [UInt8], at address: GuestAddress) throws(GuestMemoryError) {
        // withUnsafeBytes is rethrows, which erases the error type; carry it out in a Result.
        let result = bytes.withUnsafeBytes { b in Result { () throws(GuestMemoryError) in try write(at: address, from: b) } }
        try result.get()
    }

    public func readBytes(at address: GuestAddress, count: Int) throws(GuestMemoryError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let result = out.withUnsafeMutableBytes { b in Result { () throws(GuestMemoryError) in try read(at: address, into: b) } }
        try result.get()
        return out
    }

    /// Sets `count` bytes to `value`. Whole pages set to zero are handed back
    /// to the kernel instead of written (they read as zeros and cost no memory
    /// until the guest touches them); the rest is written.
    public func fill(at address: GuestAddress, count: UInt64, value: UInt8 = 0) throws(GuestMemoryError) {
        guard count > 0 else { return }
        let (i, offset) = try check(address, length: count)
        let mapping = regions[i].mapping
        // count fits in Int because it lies within a region, whose size did.
        let end = offset + Int(count)
        let page = MemoryMapping.pageSize
        // The page-aligned middle of [offset, end): empty when the range is within one page.
        let first = (offset + page - 1) / page * page, last = end / page * page
        if value == 0, first < last, mapping.discardPages(at: first, length: last - first) {
            // Sound: [offset, first) and [last, end) lie inside [offset, end), checked above.
            (mapping.base + offset).initializeMemory(as: UInt8.self, repeating: 0, count: first - offset)
            (mapping.base + last).initializeMemory(as: UInt8.self, repeating: 0, count: end - last)
            return
        }
        // Sound: checked above.
        (mapping.base + offset).initializeMemory(as: UInt8.self, repeating: value, count: Int(count))
    }

    /// Puts `length` bytes of the file open as `fd`, from `fileOffset`, at
    /// guest `address`, copy-on-write: the guest reads the host's page cache of
    /// the file (shared with every VM that maps the same file), its first write
    /// to a page gets a private copy, and the file never changes. The range and
    /// the offset must be page-aligned and the range inside one region; the
    /// caller must have checked that the file holds [fileOffset, fileOffset +
    /// length). Used for kernel images, where it replaces a 10 MiB copy.
    public func mapFile(fd: Int32, fileOffset: UInt64, at address: GuestAddress, length: UInt64) throws(GuestMemoryError) {
        let page = UInt64(MemoryMapping.pageSize)
        guard address.raw % page == 0, length % page == 0, fileOffset % page == 0, length > 0 else {
            throw .notPageAligned(address: address, length: length, fileOffset: fileOffset)
        }
        let (i, offset) = try check(address, length: length)
        guard let fileOffsetInt = Int(exactly: fileOffset) else { throw .overflow(address: address, length: length) }
        let mapping = regions[i].mapping
        do {
            // length fits in Int: it lies within a region.
            try mapping.overlayPrivateFile(fd: fd, fileOffset: fileOffsetInt, at: offset, length: Int(length), what: "a file in guest RAM")
        } catch {
            // A failed MAP_FIXED may already have unmapped the old pages: put
            // zeroed RAM back so the range is never a hole the host could fault on.
            guard mapping.restoreAnonymousPages(at: offset, length: Int(length)) else {
                fatalError("guest RAM at \(address)+\(length) could not be restored after a failed file mapping (\(error)); the VMM cannot continue safely")
            }
            throw .hostMappingFailed(address: address, length: length, reason: "\(error)")
        }
    }

    /// Reads a little-endian integer.
    public func read<T: FixedWidthInteger>(_: T.Type = T.self, at address: GuestAddress) throws(GuestMemoryError) -> T {
        let (i, offset) = try check(address, length: UInt64(MemoryLayout<T>.size))
        // Sound: checked above; loadUnaligned because guest addresses carry no alignment promise.
        return T(littleEndian: (regions[i].mapping.base + offset).loadUnaligned(as: T.self))
    }

    /// Writes a little-endian integer.
    public func write<T: FixedWidthInteger>(_ value: T, at address: GuestAddress) throws(GuestMemoryError) {
        let (i, offset) = try check(address, length: UInt64(MemoryLayout<T>.size))
        // Sound: checked above.
        (regions[i].mapping.base + offset).storeBytes(of: value.littleEndian, toByteOffset: 0, as: T.self)
    }

    /// Lends the host bytes of a checked guest range to `body`, for I/O straight
    /// between a host file and guest RAM (virtio-blk). The pointer is valid only
    /// inside `body` and must not be kept; the guest may change the bytes at any time.
    public func withMutableBytes<R>(at address: GuestAddress, length: UInt64,
                                    _ body: (UnsafeMutableRawBufferPointer) throws -> R) throws -> R {
        let (i, offset) = try check(address, length: length)
        guard length > 0 else { return try body(UnsafeMutableRawBufferPointer(start: nil, count: 0)) }
        // Sound: check() proved [offset, offset+length) lies inside region i's mapping,
        // which lives as long as self; length fits in Int because the region's size does.
        return try body(UnsafeMutableRawBufferPointer(start: regions[i].mapping.base + offset, count: Int(length)))
    }
}


/// What a walk over guest RAM's touched pages found (`GuestMemory.forEachDataRun`).
public struct ResidencyStatistics: Equatable, Sendable {
    /// Pages of guest RAM in all.
    public var totalPages = 0
    /// Pages the host holds for the guest (touched, or mapped from a file and read).
    public var residentPages = 0
    /// Resident pages that hold something other than zeros: the guest's data.
    public var dataPages = 0
    public init() {}
}

extension GuestMemory {
    /// Builds guest RAM whose contents start as a saved image: `fd` holds the
    /// regions back to back from `imageOffset` (the first region's bytes, then
    /// the next's), and each region is mapped from it copy-on-write
    /// (MAP_PRIVATE), so every VM made from one image shares its pages through
    /// the page cache until it writes them, and the file never changes. The
    /// caller has checked that the file holds the whole image (a mapped page
    /// past the end of a file faults when touched).
    public convenience init(layout: [(start: GuestAddress, size: UInt64)], imageFD fd: Int32, imageOffset: UInt64) throws {
        try self.init(layout: layout)
        var offset = imageOffset
        for region in regions {
            try mapFile(fd: fd, fileOffset: offset, at: region.start, length: region.size)
            let (next, overflow) = offset.addingReportingOverflow(region.size)
            guard !overflow else { throw GuestMemoryError.overflow(address: region.start, length: region.size) }
            offset = next
        }
    }

    /// Lends, in guest-physical order, every run of pages that the guest has
    /// touched and that holds something other than zeros, with its offset
    /// into the RAM image (the regions back to back), so that a snapshot
    /// writes only those: untouched pages are never read (mincore says which
    /// are resident), zero pages are left as holes. The bytes are valid only
    /// inside `body`, and the guest must not run meanwhile.
    public func forEachDataRun(_ body: (_ imageOffset: UInt64, _ bytes: UnsafeRawBufferPointer) throws -> Void) throws -> ResidencyStatistics {
        let page = MemoryMapping.pageSize
        var stats = ResidencyStatistics()
        var imageOffset: UInt64 = 0
        for region in regions {
            let mapping = region.mapping
            let pages = mapping.length / page
            stats.totalPages += pages
            guard let resident = mapping.residentPages() else {
                throw GuestMemoryError.hostMappingFailed(address: region.start, length: region.size, reason: "mincore failed")
            }
            var runStart: Int? = nil
            func flush(_ end: Int) throws {
                guard let start = runStart else { return }
                runStart = nil
                // Sound: [start, end) pages lie inside the mapping (indices from its own page count).
                try body(imageOffset + UInt64(start * page), UnsafeRawBufferPointer(start: mapping.base + start * page, count: (end - start) * page))
            }
            for i in 0..<pages {
                var data = false
                if resident[i] & 1 != 0 {
                    stats.residentPages += 1
                    // Sound: page i lies inside the mapping.
                    data = !Self.isZero(UnsafeRawBufferPointer(start: mapping.base + i * page, count: page))
                }
                if data {
                    stats.dataPages += 1
                    if runStart == nil { runStart = i }
                } else {
                    try flush(i)
                }
            }
            try flush(pages)
            imageOffset += region.size
        }
        return stats
    }

    /// Whether a page-sized buffer is all zeros, eight bytes at a time.
    static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let words = bytes.count / 8
        var acc: UInt64 = 0
        var i = 0
        while i < words {
            acc |= bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)
            // Check now and then rather than every word: most data pages differ early.
            if i & 63 == 63, acc != 0 { return false }
            i += 1
        }
        return acc == 0
    }
}

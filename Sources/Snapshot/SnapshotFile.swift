import AirlockOS
import GuestMemory
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// The snapshot file format, version 1 (docs/snapshots.md has the whole of it):
///
///     [0, 4096)            header: magic, version, section table, header SHA-256
///     [4096, ...)          manifest section, then machine-state section
///     [M, M + memory)      guest RAM image, M a multiple of 2 MiB; sparse:
///                          pages the guest never touched, or that hold only
///                          zeros, are holes in the file
///
/// Each section's SHA-256 is in the header; the header's own SHA-256 follows
/// its table. The memory section's digest covers, in order, each page that is
/// not all zeros as its page number (u64, little-endian) and its 4096 bytes,
/// so it does not depend on how the file system stores holes.
public enum SnapshotFormat {
    public static let magic: [UInt8] = Array("AIRLSNAP".utf8)
    public static let version: UInt32 = 1
    public static let headerSize = 4096
    /// Where guest RAM may start: 2 MiB, so the image could be mapped with huge pages.
    public static let memoryAlignment: UInt64 = 2 << 20
    /// The most a manifest or machine-state section may hold (both are a few tens of KiB).
    public static let maxRecordBytes = 16 << 20
    static let pageSize = 4096

    enum Section: UInt32, CaseIterable {
        case manifest = 1, state = 2, memory = 3
        var name: String {
            switch self {
            case .manifest: return "manifest"
            case .state: return "machine state (vCPUs, interrupt controllers, devices)"
            case .memory: return "guest memory image"
            }
        }
    }
    /// The longest file a snapshot of `memoryBytes` of guest RAM can be: the header, the
    /// largest records, the alignment, the RAM image (a jailed writer's RLIMIT_FSIZE).
    public static func maximumFileSize(memoryBytes: UInt64) -> UInt64 {
        let records = UInt64(headerSize) + 2 * UInt64(maxRecordBytes)
        return (records + memoryAlignment - 1) / memoryAlignment * memoryAlignment + memoryBytes
    }
    static let sectionEntrySize = 56
    static var tableEnd: Int { 24 + sectionEntrySize * Section.allCases.count }
}

/// What writing one snapshot did, for `--json`, listings and benchmarks.
public struct SnapshotWriteReport: Sendable, Equatable, Codable {
    /// The file's length (its holes included) and the bytes its data takes (about what it takes on disk).
    public var fileSize: UInt64 = 0
    public var allocatedBytes: UInt64 = 0
    /// Guest pages written (touched and not all zeros), and how many were resident in all.
    public var dataPages = 0
    public var residentPages = 0
    public var totalPages = 0
    public var seconds: Double = 0
    public init() {}
}

public enum SnapshotWriter {
    /// Sets libcrypto up (its first digest may read its configuration files): a process that
    /// will save under seccomp, which forbids opening files, calls this before its filters.
    public static func prepare() { _ = SHA256.digest([]) }

    /// Writes a snapshot of a paused machine into `fd`, an empty regular file
    /// opened for writing (named `path` in messages): `state` from
    /// `Machine.captureState`, and the guest RAM read in place (only touched,
    /// non-zero pages, which `GuestMemory.forEachDataRun` finds with mincore).
    /// The guest must not run meanwhile. The header goes last, so a write that
    /// stops early leaves a file every reader refuses.
    public static func write(fd: Int32, path: String, manifest: SnapshotManifest, state: MachineState,
                             memory: GuestMemory) throws(SnapshotError) -> SnapshotWriteReport {
        let started = monotonicNanoseconds()
        var manifest = manifest
        let stateBytes = StateCodec.encode(state)
        // The manifest's size does not depend on its values' magnitudes (fixed-width
        // integers), so the layout is known before the memory walk fills in dataPages.
        let manifestSize = StateCodec.encode(manifest).count
        let manifestOffset = UInt64(SnapshotFormat.headerSize)
        let stateOffset = manifestOffset + UInt64(manifestSize)
        let end = stateOffset + UInt64(stateBytes.count)
        let a = SnapshotFormat.memoryAlignment
        let memoryOffset = (end + a - 1) / a * a
        let memoryLength = memory.totalSize

        // The file's full length first (sparse), so the memory image's holes exist.
        let (fileEnd, overflow) = memoryOffset.addingReportingOverflow(memoryLength)
        guard !overflow, let length = off_t(exactly: fileEnd) else { throw .cannotSave("the memory image does not fit in a file") }
        try io(path) { () throws(SystemError) in _ = try retryingSyscall("ftruncate", subject: path) { ftruncate(fd, length) } }

        let memoryHash = SHA256()
        let page = SnapshotFormat.pageSize
        let stats: ResidencyStatistics
        do {
            stats = try memory.forEachDataRun { imageOffset, bytes in
                var pageNumber = imageOffset / UInt64(page)
                for p in stride(from: 0, to: bytes.count, by: page) {
                    withUnsafeBytes(of: pageNumber.littleEndian) { memoryHash.update($0) }
                    memoryHash.update(UnsafeRawBufferPointer(rebasing: bytes[p..<(p + page)]))
                    pageNumber += 1
                }
                try pwriteAll(fd, bytes, at: memoryOffset + imageOffset, path: path)
            }
        } catch let e as SnapshotError { throw e } catch {
            throw .cannotSave("guest memory could not be read: \(error)")
        }
        manifest.dataPages = stats.dataPages
        let manifestBytes = StateCodec.encode(manifest)
        precondition(manifestBytes.count == manifestSize, "manifest size changed with its values")
        try pwriteAll(fd, manifestBytes, at: manifestOffset, path: path)
        try pwriteAll(fd, stateBytes, at: stateOffset, path: path)

        let sections: [(SnapshotFormat.Section, UInt64, UInt64, [UInt8])] = [
            (.manifest, manifestOffset, UInt64(manifestSize), SHA256.digest(manifestBytes)),
            (.state, stateOffset, UInt64(stateBytes.count), SHA256.digest(stateBytes)),
            (.memory, memoryOffset, memoryLength, memoryHash.finish()),
        ]
        let header = Self.header(sections)
        try pwriteAll(fd, header, at: 0, path: path)

        var report = SnapshotWriteReport()
        report.fileSize = fileEnd
        // What the file takes on disk: the data pages and the records (the
        // reader fstats the file itself where it may; a jailed writer may not).
        report.allocatedBytes = UInt64(stats.dataPages * page) + stateOffset + UInt64(stateBytes.count)
        report.dataPages = stats.dataPages
        report.residentPages = stats.residentPages
        report.totalPages = stats.totalPages
        report.seconds = Double(monotonicNanoseconds() - started) / 1e9
        return report
    }

    static func header(_ sections: [(SnapshotFormat.Section, UInt64, UInt64, [UInt8])]) -> [UInt8] {
        var w = ByteWriter()
        w.raw(SnapshotFormat.magic)
        w.u32(SnapshotFormat.version)
        w.u32(UInt32(SnapshotFormat.headerSize))
        w.u32(UInt32(sections.count))
        w.u32(0)
        for (kind, offset, length, digest) in sections {
            w.u32(kind.rawValue)
            w.u32(0)
            w.u64(offset)
            w.u64(length)
            w.raw(digest)
        }
        var bytes = w.bytes
        bytes += SHA256.digest(bytes)
        bytes += [UInt8](repeating: 0, count: SnapshotFormat.headerSize - bytes.count)
        return bytes
    }

    static func pwriteAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, at offset: UInt64, path: String) throws(SnapshotError) {
        var done = 0
        while done < bytes.count {
            let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw .io(path: path, SystemError("write", subject: path, errno: errno))
            }
            done += n
        }
    }

    static func pwriteAll(_ fd: Int32, _ bytes: [UInt8], at offset: UInt64, path: String) throws(SnapshotError) {
        // Array's withUnsafeBytes is rethrows, which erases the error type: carry it in a Result.
        let result = bytes.withUnsafeBytes { b in Result { () throws(SnapshotError) in try pwriteAll(fd, b, at: offset, path: path) } }
        try result.get()
    }

    static func io(_ path: String, _ body: () throws(SystemError) -> Void) throws(SnapshotError) {
        do { try body() } catch { throw .io(path: path, error) }
    }
}

/// An opened, checked snapshot: the header, the manifest and the machine
/// state have been read and their SHA-256 digests and layouts verified, so
/// everything here can be used to build a VM (`memoryImage` maps the RAM
/// image). The RAM image's digest is checked by `verifyMemory`, which reads
/// every data page; a caller that checked this same file before can skip it.
public final class SnapshotFile: Sendable {
    public let path: String
    public let file: OwnedFileDescriptor
    public let manifest: SnapshotManifest
    public let state: MachineState
    public let memoryOffset: UInt64
    public let fileSize: UInt64
    let memoryDigest: [UInt8]

    /// Opens and checks `path`.
    public static func open(_ path: String) throws(SnapshotError) -> SnapshotFile {
        let fd: OwnedFileDescriptor
        do { fd = try OwnedFileDescriptor.open(path, flags: O_RDONLY) } catch { throw .io(path: path, error) }
        return try SnapshotFile(file: fd, path: path)
    }

    /// Checks the snapshot open as `file` (a descriptor passed into a jail).
    public init(file: OwnedFileDescriptor, path: String) throws(SnapshotError) {
        self.path = path
        self.file = file
        var info = stat()
        guard fstat(file.rawValue, &info) == 0 else { throw .io(path: path, SystemError("fstat", subject: path, errno: errno)) }
        guard info.st_mode & S_IFMT == S_IFREG else { throw .notASnapshot(path: path) }
        fileSize = UInt64(info.st_size)

        let header = try Self.read(file.rawValue, path: path, at: 0, count: SnapshotFormat.headerSize, what: "header")
        guard header.starts(with: SnapshotFormat.magic) else { throw .notASnapshot(path: path) }
        let sections: [SnapshotFormat.Section: (offset: UInt64, length: UInt64, digest: [UInt8])]
        do {
            var r = ByteReader(header)
            _ = try r.take(SnapshotFormat.magic.count, "magic")
            let version = try r.u32("format version")
            guard version == SnapshotFormat.version else {
                throw SnapshotError.versionMismatch(path: path, found: version, supported: SnapshotFormat.version)
            }
            let tableEnd = SnapshotFormat.tableEnd
            guard SHA256.digest(Array(header[0..<tableEnd])) == Array(header[tableEnd..<(tableEnd + 32)]) else {
                throw SnapshotError.corrupted(path: path, part: "header", detail: "does not match its SHA-256")
            }
            guard try r.u32("header size") == UInt32(SnapshotFormat.headerSize) else {
                throw SnapshotError.corrupted(path: path, part: "header", detail: "gives a header size other than \(SnapshotFormat.headerSize)")
            }
            let count = try r.u32("section count")
            guard count == UInt32(SnapshotFormat.Section.allCases.count) else {
                throw SnapshotError.corrupted(path: path, part: "header", detail: "lists \(count) sections, not \(SnapshotFormat.Section.allCases.count)")
            }
            _ = try r.u32("reserved")
            var table: [SnapshotFormat.Section: (UInt64, UInt64, [UInt8])] = [:]
            for _ in 0..<Int(count) {
                let raw = try r.u32("section kind")
                _ = try r.u32("reserved")
                let offset = try r.u64("section offset"), length = try r.u64("section length")
                let digest = Array(try r.take(32, "section digest"))
                guard let kind = SnapshotFormat.Section(rawValue: raw), table[kind] == nil else {
                    throw SnapshotError.corrupted(path: path, part: "header", detail: "has an unknown or repeated section \(raw)")
                }
                table[kind] = (offset, length, digest)
            }
            sections = table.mapValues { (offset: $0.0, length: $0.1, digest: $0.2) }
        } catch let e as SnapshotError { throw e } catch {
            throw .corrupted(path: path, part: "header", detail: "\(error)")
        }

        // The sections: after the header, in order, not overlapping, inside the file.
        var previousEnd = UInt64(SnapshotFormat.headerSize)
        for kind in SnapshotFormat.Section.allCases {
            let s = sections[kind]!  // all three are present: counted and de-duplicated above
            let (end, overflow) = s.offset.addingReportingOverflow(s.length)
            guard !overflow, s.offset >= previousEnd else {
                throw .corrupted(path: path, part: "header", detail: "places the \(kind.name) at \(s.offset)+\(s.length), overlapping what comes before")
            }
            guard end <= fileSize else {
                throw .truncated(path: path, detail: "the \(kind.name) ends at byte \(end), the file at \(fileSize)")
            }
            if kind != .memory, s.length > UInt64(SnapshotFormat.maxRecordBytes) {
                throw .corrupted(path: path, part: kind.name, detail: "claims \(s.length) bytes, more than \(SnapshotFormat.maxRecordBytes)")
            }
            previousEnd = end
        }
        let memory = sections[.memory]!
        guard memory.offset % SnapshotFormat.memoryAlignment == 0, memory.length % UInt64(SnapshotFormat.pageSize) == 0 else {
            throw .corrupted(path: path, part: "header", detail: "places guest memory at \(memory.offset)+\(memory.length), not on 2 MiB and page boundaries")
        }
        memoryOffset = memory.offset
        memoryDigest = memory.digest

        func record(_ kind: SnapshotFormat.Section) throws(SnapshotError) -> [UInt8] {
            let s = sections[kind]!
            let bytes = try Self.read(file.rawValue, path: path, at: s.offset, count: Int(s.length), what: kind.name)
            guard SHA256.digest(bytes) == s.digest else {
                throw .corrupted(path: path, part: kind.name, detail: "does not match its SHA-256")
            }
            return bytes
        }
        do {
            manifest = try StateCodec.decodeManifest(try record(.manifest))
        } catch let e as SnapshotError { throw e } catch {
            throw .corrupted(path: path, part: "manifest", detail: "does not decode: \((error as? DecodeError)?.detail ?? "\(error)")")
        }
        do {
            state = try StateCodec.decodeState(try record(.state))
        } catch let e as SnapshotError { throw e } catch {
            throw .corrupted(path: path, part: "machine state", detail: "does not decode: \((error as? DecodeError)?.detail ?? "\(error)")")
        }
        guard manifest.memoryBytes == memory.length, state.memoryBytes == memory.length else {
            throw .corrupted(path: path, part: "manifest", detail: "gives \(manifest.memoryBytes) bytes of guest memory, the image holds \(memory.length)")
        }
        guard state.vcpus.count == manifest.vcpuCount else {
            throw .corrupted(path: path, part: "manifest", detail: "gives \(manifest.vcpuCount) vCPUs, the state holds \(state.vcpus.count)")
        }
    }

    /// The RAM image for `MachineConfig.memoryImage`.
    public var memoryImage: MemoryImage { MemoryImage(file: file, offset: memoryOffset) }

    /// Reads every data page of the RAM image and checks its SHA-256. Holes
    /// are skipped where the file system reports them (SEEK_DATA/seekHole),
    /// so the cost is the data the guest had touched, not the guest's size.
    public func verifyMemory() throws(SnapshotError) {
        let page = SnapshotFormat.pageSize
        let length = manifest.memoryBytes
        let hash = SHA256()
        let chunk = 1 << 20
        var buffer = [UInt8](repeating: 0, count: chunk)
        var position: UInt64 = 0
        while position < length {
            // The next data extent at or after `position`, inside the memory section.
            let dataStart = lseek(file.rawValue, off_t(memoryOffset + position), Self.seekData)
            if dataStart < 0 {
                if errno == ENXIO { break }  // only a hole remains
                throw .io(path: path, SystemError("lseek", subject: path, errno: errno))
            }
            let dataEnd = lseek(file.rawValue, dataStart, Self.seekHole)
            guard dataEnd >= dataStart else { throw .io(path: path, SystemError("lseek", subject: path, errno: errno)) }
            // Page-align the extent and clip it to the memory section.
            let pageBytes = UInt64(page)
            let start: UInt64 = (UInt64(dataStart) - memoryOffset) / pageBytes * pageBytes
            let extentEnd: UInt64 = (UInt64(dataEnd) - memoryOffset + pageBytes - 1) / pageBytes * pageBytes
            let end: UInt64 = Swift.min(length, extentEnd)
            if start >= length { break }
            var at: UInt64 = start
            while at < end {
                let n = Int(Swift.min(UInt64(chunk), end - at))
                let got = buffer.withUnsafeMutableBytes { b in
                    (try? file.readExactly(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<n]), at: Int(memoryOffset + at), path: path)) ?? -1
                }
                guard got == n else { throw .truncated(path: path, detail: "guest memory could not be read at offset \(memoryOffset + at)") }
                buffer.withUnsafeBytes { b in
                    for p in stride(from: 0, to: n, by: page) {
                        let bytes = UnsafeRawBufferPointer(rebasing: b[p..<(p + page)])
                        guard !Self.isZero(bytes) else { continue }
                        let number = (at + UInt64(p)) / UInt64(page)
                        withUnsafeBytes(of: number.littleEndian) { hash.update($0) }
                        hash.update(bytes)
                    }
                }
                at += UInt64(n)
            }
            position = max(end, start + UInt64(page))
        }
        guard hash.finish() == memoryDigest else {
            throw .corrupted(path: path, part: "guest memory image", detail: "does not match its SHA-256")
        }
    }

    /// lseek(2) whences Glibc's module does not export (they need _GNU_SOURCE).
    static let seekData: Int32 = 3, seekHole: Int32 = 4

    static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var acc: UInt64 = 0
        for i in 0..<(bytes.count / 8) { acc |= bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) }
        return acc == 0
    }

    static func read(_ fd: Int32, path: String, at offset: UInt64, count: Int, what: String) throws(SnapshotError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, count - done, off_t(offset) + off_t(done)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw .io(path: path, SystemError("read", subject: path, errno: errno))
            }
            if n == 0 { throw .truncated(path: path, detail: "its \(what) ends after \(done) of \(count) bytes") }
            done += n
        }
        return bytes
    }
}

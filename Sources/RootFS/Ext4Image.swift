#if canImport(Glibc)
import Glibc
#endif
import AirlockOS

/// A read-only view of an ext2, ext3 or ext4 image file, for checking what a
/// root filesystem holds before a VM boots from it.
///
/// The image is untrusted: every number taken from it is range-checked before
/// it sizes a read or an allocation, and each look-up runs under `Limits`, so a
/// crafted image ends in a `RootFSError`, never a trap, a hang or a huge
/// allocation. Reads go through pread on one descriptor, so a large image costs
/// only the blocks a look-up touches.
public struct Ext4Image: Sendable {
    /// Caps on the work one `lookup` or `readFile` may do. The defaults are far
    /// above what any real root filesystem needs and small enough that the
    /// worst crafted image is answered in well under a second.
    public struct Limits: Sendable, Equatable {
        /// Bytes of metadata and file data read from the image.
        public var bytesRead: Int
        /// Directory entries examined, over all directories on the way.
        public var directoryEntries: Int
        /// Extent tree nodes and indirect blocks visited.
        public var mappingNodes: Int
        /// Symbolic links followed; Linux's MAXSYMLINKS is 40.
        public var symlinks: Int

        public init(bytesRead: Int = 64 << 20, directoryEntries: Int = 1 << 20, mappingNodes: Int = 16384, symlinks: Int = 40) {
            self.bytesRead = bytesRead
            self.directoryEntries = directoryEntries
            self.mappingNodes = mappingNodes
            self.symlinks = symlinks
        }

        public static let `default` = Limits()
    }

    /// The image file as the caller named it; every error repeats it.
    public let path: String
    public let limits: Limits
    let fd: OwnedFileDescriptor
    let fileSize: UInt64
    let geometry: Geometry

    /// Opens `path` and validates its superblock.
    public init(path: String, limits: Limits = .default) throws(RootFSError) {
        self.path = path
        self.limits = limits
        var kind: mode_t = 0
        do throws(SystemError) {
            // O_NONBLOCK: opening a FIFO someone passed as the image must not wait
            // for a writer. It changes nothing for files and block devices.
            let fd = try OwnedFileDescriptor.open(path, flags: O_RDONLY | O_NONBLOCK)
            var info = stat()
            _ = try retryingSyscall("fstat", subject: path) { fstat(fd.rawValue, &info) }
            kind = info.st_mode & S_IFMT
            if kind == S_IFDIR { throw SystemError("open", subject: path, errno: EISDIR) }
            self.fd = fd
            // A block device reports st_size 0; its size comes from seeking to the end.
            let end = kind == S_IFREG || kind == S_IFBLK
                ? try retryingSyscall("lseek", subject: path) { lseek(fd.rawValue, 0, SEEK_END) } : 0
            self.fileSize = UInt64(max(0, end))
        } catch {
            throw .cannotOpen(image: path, error)
        }
        guard kind == S_IFREG || kind == S_IFBLK else {
            throw .notExt(image: path, detail: "it is a device, FIFO or socket, not a file")
        }
        guard fileSize >= UInt64(Geometry.superblockOffset + 1024) else {
            throw .notExt(image: path, detail: "the file has \(fileSize) bytes, too few to hold a superblock at offset 1024")
        }
        let sb = try Self.read(fd: fd, image: path, fileSize: fileSize, at: UInt64(Geometry.superblockOffset), count: 1024,
                               what: "the superblock")
        geometry = try Geometry.parse(sb, image: path, fileSize: fileSize)
    }

    /// The filesystem block size in bytes (1 KiB to 64 KiB).
    public var blockSize: Int { Int(geometry.blockSize) }

    // MARK: - Reading

    /// preads exactly `count` bytes at `offset` into `buffer[start...]`, after
    /// checking that the range lies inside the file.
    static func read(fd: OwnedFileDescriptor, image: String, fileSize: UInt64, into buffer: inout [UInt8], start: Int,
                     count: Int, at offset: UInt64, what: () -> String) throws(RootFSError) {
        // Callers derive start and count from checked numbers; this guards a bug
        // here from becoming a trap.
        guard fits(start, count, in: buffer.count) else {
            throw .corrupt(image: image, detail: "\(what()) does not fit its buffer (a bug in Airlock's image reader)")
        }
        let (end, overflow) = offset.addingReportingOverflow(UInt64(count))
        guard !overflow, end <= fileSize else {
            throw .truncated(image: image, what: what(), needed: overflow ? .max : end, fileSize: fileSize)
        }
        var result: Result<Int, SystemError> = .success(0)
        buffer.withUnsafeMutableBytes { bytes in
            let slice = UnsafeMutableRawBufferPointer(rebasing: bytes[start..<(start + count)])
            result = Result { () throws(SystemError) -> Int in try fd.readExactly(into: slice, at: Int(offset), path: image) }
        }
        switch result {
        case let .failure(error):
            throw .readFailed(image: image, error)
        case let .success(n) where n < count:
            // The file shrank after open: report it like any other truncation.
            throw .truncated(image: image, what: what(), needed: end, fileSize: offset + UInt64(n))
        case .success:
            return
        }
    }

    static func read(fd: OwnedFileDescriptor, image: String, fileSize: UInt64, at offset: UInt64, count: Int,
                     what: @autoclosure () -> String) throws(RootFSError) -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: count)
        try read(fd: fd, image: image, fileSize: fileSize, into: &buffer, start: 0, count: count, at: offset, what: what)
        return buffer
    }

    func read(at offset: UInt64, count: Int, what: @autoclosure () -> String, budget: Budget) throws(RootFSError) -> [UInt8] {
        try budget.chargeRead(count)
        return try Self.read(fd: fd, image: path, fileSize: fileSize, at: offset, count: count, what: what())
    }

    /// Reads into `buffer[start..<start+count]`, for file contents.
    func read(into buffer: inout [UInt8], start: Int, count: Int, at offset: UInt64, what: @autoclosure () -> String,
              budget: Budget) throws(RootFSError) {
        try budget.chargeRead(count)
        try Self.read(fd: fd, image: path, fileSize: fileSize, into: &buffer, start: start, count: count, at: offset, what: what)
    }

    /// Byte offset of a filesystem block, after checking the block is inside the
    /// filesystem (which the superblock check proved is inside the file).
    func offset(ofBlock block: UInt64, what: @autoclosure () -> String) throws(RootFSError) -> UInt64 {
        guard block < geometry.blocksCount else {
            throw corrupt("\(what()) is block \(block), past the end of the filesystem (\(geometry.blocksCount) blocks)")
        }
        return block * geometry.blockSize
    }

    func readBlock(_ block: UInt64, what: @autoclosure () -> String, budget: Budget) throws(RootFSError) -> [UInt8] {
        let at = try offset(ofBlock: block, what: what())
        return try read(at: at, count: Int(geometry.blockSize), what: what(), budget: budget)
    }

    func corrupt(_ detail: String) -> RootFSError { .corrupt(image: path, detail: detail) }

    // MARK: - Group descriptors and inodes

    /// The first block of a group's inode table, from its group descriptor.
    func inodeTable(group: UInt64, budget: Budget) throws(RootFSError) -> UInt64 {
        let g = geometry
        guard group < g.groupCount else { throw corrupt("block group \(group) does not exist (\(g.groupCount) groups)") }
        let perBlock = g.blockSize / g.descriptorSize
        let nr = group / perBlock
        let slot = group % perBlock
        let block: UInt64
        // Both placements as the kernel's descriptor_loc computes them. nr < 2^32
        // and perBlock <= 2^11, so nothing here can overflow before the checked steps.
        if !g.has(incompat: Feature.incompatMetaBG) || nr < g.firstMetaBG {
            block = (g.blockSize == 1024 ? 1 : 0) + nr + 1
        } else {
            // meta_bg: each run of perBlock groups keeps its descriptor block in
            // its first group, right after that group's superblock backup, if any.
            let first = perBlock * nr
            var skip: UInt64 = g.groupHasSuperblock(first) ? 1 : 0
            if g.blockSize == 1024 && nr == 0 && g.firstDataBlock == 0 { skip += 1 }
            let (start, o1) = first.multipliedReportingOverflow(by: g.blocksPerGroup)
            let (withBase, o2) = start.addingReportingOverflow(g.firstDataBlock + skip)
            guard !o1, !o2 else { throw corrupt("meta_bg descriptor block for group \(group) overflows 64 bits") }
            block = withBase
        }
        let base = try offset(ofBlock: block, what: "the group descriptor block for group \(group)")
        let desc = try read(at: base + slot * g.descriptorSize, count: Int(g.descriptorSize),
                            what: "the group descriptor of group \(group)", budget: budget)
        var table = UInt64(desc.le32(0x08))
        if g.descriptorSize >= 64 { table |= UInt64(desc.le32(0x28)) << 32 }
        // The whole table must be inside the filesystem, not just the slot wanted.
        let tableBytes = g.inodesPerGroup * g.inodeSize
        let tableBlocks = (tableBytes + g.blockSize - 1) / g.blockSize
        let (end, overflow) = table.addingReportingOverflow(tableBlocks)
        guard table >= 1, table >= g.firstDataBlock, !overflow, end <= g.blocksCount else {
            throw corrupt("group \(group)'s inode table at block \(table) (\(tableBlocks) blocks) is outside the filesystem "
                + "(\(g.blocksCount) blocks)")
        }
        return table
    }

    func readInode(_ number: UInt32, budget: Budget) throws(RootFSError) -> Inode {
        let g = geometry
        guard number >= 1, UInt64(number) <= g.inodesCount else {
            throw corrupt("inode \(number) is out of range (the filesystem has \(g.inodesCount))")
        }
        let index = UInt64(number - 1)
        let table = try inodeTable(group: index / g.inodesPerGroup, budget: budget)
        let at = table * g.blockSize + (index % g.inodesPerGroup) * g.inodeSize
        let raw = try read(at: at, count: Int(g.inodeSize), what: "inode \(number)", budget: budget)
        let mode = raw.le16(0x00)
        guard let type = Inode.type(ofMode: mode) else { throw corrupt("inode \(number) has an invalid mode \(hex(mode))") }
        let inode = Inode(number: number, raw: raw, type: type, largeDir: g.has(incompat: Feature.incompatLargeDir))
        guard inode.links > 0 else { throw corrupt("inode \(number) is in use but has no links (deleted)") }
        return inode
    }
}

/// Work counters for one look-up, checked against `Ext4Image.Limits`.
/// A class so the mapping walkers and their callbacks can share it.
final class Budget {
    let limits: Ext4Image.Limits
    let image: String
    let path: String
    private(set) var bytesRead = 0
    private(set) var entries = 0
    private(set) var nodes = 0

    init(limits: Ext4Image.Limits, image: String, path: String) {
        self.limits = limits
        self.image = image
        self.path = path
    }

    func chargeRead(_ count: Int) throws(RootFSError) {
        bytesRead = bytesRead.addingReportingOverflow(count).partialValue
        if bytesRead > limits.bytesRead || bytesRead < 0 {
            throw .workLimitExceeded(image: image, path: path, what: "bytes read", limit: limits.bytesRead)
        }
    }

    func chargeEntry() throws(RootFSError) {
        entries += 1
        if entries > limits.directoryEntries {
            throw .workLimitExceeded(image: image, path: path, what: "directory entries", limit: limits.directoryEntries)
        }
    }

    func chargeNode() throws(RootFSError) {
        nodes += 1
        if nodes > limits.mappingNodes {
            throw .workLimitExceeded(image: image, path: path, what: "extent nodes and indirect blocks", limit: limits.mappingNodes)
        }
    }
}

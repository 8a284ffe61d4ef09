/// One inode a `TreeReader` reached: its metadata, and what the reader needs
/// to list or read it.
public struct Node: Sendable, Equatable {
    public var info: FileInfo
    let inode: Inode

    public static func == (a: Node, b: Node) -> Bool { a.info == b.info && a.inode.raw == b.inode.raw }
}

/// One name in a directory, as the image stores it: any bytes but NUL, up
/// to 255 of them. A hostile image can store a '/' too; callers that turn
/// names into host paths must check.
public struct DirectoryEntry: Sendable, Equatable {
    public var name: [UInt8]
    public var inode: UInt32

    /// "." or "..": the directory itself and its parent, never content.
    public var isDotOrDotDot: Bool { name == [0x2E] || name == [0x2E, 0x2E] }
}

/// Reads many things from one image under one budget: listing a whole tree
/// and copying its files costs at most `limits` work in total, however the
/// image is laid out or crafted. (`Ext4Image.lookup` and `readFile` give each
/// call its own budget, which suits single look-ups.)
///
/// Every number the image supplies is checked as it is for look-ups; what
/// the reader does not judge is policy: which file types, names, sizes or
/// how many entries a caller accepts is the caller's to enforce.
public final class TreeReader {
    public let image: Ext4Image
    let budget: Budget

    /// `purpose` names the work in limit errors ("the artifacts under /workspace/out").
    public init(_ image: Ext4Image, limits: Ext4Image.Limits, purpose: String) {
        self.image = image
        budget = Budget(limits: limits, image: image.path, path: purpose)
    }

    /// What `path` names, resolved as the guest would (symlinks on the way
    /// followed within the image); a final symlink is itself unless asked.
    /// nil when the path does not resolve.
    public func node(at path: String, followFinalSymlink: Bool = false) throws(RootFSError) -> Node? {
        try image.resolve(path, followFinalSymlink: followFinalSymlink, budget: budget).map { Node(info: $0.info, inode: $0) }
    }

    /// The inode a directory entry names. Reserved inodes (the journal's,
    /// the resize inode's, ...) are never content and are refused as corrupt;
    /// the root directory (2) is allowed, as a hard link to it would be a loop
    /// the caller catches by inode number.
    public func node(_ entry: DirectoryEntry, in directory: Node) throws(RootFSError) -> Node {
        guard entry.inode >= UInt32(truncatingIfNeeded: image.geometry.firstInode) || entry.inode == Inode.rootNumber else {
            throw image.corrupt("directory inode \(directory.info.inode) has an entry for reserved inode \(entry.inode)")
        }
        let inode = try image.readInode(entry.inode, budget: budget)
        return Node(info: inode.info, inode: inode)
    }

    /// Calls `body` with each entry of `directory` in on-disk order, "." and
    /// ".." left out; `body` returns false to stop early (the entries not
    /// seen cost nothing).
    public func forEachEntry(of directory: Node, _ body: (DirectoryEntry) -> Bool) throws(RootFSError) {
        guard directory.info.type == .directory else {
            throw image.corrupt("inode \(directory.info.inode) was listed as a directory but is a \(directory.info.type)")
        }
        try image.forEachEntry(in: directory.inode, budget: budget) { number, bytes, start, length in
            let entry = DirectoryEntry(name: Array(bytes[start..<(start + length)]), inode: number)
            return entry.isDotOrDotDot ? true : body(entry)
        }
    }

    /// A symbolic link's target, up to its first NUL, as readlink gives it.
    public func symlinkTarget(of node: Node) throws(RootFSError) -> [UInt8] {
        guard node.info.type == .symlink else {
            throw image.corrupt("inode \(node.info.inode) was read as a symbolic link but is a \(node.info.type)")
        }
        return try image.readSymlink(node.inode, budget: budget)
    }

    /// Streams a regular file's stored bytes: `body` gets each stored piece
    /// (at most `chunkSize` bytes) with its offset in the file, in ascending
    /// order. Holes and unwritten extents are not passed: they read as zeros,
    /// so a caller that writes the pieces at their offsets into a file of
    /// `node.info.size` bytes gets the same contents. The buffer is reused;
    /// `body` returns false to stop.
    public func forEachChunk(of node: Node, chunkSize: Int = 1 << 20,
                             _ body: (UInt64, UnsafeRawBufferPointer) -> Bool) throws(RootFSError) {
        guard node.info.type == .regular else {
            throw image.corrupt("inode \(node.info.inode) was read as a regular file but is a \(node.info.type)")
        }
        let size = node.info.size
        guard size > 0 else { return }
        let inode = node.inode
        if inode.has(InodeFlag.inlineData) {
            // At most an inode's worth of bytes (readContents checks the size against what is stored).
            guard size <= UInt64(image.geometry.inodeSize) else {
                throw image.corrupt("inode \(inode.number) claims \(size) bytes of inline data, more than an inode holds")
            }
            let bytes = try image.readContents(of: inode, count: Int(size), budget: budget)
            _ = bytes.withUnsafeBytes { body(0, $0) }
            return
        }
        let bs = image.geometry.blockSize
        // Whole blocks, no more than the file needs: most files are small, and the
        // buffer is zeroed when it is made.
        let wanted = Swift.min(UInt64(Swift.max(chunkSize, 1)), image.blockCount(forSize: size) * bs)
        let chunk = Swift.max(bs, wanted / bs * bs)
        var buffer = [UInt8](repeating: 0, count: Int(chunk))
        let image = self.image, budget = self.budget
        try image.forEachRun(of: inode, blocks: 0..<image.blockCount(forSize: size), budget: budget) { (run) throws(RootFSError) -> Bool in
            if run.unwritten { return true }
            // Runs are clipped to the file's blocks: these stay below 2^32 * 2^16 and inside the file.
            var from = run.logical * bs
            let end = Swift.min((run.logical + run.count) * bs, size)
            var physical = try image.offset(ofBlock: run.physical, what: "inode \(inode.number)'s data")
            while from < end {
                let n = Int(Swift.min(chunk, end - from))
                try image.read(into: &buffer, start: 0, count: n, at: physical, what: "inode \(inode.number)'s data", budget: budget)
                let more = buffer.withUnsafeBytes { body(from, UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
                if !more { return false }
                from += UInt64(n)
                physical += UInt64(n)
            }
            return true
        }
    }
}

extension RootFSError {
    /// What is wrong, without the advice for a root filesystem image that
    /// `description` ends with: for callers that read other images (a
    /// workspace written by a guest) and give their own advice.
    public var summary: String {
        switch self {
        case let .cannotOpen(image, error): return "cannot open '\(image)': \(error)"
        case let .readFailed(image, error): return "cannot read '\(image)': \(error)"
        case let .notExt(image, detail): return "'\(image)' is not an ext2/3/4 image (\(detail))"
        case let .truncated(image, what, needed, fileSize):
            return "'\(image)' is truncated: \(what) needs \(needed) bytes but the file has \(fileSize)"
        case let .unsupported(image, what): return "'\(image)' uses \(what), which Airlock's image reader does not support"
        case let .corrupt(image, detail): return "'\(image)' is corrupt: \(detail)"
        case let .workLimitExceeded(image, path, what, limit):
            return "reading \(path) in '\(image)' needed more than \(limit) \(what)"
        case let .tooManySymlinks(image, path, limit): return "'\(path)' in '\(image)' follows more than \(limit) symbolic links"
        case let .invalidPath(image, path, reason): return "cannot look up '\(path)' in '\(image)': \(reason)"
        case let .notRegularFile(image, path, type): return "'\(path)' in '\(image)' is a \(type), not a regular file"
        case let .fileTooLarge(image, path, size, limit): return "'\(path)' in '\(image)' is \(size) bytes, more than the \(limit) this reads"
        }
    }
}

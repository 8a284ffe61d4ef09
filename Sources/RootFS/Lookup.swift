extension Ext4Image {
    /// Linux's PATH_MAX, counting the NUL: longer paths and link targets fail there too.
    static let pathMax = 4096
    static let nameMax = 255

    /// Resolves an absolute path the way the kernel would inside the guest:
    /// `.` and `..` (which stops at the root), symlinks anywhere on the way,
    /// absolute ones from the image's root and relative ones from the link's
    /// directory, at most `limits.symlinks` of them.
    ///
    /// Returns nil when the path does not resolve: a component is missing, a
    /// component before the last is not a directory, or a trailing `/` follows
    /// something that is not one. With `followFinalSymlink` false, a final
    /// symlink is described itself rather than followed.
    public func lookup(_ path: String, followFinalSymlink: Bool = true) throws(RootFSError) -> FileInfo? {
        let budget = Budget(limits: limits, image: self.path, path: path)
        return try resolve(path, followFinalSymlink: followFinalSymlink, budget: budget)?.info
    }

    /// The contents of a regular file, following symlinks; nil when the path
    /// does not resolve. Files larger than `limit` bytes are an error rather
    /// than cut short, so a caller never parses half a file.
    public func readFile(_ path: String, limit: Int) throws(RootFSError) -> [UInt8]? {
        let budget = Budget(limits: limits, image: self.path, path: path)
        guard let inode = try resolve(path, followFinalSymlink: true, budget: budget) else { return nil }
        guard inode.type == .regular else { throw .notRegularFile(image: self.path, path: path, type: inode.type) }
        guard inode.size <= UInt64(max(0, limit)) else {
            throw .fileTooLarge(image: self.path, path: path, size: inode.size, limit: limit)
        }
        return try readContents(of: inode, count: Int(inode.size), budget: budget)
    }

    func resolve(_ path: String, followFinalSymlink: Bool, budget: Budget) throws(RootFSError) -> Inode? {
        let bytes = Array(path.utf8)
        guard bytes.first == UInt8(ascii: "/") else {
            throw .invalidPath(image: self.path, path: path, reason: "only absolute paths (starting with '/') can be looked up")
        }
        guard !bytes.contains(0) else { throw .invalidPath(image: self.path, path: path, reason: "the path contains a NUL byte") }
        guard bytes.count < Self.pathMax else {
            throw .invalidPath(image: self.path, path: path, reason: "the path is \(bytes.count) bytes, longer than PATH_MAX")
        }

        let root = try readInode(Inode.rootNumber, budget: budget)
        guard root.type == .directory else { throw corrupt("the root inode (2) is a \(root.type), not a directory") }

        // Components still to walk, the next one last, so a symlink's target can
        // be pushed in front of what follows it.
        var pending = Array(Self.components(bytes).reversed())
        var mustBeDirectory = bytes.count > 1 && bytes.last == UInt8(ascii: "/")
        var current = root
        // Inode numbers of the directories above `current`, for "..". Using the
        // walk's own history (not the on-disk ".." entry) is what makes
        // "link/.." land where Linux lands: in the link target's parent.
        var ancestors: [UInt32] = []
        var symlinks = 0

        while let name = pending.popLast() {
            if name == [UInt8(ascii: ".")] { continue }
            if name == [UInt8(ascii: "."), UInt8(ascii: ".")] {
                if let parent = ancestors.popLast() { current = try readInode(parent, budget: budget) }
                continue
            }
            let isLast = pending.isEmpty
            guard name.count <= Self.nameMax,
                  let number = try findEntry(named: name, in: current, budget: budget)
            else { return nil }
            guard number >= geometry.firstInode || number == Inode.rootNumber else {
                throw corrupt("directory inode \(current.number) has an entry for reserved inode \(number)")
            }
            let inode = try readInode(number, budget: budget)

            if inode.type == .symlink && (!isLast || followFinalSymlink || mustBeDirectory) {
                symlinks += 1
                guard symlinks <= limits.symlinks else {
                    throw .tooManySymlinks(image: self.path, path: path, limit: limits.symlinks)
                }
                let target = try readSymlink(inode, budget: budget)
                if target.first == UInt8(ascii: "/") {
                    current = root
                    ancestors.removeAll()
                }
                if isLast && target.last == UInt8(ascii: "/") { mustBeDirectory = true }
                pending.append(contentsOf: Self.components(target).reversed())
                continue
            }
            if isLast {
                if mustBeDirectory && inode.type != .directory { return nil }
                return inode
            }
            guard inode.type == .directory else { return nil }
            ancestors.append(current.number)
            current = inode
        }
        // The path ended in ".", "..", "/" or a symlink to a directory.
        return current
    }

    static func components(_ bytes: [UInt8]) -> [[UInt8]] {
        bytes.split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: true).map { Array($0) }
    }

    /// A symlink's target, up to its first NUL, like the kernel's readlink.
    func readSymlink(_ inode: Inode, budget: Budget) throws(RootFSError) -> [UInt8] {
        if inode.has(InodeFlag.encrypted) {
            throw .unsupported(image: path, what: "an encrypted symbolic link (inode \(inode.number))")
        }
        let size = inode.size
        guard size > 0, size < UInt64(Self.pathMax) else {
            throw corrupt("symbolic link inode \(inode.number) has length \(size) (must be 1..\(Self.pathMax - 1))")
        }
        var target: [UInt8]
        if !inode.has(InodeFlag.inlineData) && isFastSymlink(inode) {
            guard size < UInt64(Inode.blockArea.count) else {
                throw corrupt("fast symbolic link inode \(inode.number) has length \(size), more than fits in the inode")
            }
            target = Array(inode.blockArea[0..<Int(size)])
        } else {
            target = try readContents(of: inode, count: Int(size), budget: budget)
        }
        if let nul = target.firstIndex(of: 0) { target.removeSubrange(nul...) }
        guard !target.isEmpty else { throw corrupt("symbolic link inode \(inode.number) has an empty target") }
        return target
    }

    /// Fast symlinks keep the target in i_block itself. The kernel tells them
    /// apart by their owning no blocks beyond an extended-attribute block
    /// (ext4_inode_is_fast_symlink); with ea_inode, by length alone.
    func isFastSymlink(_ inode: Inode) -> Bool {
        if geometry.has(incompat: Feature.incompatEAInode) {
            return inode.size < UInt64(Inode.blockArea.count)
        }
        let eaSectors = inode.fileACL != 0 ? geometry.clusterSize / 512 : 0
        return inode.sectors(hugeFileFeature: geometry.has(roCompat: Feature.roCompatHugeFile), blockSize: geometry.blockSize) == eaSectors
    }
}

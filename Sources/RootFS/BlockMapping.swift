/// Logical blocks `logical..<logical+count` of a file, stored at `physical...`.
struct Run: Equatable {
    var logical: UInt64
    var physical: UInt64
    var count: UInt64
    /// An unwritten (preallocated) extent: the blocks read as zeros.
    var unwritten: Bool
}

extension Ext4Image {
    static let extentMagic: UInt16 = 0xF30A
    /// The kernel's EXT4_MAX_EXTENT_DEPTH; deeper trees are never written.
    static let maxExtentDepth = 5
    /// ext4_lblk_t is 32 bits: no file has a logical block at or past this.
    static let logicalBlockLimit: UInt64 = 1 << 32

    /// Number of blocks that hold `size` bytes.
    func blockCount(forSize size: UInt64) -> UInt64 {
        size / geometry.blockSize + (size % geometry.blockSize == 0 ? 0 : 1)
    }

    /// Calls `body` with the stored runs that overlap logical blocks `range`,
    /// clipped to it and in ascending order; holes are simply absent. `body`
    /// returns false to stop early. Inline-data inodes have no blocks (callers
    /// read them with `inlineDataTail`), so they yield no runs.
    func forEachRun(of inode: Inode, blocks range: Range<UInt64>, budget: Budget,
                    _ body: (Run) throws(RootFSError) -> Bool) throws(RootFSError) {
        if inode.has(InodeFlag.inlineData) { return }
        if inode.has(InodeFlag.extents) {
            // The end of the last extent seen, across nodes: keeps runs ascending
            // and non-overlapping however the tree is laid out.
            var cursor: UInt64 = 0
            _ = try walkExtentNode(inode.blockArea, inode: inode, depth: nil, range: range, cursor: &cursor, budget: budget, body)
        } else {
            _ = try walkBlockMap(inode, range: range, budget: budget, body)
        }
    }

    // MARK: Extents

    /// Returns false once the walk should stop (range done, or `body` said stop).
    private func walkExtentNode(_ node: [UInt8], inode: Inode, depth expected: Int?, range: Range<UInt64>,
                                cursor: inout UInt64, budget: Budget,
                                _ body: (Run) throws(RootFSError) -> Bool) throws(RootFSError) -> Bool {
        let where_ = "inode \(inode.number)'s extent tree"
        guard node.count >= 12, node.le16(0) == Self.extentMagic else {
            throw corrupt("\(where_) has no extent header (bad magic)")
        }
        let entries = Int(node.le16(2))
        let maxEntries = Int(node.le16(4))
        let depth = Int(node.le16(6))
        if let expected {
            guard depth == expected else { throw corrupt("\(where_) has a node at depth \(depth) where \(expected) belongs") }
        } else {
            guard depth <= Self.maxExtentDepth else {
                throw corrupt("\(where_) is \(depth) levels deep (ext4 allows \(Self.maxExtentDepth))")
            }
        }
        let capacity = (node.count - 12) / 12
        guard maxEntries > 0, maxEntries <= capacity, entries <= maxEntries, entries > 0 || depth == 0 else {
            throw corrupt("\(where_) has a node with \(entries) of \(maxEntries) entries (room for \(capacity))")
        }

        if depth == 0 {
            for i in 0..<entries {
                let o = 12 + 12 * i
                let logical = UInt64(node.le32(o))
                let rawLength = UInt64(node.le16(o + 4))
                let unwritten = rawLength > 32768
                let length = unwritten ? rawLength - 32768 : rawLength
                let physical = UInt64(node.le16(o + 6)) << 32 | UInt64(node.le32(o + 8))
                // logical < 2^32, length <= 2^15, physical < 2^48: no sum here overflows.
                guard length > 0, logical + length <= Self.logicalBlockLimit else {
                    throw corrupt("\(where_) has an extent of \(length) blocks at logical block \(logical)")
                }
                guard logical >= cursor else {
                    throw corrupt("\(where_) has overlapping or unsorted extents at logical block \(logical)")
                }
                guard physical >= 1, physical >= geometry.firstDataBlock, physical + length <= geometry.blocksCount else {
                    throw corrupt("\(where_) maps to blocks \(physical)..<\(physical + length), "
                        + "outside the filesystem (\(geometry.blocksCount) blocks)")
                }
                cursor = logical + length
                if logical >= range.upperBound { return false }
                if cursor <= range.lowerBound { continue }
                let start = Swift.max(logical, range.lowerBound)
                let end = Swift.min(cursor, range.upperBound)
                let run = Run(logical: start, physical: physical + (start - logical), count: end - start, unwritten: unwritten)
                if try !body(run) { return false }
            }
            return true
        }

        var previous: UInt64?
        for i in 0..<entries {
            let o = 12 + 12 * i
            let logical = UInt64(node.le32(o))
            let child = UInt64(node.le16(o + 8)) << 32 | UInt64(node.le32(o + 4))
            if let previous, logical <= previous {
                throw corrupt("\(where_) has unsorted index entries at logical block \(logical)")
            }
            previous = logical
            if logical >= range.upperBound { return false }
            // The next entry's start bounds this child; skip children wholly below the range.
            if i + 1 < entries, UInt64(node.le32(o + 12)) <= range.lowerBound { continue }
            try budget.chargeNode()
            let block = try readBlock(child, what: "\(where_) node", budget: budget)
            if try !walkExtentNode(block, inode: inode, depth: depth - 1, range: range, cursor: &cursor, budget: budget, body) {
                return false
            }
        }
        return true
    }

    // MARK: Block maps (ext2/ext3)

    /// i_block[0..<12] map blocks directly; i_block[12], [13], [14] point at
    /// single, double and triple indirect blocks of bs/4 block numbers each.
    private func walkBlockMap(_ inode: Inode, range: Range<UInt64>, budget: Budget,
                              _ body: (Run) throws(RootFSError) -> Bool) throws(RootFSError) -> Bool {
        let area = inode.blockArea
        for i in 0..<12 {
            let logical = UInt64(i)
            if logical >= range.upperBound { return false }
            if logical < range.lowerBound { continue }
            let block = UInt64(area.le32(4 * i))
            if block == 0 { continue }
            try checkDataBlock(block, inode: inode)
            if try !body(Run(logical: logical, physical: block, count: 1, unwritten: false)) { return false }
        }
        let perBlock = geometry.blockSize / 4
        var base: UInt64 = 12
        var span = perBlock
        for level in 1...3 {
            if base >= range.upperBound { return false }
            let pointer = UInt64(area.le32(4 * (11 + level)))
            if pointer != 0, base + span > range.lowerBound {
                if try !walkIndirect(pointer, level: level, base: base, span: span, inode: inode, range: range, budget: budget, body) {
                    return false
                }
            }
            // perBlock <= 2^14, so base and span stay below 2^43.
            base += span
            span *= perBlock
        }
        return true
    }

    /// `span` is how many logical blocks, starting at `base`, this block maps.
    private func walkIndirect(_ block: UInt64, level: Int, base: UInt64, span: UInt64, inode: Inode, range: Range<UInt64>,
                              budget: Budget, _ body: (Run) throws(RootFSError) -> Bool) throws(RootFSError) -> Bool {
        try checkDataBlock(block, inode: inode)
        try budget.chargeNode()
        let pointers = try readBlock(block, what: "inode \(inode.number)'s indirect block", budget: budget)
        let perBlock = pointers.count / 4
        let childSpan = span / UInt64(perBlock)
        for i in 0..<perBlock {
            let childBase = base + UInt64(i) * childSpan
            if childBase >= range.upperBound { return false }
            if childBase + childSpan <= range.lowerBound { continue }
            let child = UInt64(pointers.le32(4 * i))
            if child == 0 { continue }
            if level == 1 {
                try checkDataBlock(child, inode: inode)
                if try !body(Run(logical: childBase, physical: child, count: 1, unwritten: false)) { return false }
            } else if try !walkIndirect(child, level: level - 1, base: childBase, span: childSpan, inode: inode,
                                        range: range, budget: budget, body) {
                return false
            }
        }
        return true
    }

    private func checkDataBlock(_ block: UInt64, inode: Inode) throws(RootFSError) {
        guard block >= 1, block >= geometry.firstDataBlock, block < geometry.blocksCount else {
            throw corrupt("inode \(inode.number)'s block map points at block \(block), "
                + "outside the filesystem (\(geometry.blocksCount) blocks)")
        }
    }

    // MARK: Inline data

    /// The value of the inode's system.data extended attribute, where inline
    /// data continues past the 60 bytes of i_block; nil when there is none.
    func inlineDataTail(of inode: Inode) throws(RootFSError) -> [UInt8]? {
        let raw = inode.raw
        guard raw.count > 128 + 4 else { return nil }
        let extra = Int(raw.le16(0x80))
        guard extra % 4 == 0, 128 + extra <= raw.count else {
            throw corrupt("inode \(inode.number) has an invalid extra size \(extra)")
        }
        let header = 128 + extra
        guard fits(header, 8, in: raw.count), raw.le32(header) == 0xEA02_0000 else { return nil }
        let first = header + 4
        var entry = first
        // Each entry is at least 16 bytes, so this ends within the inode.
        while true {
            guard fits(entry, 4, in: raw.count) else { throw corrupt("inode \(inode.number)'s extended attributes run past the inode") }
            if raw.le32(entry) == 0 { return nil }
            guard fits(entry, 16, in: raw.count) else { throw corrupt("inode \(inode.number)'s extended attributes run past the inode") }
            let nameLength = Int(raw[entry])
            let next = entry + ((nameLength + 16 + 3) & ~3)
            guard next <= raw.count else { throw corrupt("inode \(inode.number)'s extended attributes run past the inode") }
            if raw[entry + 1] == 7, nameLength == 4, Array(raw[(entry + 16)..<(entry + 20)]) == Array("data".utf8) {
                guard raw.le32(entry + 4) == 0 else {
                    throw .unsupported(image: path, what: "inline data stored in an extended-attribute inode (inode \(inode.number))")
                }
                let offset = first + Int(raw.le16(entry + 2))
                let size = Int(raw.le32(entry + 8))
                guard fits(offset, size, in: raw.count) else {
                    throw corrupt("inode \(inode.number)'s inline data (\(size) bytes at \(offset)) runs past the inode")
                }
                return Array(raw[offset..<(offset + size)])
            }
            entry = next
        }
    }

    func checkInlineFeature(_ inode: Inode) throws(RootFSError) {
        guard geometry.has(incompat: Feature.incompatInlineData) else {
            throw corrupt("inode \(inode.number) is flagged as inline data but the filesystem lacks the inline_data feature")
        }
    }

    // MARK: Contents

    /// `count` bytes of a file (or symlink) from byte `start`, as the kernel
    /// would read them: holes and unwritten extents as zeros. The caller keeps
    /// `start + count` within the size and `count` within its own limit.
    func readContents(of inode: Inode, from start: UInt64 = 0, count: Int, budget: Budget) throws(RootFSError) -> [UInt8] {
        let (end, overflow) = start.addingReportingOverflow(UInt64(max(0, count)))
        guard count >= 0, !overflow else { throw corrupt("internal: read of \(count) bytes at \(start)") }
        if inode.has(InodeFlag.inlineData) {
            try checkInlineFeature(inode)
            let data = inode.blockArea + (try inlineDataTail(of: inode) ?? [])
            guard end <= UInt64(data.count) else {
                throw corrupt("inode \(inode.number) claims \(inode.size) bytes of inline data but holds \(data.count)")
            }
            return Array(data[Int(start)..<Int(end)])
        }
        // Zero-filled up front, so holes need no work; count is the caller's bounded limit.
        var buffer = [UInt8](repeating: 0, count: count)
        guard count > 0 else { return buffer }
        let bs = geometry.blockSize
        let blocks = (start / bs)..<blockCount(forSize: end)
        try forEachRun(of: inode, blocks: blocks, budget: budget) { (run) throws(RootFSError) -> Bool in
            if run.unwritten { return true }
            // Runs are clipped to `blocks`, so these byte ranges overlap [start, end)
            // and stay below 2^48 * 2^16.
            let runStart = run.logical * bs
            let from = Swift.max(runStart, start)
            let to = Swift.min(runStart + run.count * bs, end)
            guard from < to else { return true }
            let at = try offset(ofBlock: run.physical, what: "inode \(inode.number)'s data") + (from - runStart)
            try read(into: &buffer, start: Int(from - start), count: Int(to - from), at: at,
                     what: "inode \(inode.number)'s data", budget: budget)
            return true
        }
        return buffer
    }
}

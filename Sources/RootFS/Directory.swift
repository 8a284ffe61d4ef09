extension Ext4Image {
    /// The inode number that `name` has in directory `dir`, or nil.
    ///
    /// Directories are read linearly. An htree directory needs no special case:
    /// its index lives inside entries that look empty or oversized to a linear
    /// reader ("..", and whole-block entries with inode 0), which is how ext2
    /// stayed able to read ext3 directories.
    func findEntry(named name: [UInt8], in dir: Inode, budget: Budget) throws(RootFSError) -> UInt32? {
        let foldCase = dir.has(InodeFlag.casefold) && geometry.has(incompat: Feature.incompatCasefold)
        var found: UInt32?
        try forEachEntry(in: dir, budget: budget) { number, bytes, start, length in
            if length == name.count, Self.namesMatch(bytes, at: start, name, foldCase: foldCase) {
                found = number
                return false
            }
            return true
        }
        return found
    }

    /// Calls `body` with every entry in use (inode number not 0) of directory
    /// `dir`, in on-disk order: the inode number and the name as
    /// `bytes[start..<start+length]`. `body` returns false to stop. Inline
    /// directories imply "." and ".." rather than storing them; block
    /// directories store both, and they are passed on like any other name.
    func forEachEntry(in dir: Inode, budget: Budget,
                      _ body: (UInt32, [UInt8], Int, Int) throws(RootFSError) -> Bool) throws(RootFSError) {
        if dir.has(InodeFlag.encrypted) {
            throw .unsupported(image: path, what: "an encrypted directory (inode \(dir.number)); its names cannot be read without the key")
        }
        if dir.has(InodeFlag.inlineData) {
            try checkInlineFeature(dir)
            // i_block starts with the parent's inode number; entries follow it,
            // then continue in the system.data attribute.
            guard try scanEntries(Array(dir.blockArea[4...]), dir: dir, budget: budget, body) else { return }
            guard let tail = try inlineDataTail(of: dir), !tail.isEmpty else { return }
            _ = try scanEntries(tail, dir: dir, budget: budget, body)
            return
        }
        try forEachRun(of: dir, blocks: 0..<blockCount(forSize: dir.size), budget: budget) { (run) throws(RootFSError) -> Bool in
            if run.unwritten { return true }
            for k in 0..<run.count {
                let block = try readBlock(run.physical + k, what: "directory inode \(dir.number)'s block", budget: budget)
                guard try scanEntries(block, dir: dir, budget: budget, body) else { return false }
            }
            return true
        }
    }

    /// Scans one block (or inline region) of ext4_dir_entry_2 records; false once `body` said stop.
    private func scanEntries(_ bytes: [UInt8], dir: Inode, budget: Budget,
                             _ body: (UInt32, [UInt8], Int, Int) throws(RootFSError) -> Bool) throws(RootFSError) -> Bool {
        var offset = 0
        while offset < bytes.count {
            try budget.chargeEntry()
            guard fits(offset, 8, in: bytes.count) else {
                throw corrupt("directory inode \(dir.number) has a cut-off entry at offset \(offset)")
            }
            let number = bytes.le32(offset)
            let recordLength = decodeRecordLength(bytes.le16(offset + 4))
            let nameLength = Int(bytes[offset + 6])
            // The kernel's ext4_check_dir_entry rules; the first one also
            // guarantees progress, so the loop ends.
            guard recordLength >= 12, recordLength % 4 == 0, recordLength >= (nameLength + 8 + 3) & ~3,
                  recordLength <= bytes.count - offset
            else {
                throw corrupt("directory inode \(dir.number) has a bad entry at offset \(offset) "
                    + "(record length \(recordLength), name length \(nameLength))")
            }
            guard UInt64(number) <= geometry.inodesCount else {
                throw corrupt("directory inode \(dir.number) has an entry for inode \(number), past the last inode \(geometry.inodesCount)")
            }
            if number != 0, try !body(number, bytes, offset + 8, nameLength) { return false }
            offset += recordLength
        }
        return true
    }

    /// rec_len is 16 bits; 64 KiB blocks encode their one full-block entry
    /// specially (e2fsprogs' ext2fs_get_rec_len).
    private func decodeRecordLength(_ raw: UInt16) -> Int {
        guard geometry.blockSize >= 65536 else { return Int(raw) }
        if raw == 0xFFFF || raw == 0 { return Int(geometry.blockSize) }
        return Int(raw & 65532) | Int(raw & 3) << 16
    }

    /// Casefolded directories compare names case-insensitively. Only ASCII is
    /// folded here (the kernel folds full Unicode); paths Airlock checks are ASCII.
    private static func namesMatch(_ bytes: [UInt8], at start: Int, _ name: [UInt8], foldCase: Bool) -> Bool {
        for i in 0..<name.count {
            var a = bytes[start + i]
            var b = name[i]
            if foldCase {
                if a >= 0x41 && a <= 0x5A { a += 0x20 }
                if b >= 0x41 && b <= 0x5A { b += 0x20 }
            }
            if a != b { return false }
        }
        return true
    }
}

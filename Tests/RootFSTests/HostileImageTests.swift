import Foundation
import SeededRandom
import Testing
@testable import RootFS

/// Writes `bytes` at `offset` of the file at `path`.
func patch(_ path: String, at offset: UInt64, _ bytes: [UInt8]) throws {
    let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
    defer { try? handle.close() }
    try handle.seek(toOffset: offset)
    try handle.write(contentsOf: Data(bytes))
}

func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
func le16(_ v: UInt16) -> [UInt8] { [UInt8(truncatingIfNeeded: v), UInt8(truncatingIfNeeded: v >> 8)] }

/// Byte offset of an inode in the image file.
func inodeOffset(_ image: Ext4Image, _ number: UInt32) throws -> UInt64 {
    let g = image.geometry
    let index = UInt64(number - 1)
    let table = try image.inodeTable(group: index / g.inodesPerGroup, budget: budget(image))
    return table * g.blockSize + (index % g.inodesPerGroup) * g.inodeSize
}

/// The data runs of the inode at `path` (its blocks, for directories).
func runs(_ image: Ext4Image, _ path: String) throws -> [Run] {
    let node = try #require(try inode(image, path))
    var result: [Run] = []
    try image.forEachRun(of: node, blocks: 0..<image.blockCount(forSize: node.size), budget: budget(image)) { run in
        result.append(run)
        return true
    }
    return result
}

/// Images that are not ext4, are cut short, or were edited to lie.
@Suite struct HostileImageTests {
    @Test func filesThatAreNotExtImages() throws {
        let scratch = try Scratch()
        var generator = SplitMix64(seed: 7)
        let cases: [(String, [UInt8])] = [
            ("random.img", (0..<65536).map { _ in UInt8(truncatingIfNeeded: generator.next()) }),
            ("zeros.img", [UInt8](repeating: 0, count: 4096)),
            ("tiny.img", Array("not a filesystem".utf8)),
            ("empty.img", []),
        ]
        for (name, bytes) in cases {
            let path = scratch.path(name)
            _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
            let error = rootFSError { () throws(RootFSError) in _ = try Ext4Image(path: path) }
            guard case .notExt(path, _)? = error else { Issue.record("\(name): \(String(describing: error))"); continue }
            #expect(error!.description.contains("'\(path)' is not an ext2/3/4 image"))
            #expect(error!.description.contains("rootfs/build.sh"))
        }
        let random = rootFSError { () throws(RootFSError) in _ = try Ext4Image(path: scratch.path("random.img")) }
        #expect(random?.description.contains("no 0xEF53 magic at offset 1080") == true)

        let missing = rootFSError { () throws(RootFSError) in _ = try Ext4Image(path: scratch.path("nope.img")) }
        guard case let .cannotOpen(_, underlying)? = missing else { Issue.record("\(String(describing: missing))"); return }
        #expect(underlying.errno == ENOENT)
        #expect(missing!.description.contains("does not exist"))
        guard case let .cannotOpen(_, dirError)? = rootFSError({ () throws(RootFSError) in _ = try Ext4Image(path: scratch.root) }) else {
            Issue.record("a directory opened as an image"); return
        }
        #expect(dirError.errno == EISDIR)
        // A FIFO must be refused without blocking on open.
        let fifo = scratch.path("fifo.img")
        try #require(mkfifo(fifo, 0o600) == 0)
        guard case .notExt? = rootFSError({ () throws(RootFSError) in _ = try Ext4Image(path: fifo) }) else {
            Issue.record("a FIFO was accepted as an image"); return
        }
        guard case .notExt? = rootFSError({ () throws(RootFSError) in _ = try Ext4Image(path: "/dev/null") }) else {
            Issue.record("/dev/null was accepted as an image"); return
        }
    }

    @Test func truncatedImages() throws {
        let built = try TestImage(.ext4)
        let whole = try built.bytes
        for keep in [whole.count / 2, whole.count - 1, 4096] {
            let path = built.scratch.path("cut-\(keep).img")
            _ = FileManager.default.createFile(atPath: path, contents: Data(whole[0..<keep]))
            let error = rootFSError { () throws(RootFSError) in _ = try Ext4Image(path: path) }
            guard case let .truncated(name, _, needed, size)? = error else { Issue.record("\(keep): \(String(describing: error))"); continue }
            #expect(name == path && needed == UInt64(whole.count) && size == UInt64(keep))
            #expect(error!.description.contains("is truncated"))
        }
        let head = built.scratch.path("head.img")
        _ = FileManager.default.createFile(atPath: head, contents: Data(whole[0..<1500]))
        guard case .notExt? = rootFSError({ () throws(RootFSError) in _ = try Ext4Image(path: head) }) else {
            Issue.record("1500 bytes passed for a superblock"); return
        }
    }

    @Test func superblockFieldsAreValidated() throws {
        let built = try TestImage(.ext4, privateCopy: true)
        let original = try built.bytes
        let sb: UInt64 = 1024
        let incompat = original.le32(1024 + 0x60)
        // (what to write, where, the error case it must give, text the message must hold)
        let edits: [(String, UInt64, [UInt8], String)] = [
            ("magic", sb + 0x38, le16(0), "no 0xEF53 magic"),
            ("dirdata", sb + 0x60, le32(incompat | 0x1000), "dirdata"),
            ("unknown incompat bit", sb + 0x60, le32(incompat | 0x80_0000), "unknown bits 0x800000"),
            ("journal device", sb + 0x60, le32(incompat | 0x8), "journal_dev"),
            ("revision", sb + 0x4C, le32(7), "revision 7"),
            ("block size", sb + 0x18, le32(7), "block size"),
            ("blocks per group", sb + 0x20, le32(0), "blocks per group"),
            ("inodes per group", sb + 0x28, le32(0), "inodes per group"),
            ("inode count", sb + 0x00, le32(original.le32(1024) + 1), "inode count"),
            ("inode size", sb + 0x58, le16(100), "inode size 100"),
            ("descriptor size", sb + 0xFE, le16(48), "descriptor size 48"),
            ("block count", sb + 0x04, le32(0xFFFF_FFF0), "is truncated"),
            ("first data block", sb + 0x14, le32(0xFFFF_FFF0), "first data block"),
        ]
        for (what, offset, bytes, text) in edits {
            try patch(built.path, at: 0, original)
            try patch(built.path, at: offset, bytes)
            let error = rootFSError { () throws(RootFSError) in _ = try Ext4Image(path: built.path) }
            #expect(error?.description.contains(text) == true, "\(what): \(String(describing: error))")
            #expect(error?.description.contains(built.path) == true)
        }
        // A needs_recovery image is still read (the journal only holds recent changes).
        try patch(built.path, at: 0, original)
        try patch(built.path, at: sb + 0x60, le32(incompat | 0x4))
        #expect(try Ext4Image(path: built.path).lookup("/sbin/airlock-init")?.isExecutable == true)
    }

    @Test func corruptStructuresGiveErrorsNotTraps() throws {
        let built = try TestImage(.ext4, privateCopy: true)
        let original = try built.bytes
        let image = try built.open()
        let bs = image.geometry.blockSize

        func expectCorrupt(_ text: String, _ body: () throws(RootFSError) -> Void, sourceLocation: SourceLocation = #_sourceLocation) {
            let error = rootFSError(sourceLocation: sourceLocation, body)
            guard case .corrupt? = error else {
                Issue.record("expected corruption, got \(String(describing: error))", sourceLocation: sourceLocation)
                return
            }
            #expect(error!.description.contains(text), "\(error!)", sourceLocation: sourceLocation)
            #expect(error!.description.contains("e2fsck -fn"), sourceLocation: sourceLocation)
        }

        // The root inode turned into a regular file.
        let root = try inodeOffset(image, 2)
        try patch(built.path, at: root, le16(0o100644))
        expectCorrupt("root inode (2)") { () throws(RootFSError) in _ = try image.lookup("/etc") }
        try patch(built.path, at: 0, original)

        // A record length of 0 in the root directory's first block would loop forever if trusted.
        let rootBlock = try #require(try runs(image, "/").first).physical
        try patch(built.path, at: rootBlock * bs + 4, le16(0))
        expectCorrupt("bad entry") { () throws(RootFSError) in _ = try image.lookup("/nope") }
        try patch(built.path, at: 0, original)

        // An extent past the end of the filesystem.
        let big = try #require(try inode(image, "/usr/lib/big.bin"))
        try patch(built.path, at: try inodeOffset(image, big.number) + 0x28 + 12 + 8, le32(0x7FFF_FFFF))
        expectCorrupt("outside the filesystem") { () throws(RootFSError) in _ = try image.readFile("/usr/lib/big.bin", limit: 1 << 20) }
        try patch(built.path, at: 0, original)

        // Marking the extent unwritten (ee_len + 32768) makes its blocks read as zeros, as in the kernel.
        let extentLength = big.blockArea.le16(12 + 4)
        #expect(extentLength < 32768 && big.blockArea.le16(2) == 1, "big.bin should be one extent")
        try patch(built.path, at: try inodeOffset(image, big.number) + 0x28 + 12 + 4, le16(extentLength + 32768))
        #expect(try image.readFile("/usr/lib/big.bin", limit: 1 << 20) == [UInt8](repeating: 0, count: Tree.bigSize))
        try patch(built.path, at: 0, original)

        // An extent index node that points at itself claims the wrong depth.
        let holes = try #require(try inode(image, "/usr/lib/holes.bin"))
        let leaf = UInt64(holes.blockArea.le32(12 + 4))
        try patch(built.path, at: leaf * bs + 6, le16(1))  // depth 1 ...
        try patch(built.path, at: leaf * bs + 12 + 4, le32(UInt32(leaf)))  // ... whose first child is itself
        expectCorrupt("depth 1 where 0 belongs") { () throws(RootFSError) in _ = try image.readFile("/usr/lib/holes.bin", limit: 8 << 20) }
        try patch(built.path, at: 0, original)

        // A directory entry naming a reserved inode (the journal's).
        let etcBlocks = try runs(image, "/etc")
        let etc = try #require(etcBlocks.first).physical * bs
        // The first entry is "." (12 bytes), the second "..": point ".." at inode 8 and look up "..".
        try patch(built.path, at: etc + 12, le32(8))
        // ".." is resolved from the walk, not the disk, so this only matters as a name: rename it "xx".
        try patch(built.path, at: etc + 12 + 8, Array("xx".utf8))
        expectCorrupt("reserved inode 8") { () throws(RootFSError) in _ = try image.lookup("/etc/xx") }
        try patch(built.path, at: 0, original)

        // A symlink whose length is zero, and one too long for a fast link.
        let initLink = try inodeOffset(image, try #require(try inode(image, "/sbin/init")).number)
        try patch(built.path, at: initLink + 4, le32(0))
        expectCorrupt("length 0") { () throws(RootFSError) in _ = try image.lookup("/sbin/init") }
        try patch(built.path, at: initLink + 4, le32(200))
        expectCorrupt("more than fits in the inode") { () throws(RootFSError) in _ = try image.lookup("/sbin/init") }
        try patch(built.path, at: 0, original)

        // An inode number past the last inode.
        try patch(built.path, at: etc + 24, le32(image.geometry.inodesCount.asUInt32 + 5))
        let error = rootFSError { () throws(RootFSError) in _ = try image.lookup("/etc/passwd") }
        #expect(error?.description.contains("past the last inode") == true, "\(String(describing: error))")
        try patch(built.path, at: 0, original)

        #expect(try image.lookup("/sbin/init")?.isExecutable == true, "restored image reads again")
    }

    @Test func blockMapCorruption() throws {
        let built = try TestImage(.ext2, privateCopy: true)
        let original = try built.bytes
        let image = try built.open()
        let big = try #require(try inode(image, "/usr/lib/big.bin"))
        let at = try inodeOffset(image, big.number)
        let double = big.blockArea.le32(13 * 4)

        // The triple indirect slot pointing at the double indirect block: the
        // walk is bounded by depth, so it ends (and finds garbage, not a loop).
        let sparse = try #require(try inode(image, "/usr/lib/sparse.bin"))
        try patch(built.path, at: try inodeOffset(image, sparse.number) + 0x28 + 14 * 4, le32(double))
        let started = ContinuousClock.now
        _ = rootFSErrorOrResult { () throws(RootFSError) in try image.readFile("/usr/lib/sparse.bin", limit: 80 << 20) }
        #expect(ContinuousClock.now - started < .seconds(5))
        try patch(built.path, at: 0, original)

        // An indirect pointer past the end.
        try patch(built.path, at: at + 0x28 + 12 * 4, le32(0x00FF_FFFF))
        let error = rootFSError { () throws(RootFSError) in _ = try image.readFile("/usr/lib/big.bin", limit: 1 << 20) }
        #expect(error?.description.contains("block map points at block 16777215") == true, "\(String(describing: error))")
    }

    @Test func workLimitsStopLookups() throws {
        let built = try TestImage(.ext4)
        // A name the directory does not hold: finding that out reads all 600 entries,
        // whatever order mke2fs wrote them in (it follows the host's readdir order,
        // so "the last name" can sit anywhere in the directory).
        let absent = "/big/" + Tree.bigEntry(Tree.bigEntries)
        let cases: [(Ext4Image.Limits, String, String)] = [
            (.init(directoryEntries: 50), absent, "directory entries"),
            (.init(bytesRead: 64 * 1024), "/usr/lib/big.bin", "bytes read"),
            (.init(mappingNodes: 0), "/usr/lib/holes.bin", "extent nodes"),
        ]
        for (limits, path, what) in cases {
            let image = try built.open(limits: limits)
            let error = rootFSError { () throws(RootFSError) in _ = try image.readFile(path, limit: 8 << 20) }
            guard case let .workLimitExceeded(name, reported, described, _)? = error else {
                Issue.record("\(what): \(String(describing: error))"); continue
            }
            #expect(name == built.path && reported == path && described.contains(what))
            #expect(error!.description.contains("corrupt or crafted"))
        }
        // With the defaults the whole directory is read: the last name is found, the absent one is not.
        #expect(try built.open().lookup("/big/" + Tree.bigEntry(Tree.bigEntries - 1))?.type == .regular)
        #expect(try built.open().lookup(absent) == nil)
    }

    /// Seeded random corruption of the structures a look-up reads. Each round
    /// flips bytes, runs the look-ups the VMM would, and restores the bytes.
    /// Every outcome must be a result or a RootFSError naming the image.
    @Test(arguments: [Layout.ext4, .ext2, .ext4Inline])
    func randomCorruption(_ layout: Layout) throws {
        let built = try TestImage(layout, privateCopy: true)
        let image = try built.open()
        let g = image.geometry
        let bs = g.blockSize

        var targets: [(String, Range<UInt64>)] = [("superblock", 1024..<2048)]
        let gdt: UInt64 = bs == 1024 ? 2 : 1
        targets.append(("group descriptors", gdt * bs..<(gdt * bs + min(bs, g.groupCount * g.descriptorSize))))
        let paths = ["/", "/sbin", "/sbin/airlock-init", "/sbin/init", "/etc", "/etc/passwd", "/big", "/usr", "/usr/bin",
                     "/usr/bin/slow-rel", "/usr/lib", "/usr/lib/big.bin", "/usr/lib/holes.bin", "/big/" + Tree.bigEntry(300)]
        for path in paths {
            let node = try #require(try inode(image, path))
            let at = try inodeOffset(image, node.number)
            targets.append(("inode \(path)", at..<(at + min(g.inodeSize, 160))))
            if !node.has(InodeFlag.inlineData), node.type == .directory || path.hasSuffix(".bin") || path.hasSuffix("slow-rel") {
                for run in try runs(image, path).prefix(4) {
                    targets.append(("data of \(path)", run.physical * bs..<(run.physical * bs + min(run.count, 2) * bs)))
                }
                // Indirect blocks and extent index nodes.
                if !node.has(InodeFlag.extents) && !node.has(InodeFlag.inlineData) {
                    for slot in 12..<15 where node.blockArea.le32(slot * 4) != 0 {
                        let b = UInt64(node.blockArea.le32(slot * 4))
                        targets.append(("indirect of \(path)", b * bs..<(b * bs + bs)))
                    }
                } else if node.has(InodeFlag.extents) && node.blockArea.le16(6) > 0 {
                    let b = UInt64(node.blockArea.le32(12 + 4))
                    targets.append(("extent node of \(path)", b * bs..<(b * bs + 64)))
                }
            }
        }

        let fd = open(built.path, O_RDWR)
        try #require(fd >= 0)
        defer { close(fd) }
        var random = SplitMix64(seed: 0xA1B2_C3D4 ^ UInt64(layout.rawValue.count))
        var results = 0
        var errors: [String: Int] = [:]
        let rounds = 1000
        let started = ContinuousClock.now
        for _ in 0..<rounds {
            var saved: [(UInt64, UInt8)] = []
            for _ in 0..<(1 + random.below(6)) {
                let (_, range) = targets[random.below(targets.count)]
                let offset = range.lowerBound + UInt64(random.below(Int(range.upperBound - range.lowerBound)))
                var byte: UInt8 = 0
                pread(fd, &byte, 1, off_t(offset))
                saved.append((offset, byte))
                // Mostly single-bit and random flips; sometimes the extremes a parser mishandles.
                var new: UInt8
                switch random.below(4) {
                case 0: new = byte ^ (1 << UInt8(random.below(8)))
                case 1: new = 0xFF
                case 2: new = 0
                default: new = UInt8(truncatingIfNeeded: random.next())
                }
                pwrite(fd, &new, 1, off_t(offset))
            }

            let outcomes: [String?] = [
                rootFSErrorOrResult { () throws(RootFSError) in
                    let fs = try Ext4Image(path: built.path)
                    for path in ["/sbin/airlock-init", "/sbin/init", "/usr/bin/slow-rel", "/big/" + Tree.bigEntry(300),
                                 "/usr/bin/to-sbin/../etc/passwd"] {
                        _ = try fs.lookup(path)
                    }
                    _ = try fs.readFile("/etc/passwd", limit: 4096)
                    _ = try fs.readFile("/usr/lib/big.bin", limit: 1 << 20)
                    _ = try fs.readFile("/usr/lib/holes.bin", limit: 8 << 20)
                },
                rootFSErrorOrResult { () throws(RootFSError) in _ = try RootFSCheck.findExecutable(image: built.path, path: "/sbin/init") },
            ]
            for outcome in outcomes {
                if let outcome {
                    #expect(outcome.contains(built.path), "\(outcome)")
                    errors[String(outcome.replacingOccurrences(of: built.path, with: "IMG").prefix(110)), default: 0] += 1
                } else {
                    results += 1
                }
            }
            for (offset, byte) in saved.reversed() {
                var old = byte
                pwrite(fd, &old, 1, off_t(offset))
            }
        }
        let elapsed = ContinuousClock.now - started
        #expect(results > 0 && !errors.isEmpty, "\(results) results, \(errors.count) kinds of error")
        #expect(elapsed < .seconds(30), "\(rounds) rounds took \(elapsed)")
        #expect(try Ext4Image(path: built.path).readFile("/etc/passwd", limit: 4096) == Array(Tree.passwd.utf8))
    }
}

/// nil when `body` returned, the error's description when it threw.
func rootFSErrorOrResult<T>(_ body: () throws(RootFSError) -> T) -> String? {
    do {
        _ = try body()
        return nil
    } catch {
        return error.description
    }
}


extension UInt64 {
    var asUInt32: UInt32 { UInt32(truncatingIfNeeded: self) }
}

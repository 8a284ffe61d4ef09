import Foundation
import SeededRandom
import Testing
@testable import RootFS

/// What a walk found at one path: the type, permissions, and the contents
/// (files) or target (links).
struct WalkedEntry: Equatable, CustomStringConvertible {
    var type: FileType
    var permissions: UInt16
    var bytes: [UInt8]

    var description: String { "\(type) \(String(permissions, radix: 8)) \(bytes.count) bytes" }
}

/// Walks the whole tree under `root` with one budget, as an extractor would:
/// every directory once (an inode seen twice is a loop), files read through
/// `forEachChunk` into their full size.
func walkTree(_ reader: TreeReader, root: String = "/", skipping: Set<String> = []) throws -> [String: WalkedEntry] {
    var found: [String: WalkedEntry] = [:]
    guard let top = try reader.node(at: root) else { return found }
    var pending: [(String, Node)] = [("", top)]
    var seenDirectories: Set<UInt32> = [top.info.inode]
    while let (path, directory) = pending.popLast() {
        var entries: [DirectoryEntry] = []
        try reader.forEachEntry(of: directory) { entries.append($0); return true }
        for entry in entries {
            let name = String(decoding: entry.name, as: UTF8.self)
            let full = path + "/" + name
            if skipping.contains(full) { continue }
            let node = try reader.node(entry, in: directory)
            var walked = WalkedEntry(type: node.info.type, permissions: node.info.permissions, bytes: [])
            switch node.info.type {
            case .directory:
                guard seenDirectories.insert(node.info.inode).inserted else {
                    throw StageError("directory inode \(node.info.inode) reached twice (at \(full))")
                }
                pending.append((full, node))
            case .regular:
                guard node.info.size <= 80 << 20 else { throw StageError("\(full) claims \(node.info.size) bytes") }
                var contents = [UInt8](repeating: 0, count: Int(node.info.size))
                var last: UInt64 = 0
                try reader.forEachChunk(of: node, chunkSize: 64 << 10) { offset, bytes in
                    #expect(offset >= last, "chunks come in ascending order")
                    last = offset + UInt64(bytes.count)
                    contents.withUnsafeMutableBytes { $0.baseAddress!.advanced(by: Int(offset)).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count) }
                    return true
                }
                walked.bytes = contents
            case .symlink:
                walked.bytes = try reader.symlinkTarget(of: node)
            case .other:
                break
            }
            found[full] = walked
        }
    }
    return found
}

/// The same walk over the host's staging directory, with lstat (links not followed).
func walkHost(_ root: String, path: String = "") throws -> [String: WalkedEntry] {
    var found: [String: WalkedEntry] = [:]
    for name in try FileManager.default.contentsOfDirectory(atPath: root + path) {
        let full = path + "/" + name
        var info = stat()
        guard lstat(root + full, &info) == 0 else { throw StageError("lstat \(full)") }
        let permissions = UInt16(info.st_mode & 0o7777)
        switch info.st_mode & S_IFMT {
        case S_IFDIR:
            found[full] = WalkedEntry(type: .directory, permissions: permissions, bytes: [])
            found.merge(try walkHost(root, path: full)) { a, _ in a }
        case S_IFREG:
            found[full] = WalkedEntry(type: .regular, permissions: permissions, bytes: Array(try Data(contentsOf: URL(fileURLWithPath: root + full))))
        case S_IFLNK:
            let target = try FileManager.default.destinationOfSymbolicLink(atPath: root + full)
            found[full] = WalkedEntry(type: .symlink, permissions: permissions, bytes: Array(target.utf8))
        default:
            found[full] = WalkedEntry(type: .other, permissions: permissions, bytes: [])
        }
    }
    return found
}

/// Listing directories and streaming files under one budget, for extracting a
/// whole tree from an image a guest wrote.
@Suite struct TreeReaderTests {
    /// Every layout, walked whole, gives back exactly the staged tree: names,
    /// types, permissions, file bytes (holes as zeros) and link targets.
    @Test(arguments: Layout.allCases)
    func aWholeTreeReadsBackAsStaged(_ layout: Layout) throws {
        let built = try TestImage(layout)
        let reader = TreeReader(try built.open(), limits: .init(bytesRead: 512 << 20), purpose: "the whole tree")
        let walked = try walkTree(reader, skipping: ["/lost+found"])
        let staged = try walkHost(try ImageCache.shared.stageDirectory())
        #expect(walked.count == staged.count)
        for (path, var expected) in staged {
            guard let got = walked[path] else { Issue.record("\(path) is missing from the walk"); continue }
            // mke2fs 1.47 with inline_data drops a trailing hole and rounds the size up to a block.
            if layout == .ext4Inline && path == "/usr/lib/tail-hole.bin" { expected.bytes = Array(expected.bytes.prefix(got.bytes.count)) }
            // Symlink permissions are whatever the host gives them (0777 on Linux); mke2fs copies them.
            #expect(got == expected, "\(path): \(got) vs \(expected)")
        }
    }

    @Test func oneBudgetCoversTheWholeWalk() throws {
        let built = try TestImage(.ext4)
        let image = try built.open()
        // Each of these is plenty for any single look-up, and too little for the whole tree.
        for (limits, what) in [(Ext4Image.Limits(directoryEntries: 400), "directory entries"),
                               (Ext4Image.Limits(bytesRead: 512 << 10), "bytes read")] {
            let reader = TreeReader(image, limits: limits, purpose: "the whole tree")
            #expect(try reader.node(at: "/etc/passwd")?.info.type == .regular)
            let error = rootFSError { () throws(RootFSError) in
                do { _ = try walkTree(reader) } catch let e as RootFSError { throw e } catch { Issue.record("\(error)") }
            }
            guard case let .workLimitExceeded(name, purpose, described, _)? = error else { Issue.record("\(what): \(String(describing: error))"); continue }
            #expect(name == built.path && purpose == "the whole tree" && described == what)
            #expect(error!.summary == "reading the whole tree in '\(built.path)' needed more than \(limits.directoryEntries == 400 ? 400 : 512 << 10) \(what)")
        }
    }

    @Test func stoppingEarlyCostsOnlyWhatWasRead() throws {
        let built = try TestImage(.ext4)
        let reader = TreeReader(try built.open(), limits: .init(directoryEntries: 50), purpose: "the first names")
        let big = try #require(try reader.node(at: "/big"))
        var seen = 0
        try reader.forEachEntry(of: big) { _ in seen += 1; return seen < 10 }
        #expect(seen == 10, "600 entries, but the walk stopped at 10 within a budget of 50")
        let file = try #require(try reader.node(at: "/usr/lib/big.bin"))
        var chunks = 0
        try reader.forEachChunk(of: file, chunkSize: 4096) { _, _ in chunks += 1; return false }
        #expect(chunks == 1)
    }

    @Test func readingANodeAsTheWrongTypeIsRefused() throws {
        let built = try TestImage(.ext4)
        let reader = TreeReader(try built.open(), limits: .default, purpose: "types")
        let passwd = try #require(try reader.node(at: "/etc/passwd"))
        let etc = try #require(try reader.node(at: "/etc"))
        let link = try #require(try reader.node(at: "/sbin/init"))
        #expect(link.info.type == .symlink, "a final link is itself unless asked")
        #expect(try reader.node(at: "/sbin/init", followFinalSymlink: true)?.info.type == .regular)
        #expect(rootFSError { () throws(RootFSError) in try reader.forEachEntry(of: passwd) { _ in true } }?.summary.contains("is a regular file") == true)
        #expect(rootFSError { () throws(RootFSError) in try reader.forEachChunk(of: etc) { _, _ in true } }?.summary.contains("is a directory") == true)
        #expect(rootFSError { () throws(RootFSError) in _ = try reader.symlinkTarget(of: passwd) } != nil)
        // An entry naming a reserved inode (8, the journal's) is corrupt, not content.
        let error = rootFSError { () throws(RootFSError) in _ = try reader.node(DirectoryEntry(name: Array("j".utf8), inode: 8), in: etc) }
        #expect(error?.summary.contains("reserved inode 8") == true, "\(String(describing: error))")
    }

    /// Seeded random corruption of everything a whole-tree walk reads; each
    /// round must end in a tree or a RootFSError naming the image, quickly.
    @Test(arguments: [Layout.ext4, .ext2, .ext4Inline])
    func randomCorruptionOfAWalk(_ layout: Layout) throws {
        let built = try TestImage(layout, privateCopy: true)
        let image = try built.open()
        let g = image.geometry
        let bs = g.blockSize
        var targets: [Range<UInt64>] = [1024..<2048]
        let probe = TreeReader(image, limits: .init(bytesRead: 512 << 20), purpose: "targets")
        for path in ["/", "/etc", "/etc/passwd", "/big", "/usr/lib", "/usr/lib/big.bin", "/usr/lib/holes.bin", "/usr/bin/slow-rel", "/home/airlock"] {
            let node = try #require(try inode(image, path))
            let at = try inodeOffset(image, node.number)
            targets.append(at..<(at + min(g.inodeSize, 160)))
            if !node.has(InodeFlag.inlineData) {
                for run in try runs(image, path).prefix(3) {
                    targets.append(run.physical * bs..<(run.physical * bs + min(run.count, 2) * bs))
                }
            }
        }
        _ = probe

        let fd = open(built.path, O_RDWR)
        try #require(fd >= 0)
        defer { close(fd) }
        var random = SplitMix64(seed: 0x5EED_7EE5 ^ UInt64(layout.rawValue.count))
        var trees = 0, errors = 0
        let started = ContinuousClock.now
        for _ in 0..<300 {
            var saved: [(UInt64, UInt8)] = []
            for _ in 0..<(1 + random.below(6)) {
                let range = targets[random.below(targets.count)]
                let offset = range.lowerBound + UInt64(random.below(Int(range.upperBound - range.lowerBound)))
                var byte: UInt8 = 0
                pread(fd, &byte, 1, off_t(offset))
                saved.append((offset, byte))
                var new: UInt8 = random.below(2) == 0 ? byte ^ (1 << UInt8(random.below(8))) : UInt8(truncatingIfNeeded: random.next())
                pwrite(fd, &new, 1, off_t(offset))
            }
            do {
                let reader = TreeReader(try Ext4Image(path: built.path), limits: .init(bytesRead: 160 << 20), purpose: "the tree")
                _ = try walkTree(reader)
                trees += 1
            } catch let error as RootFSError {
                #expect(error.description.contains(built.path) && error.summary.contains(built.path), "\(error)")
                errors += 1
            } catch {
                errors += 1  // the test walker's own refusals: a loop, an absurd size
            }
            for (offset, byte) in saved.reversed() {
                var old = byte
                pwrite(fd, &old, 1, off_t(offset))
            }
        }
        #expect(trees > 0 && errors > 0, "\(trees) trees, \(errors) errors")
        #expect(ContinuousClock.now - started < .seconds(60))
    }
}

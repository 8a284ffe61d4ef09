import Foundation
import SeededRandom
import Testing
@testable import RootFS
@testable import WorkspaceDisks

/// Images a hostile guest would leave: every case must be refused, or
/// neutralised with a note, and nothing may be written outside the output
/// directory; a refusal leaves no output directory behind.
@Suite struct HostileArtifactTests {
    /// Extracts `/out` of `image` into a fresh directory beside a sentinel
    /// directory that must stay empty; returns the report or the error.
    func extract(_ scratch: Scratch, _ image: String, limits: ArtifactLimits = ArtifactLimits(),
                 sourceLocation: SourceLocation = #_sourceLocation) throws -> Result<ArtifactReport, WorkspaceError> {
        let parent = scratch.path("extract-\(UUID().uuidString)")
        try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: false)
        let output = parent + "/out"
        let result: Result<ArtifactReport, WorkspaceError>
        do throws(WorkspaceError) {
            result = .success(try ArtifactExtractor.extract(image: image, guestDirectory: "/out", displayPrefix: "/workspace/out",
                                                            into: output, limits: limits))
        } catch {
            result = .failure(error)
        }
        let beside = try FileManager.default.contentsOfDirectory(atPath: parent)
        switch result {
        case .success:
            #expect(beside == ["out"], "only the output directory appears: \(beside)", sourceLocation: sourceLocation)
            for (path, info) in try listHost(output) {
                let type = info.st_mode & S_IFMT
                #expect(type == S_IFREG || type == S_IFDIR || type == S_IFLNK, "\(path) is a special file", sourceLocation: sourceLocation)
                #expect(info.st_mode & 0o7000 == 0 || type == S_IFLNK, "\(path) kept mode \(String(info.st_mode, radix: 8))", sourceLocation: sourceLocation)
            }
        case .failure:
            #expect(beside.isEmpty, "a refusal leaves nothing: \(beside)", sourceLocation: sourceLocation)
        }
        return result
    }

    func refusal(_ result: Result<ArtifactReport, WorkspaceError>, sourceLocation: SourceLocation = #_sourceLocation) -> String {
        switch result {
        case let .success(report):
            Issue.record("expected a refusal, got \(report.artifacts.map(\.path))", sourceLocation: sourceLocation)
            return ""
        case let .failure(error):
            return error.description
        }
    }

    @Test func aSymlinkToEtcPasswdIsKeptAsALinkAndNeverFollowed() throws {
        let scratch = try Scratch()
        let before = try sha256(ofFile: "/etc/passwd")
        let image = try buildImage(scratch) { t in
            try t.file("out/ok", "fine\n")
            try t.symlink("out/passwd", to: "/etc/passwd")
            try t.symlink("out/up", to: "../../../etc/shadow")
            try t.symlink("out/inside", to: "ok")
        }
        let report = try extract(scratch, image).get()
        let output = report.directory
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: output + "/passwd") == "/etc/passwd")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: output + "/up") == "../../../etc/shadow")
        #expect(report.notes.count == 2 && report.notes.allSatisfy { $0.contains("outside the artifacts: kept as a link, not followed") })
        #expect(report.notes.contains { $0.contains("'passwd'") } && report.notes.contains { $0.contains("'up'") })
        #expect(try sha256(ofFile: "/etc/passwd") == before)
        #expect(report.artifacts.first { $0.path == "passwd" }?.linkTarget == "/etc/passwd")
    }

    @Test func aDirectoryNamedLikeALinkCannotWriteThroughIt() throws {
        let scratch = try Scratch()
        let victim = scratch.path("victim")
        try FileManager.default.createDirectory(atPath: victim, withIntermediateDirectories: false)
        let image = try buildImage(scratch) { t in
            try t.symlink("out/evil", to: victim)
            try t.file("out/evi2/payload", "pwned\n")
        }
        // Rename "evi2" to "evil": one directory now holds a link and a directory of the same name.
        let surgery = try ImageSurgery(image)
        try patch(image, at: try surgery.direntOffset("/out", "evi2") + 8, Array("evil".utf8))
        let message = refusal(try extract(scratch, image))
        #expect(message.contains("artifact '/workspace/out/evil' refused: its name appears twice"), "\(message)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: victim).isEmpty)
    }

    @Test func namesThatReachOutsideAreRefusedAndDotEntriesIgnored() throws {
        let scratch = try Scratch()
        let image = try buildImage(scratch) { t in
            try t.file("out/AAAAAAAAAAAAAAAA", "escape\n")
            try t.file("out/zz", "dots\n")
            try t.file("out/keep", "kept\n")
        }
        let surgery = try ImageSurgery(image)
        let dotdot = try surgery.direntOffset("/out", "zz")
        try patch(image, at: dotdot + 8, Array("..".utf8))
        // ".." naming a file is never content: it is skipped, not followed or written.
        let kept = try extract(scratch, copy(image, scratch, "dots")).get()
        #expect(kept.artifacts.map(\.path) == ["AAAAAAAAAAAAAAAA", "keep"])

        try patch(image, at: try surgery.direntOffset("/out", "AAAAAAAAAAAAAAAA") + 8, Array("../../escape.txt".utf8))
        let message = refusal(try extract(scratch, image))
        #expect(message.contains("'/workspace/out/../../escape.txt' refused: its name contains '/'"), "\(message)")
        #expect(!FileManager.default.fileExists(atPath: scratch.path("escape.txt")))
        #expect(!FileManager.default.fileExists(atPath: (scratch.root as NSString).deletingLastPathComponent + "/escape.txt"))
    }

    @Test(arguments: [(0o020644, "char device"), (0o060644, "block device"), (0o010644, "fifo"), (0o140755, "socket")])
    func specialFilesAreRefused(mode: Int, what: String) throws {
        let scratch = try Scratch()
        let image = try buildImage(scratch) { t in
            try t.file("out/a-first", "written before the refusal\n")
            try t.file("out/node", "")
        }
        let surgery = try ImageSurgery(image)
        try patch(image, at: try surgery.inodeOffset(try surgery.inode("/out/node").number), le16(UInt16(mode)))
        let message = refusal(try extract(scratch, image))
        #expect(message.contains("artifact '/workspace/out/node' refused: it is a device node, FIFO or socket"), "\(what): \(message)")
        #expect(message.contains("nothing was kept in the output directory"))
    }

    @Test func setuidSetgidAndStickyBitsAreDropped() throws {
        let scratch = try Scratch()
        let image = try buildImage(scratch) { t in
            try t.file("out/suid", "x", mode: 0o4755)
            try t.file("out/sgid", "x", mode: 0o2711)
            try t.dir("out/shared", mode: 0o1777)
            try t.dir("out/group", mode: 0o2775)
        }
        let report = try extract(scratch, image).get()
        var info = stat()
        for (path, mode) in [("suid", 0o755), ("sgid", 0o711), ("shared", 0o777), ("group", 0o775)] {
            #expect(lstat(report.directory + "/" + path, &info) == 0 && Int(info.st_mode & 0o7777) == mode, "\(path)")
            #expect(report.artifacts.first { $0.path == path }?.mode == UInt16(mode))
        }
        #expect(report.notes.count == 4)
        #expect(report.notes.contains("'suid': setuid dropped (mode 4755 written as 755)"), "\(report.notes)")
        #expect(report.notes.contains("'shared': sticky dropped (mode 1777 written as 777)"))
    }

    /// A directory that claims a million entries, all naming one empty file: the
    /// count limit stops the walk after the limit's worth, fast, and nothing stays.
    @Test func aMillionEmptyFilesAreRefusedAtTheLimit() throws {
        let scratch = try Scratch()
        let perBlock = 256  // 16-byte entries with 8-byte names
        let blocks = (1_000_000 + perBlock - 1) / perBlock
        let image = try buildImage(scratch, { t in
            try t.file("out/empty", "")
            try t.file("out/million", [UInt8](repeating: 0x5A, count: blocks * 4096))
        }, extra: 4 << 20)
        let surgery = try ImageSurgery(image)
        let empty = try surgery.inode("/out/empty").number
        let million = try surgery.inode("/out/million")
        var index = 0
        let hex = Array("0123456789abcdef".utf8)
        for run in try surgery.runs(million) {
            // Entry i: inode, rec_len 16, name_len 8, type 1 (regular), 8 hex digits of i.
            var bytes = [UInt8](repeating: 0, count: Int(run.count) * 4096)
            for slot in 0..<(Int(run.count) * perBlock) {
                let o = slot * 16
                for k in 0..<4 { bytes[o + k] = UInt8(truncatingIfNeeded: empty >> (8 * k)) }
                bytes[o + 4] = 16
                bytes[o + 6] = 8
                bytes[o + 7] = 1
                for k in 0..<8 { bytes[o + 8 + k] = hex[(index >> (4 * (7 - k))) & 0xF] }
                index += 1
            }
            try patch(image, at: run.physical * 4096, bytes)
        }
        #expect(index >= 1_000_000)
        try patch(image, at: try surgery.inodeOffset(million.number), le16(0o040755))  // now a directory

        // With a limit high enough the crafted directory really does list its million names.
        let reader = TreeReader(try Ext4Image(path: image), limits: .init(directoryEntries: 2_000_000), purpose: "count")
        var listed = 0
        try reader.forEachEntry(of: try #require(try reader.node(at: "/out/million"))) { _ in listed += 1; return true }
        #expect(listed == index)

        let started = ContinuousClock.now
        let message = refusal(try extract(scratch, image))
        #expect(message.contains("more than 10000 entries under /workspace/out (the limit; raise it with --max-artifacts)"), "\(message)")
        #expect(ContinuousClock.now - started < .seconds(10))
    }

    @Test func oneFileOverTheSizeLimitIsRefused() throws {
        let scratch = try Scratch()
        let image = try buildImage(scratch) { t in
            try t.file("out/small", pattern(100_000))
            try t.file("out/big", pattern(3 << 20))
        }
        let message = refusal(try extract(scratch, image, limits: ArtifactLimits(maxBytes: 2 << 20)))
        #expect(message.contains("artifact '/workspace/out/big' refused: its 3145728 bytes take the artifacts past the 2097152-byte limit"), "\(message)")
        // A file that only claims to be huge (a sparse size) counts at its claimed size.
        let surgery = try ImageSurgery(image)
        let small = try surgery.inodeOffset(try surgery.inode("/out/small").number)
        try patch(image, at: small + 0x6C, le32(256))  // size_high: 2^40 bytes more
        let sparse = refusal(try extract(scratch, image))
        #expect(sparse.contains("artifact '/workspace/out/small' refused: its 1099511727776 bytes"), "\(sparse)")
        // And the entry limit counts directories and links too.
        let few = refusal(try extract(scratch, copy(image, scratch, "few"), limits: ArtifactLimits(maxEntries: 1)))
        #expect(few.contains("more than 1 entries"), "\(few)")
    }

    @Test func directoryLoopsAndDeepTreesAreRefused() throws {
        let scratch = try Scratch()
        let image = try buildImage(scratch) { t in try t.dir("out/sub/loop") }
        let surgery = try ImageSurgery(image)
        let out = try surgery.inode("/out").number
        try patch(image, at: try surgery.direntOffset("/out/sub", "loop"), le32(out))
        let loop = refusal(try extract(scratch, image))
        #expect(loop.contains("artifact '/workspace/out/sub/loop' refused: it is a directory already seen elsewhere"), "\(loop)")

        let deep = try buildImage(scratch) { t in
            try t.dir("out/" + Array(repeating: "d", count: ArtifactExtractor.maxDepth + 1).joined(separator: "/"))
        }
        let message = refusal(try extract(scratch, deep))
        #expect(message.contains("nested more than 128 directories deep"), "\(message)")
    }

    @Test func namesThatAreNotUTF8AreRefused() throws {
        let scratch = try Scratch()
        let image = try buildImage(scratch) { t in
            try t.dir("out")
            let name: [CChar] = Array((t.root + "/out/").utf8CString.dropLast()) + [0x66, -1, 0]
            let fd = open(name, O_CREAT | O_WRONLY, 0o644)
            guard fd >= 0 else { throw TestError("cannot create a non-UTF-8 name") }
            close(fd)
        }
        let message = refusal(try extract(scratch, image))
        #expect(message.contains("its name is not valid UTF-8"), "\(message)")
    }

    @Test func aBrokenImageIsReportedNotTrusted() throws {
        let scratch = try Scratch()
        let image = try buildImage(scratch) { t in try t.file("out/big", pattern(200_000)) }
        let surgery = try ImageSurgery(image)
        let big = try surgery.inodeOffset(try surgery.inode("/out/big").number)
        try patch(image, at: big + 0x28 + 12 + 8, le32(0x7FFF_FFFF))  // the extent points past the end
        let message = refusal(try extract(scratch, image))
        #expect(message.contains("cannot be read from the workspace image the guest wrote") && message.contains("outside the filesystem"), "\(message)")
        #expect(!message.contains("make images"), "the advice is not the root filesystem's")

        try patch(image, at: 1024 + 0x38, le16(0))  // no superblock magic
        let gone = refusal(try extract(scratch, image))
        #expect(gone.contains("is not an ext2/3/4 image"), "\(gone)")
    }

    /// Seeded random corruption of the workspace image's metadata; every round
    /// must give a report or a WorkspaceError, and `extract` checks that nothing
    /// special, privileged or outside the output came of it.
    @Test func randomCorruptionNeverEscapes() throws {
        let scratch = try Scratch()
        let image = try buildImage(scratch) { t in
            try t.file("out/bin/tool", pattern(40_000, seed: 2), mode: 0o755)
            try t.file("out/notes.txt", "notes\n")
            for i in 0..<40 { try t.file("out/many/f\(i)", pattern(i * 100, seed: UInt8(i))) }
            try t.symlink("out/link", to: "bin/tool")
            try t.dir("out/deep/a/b/c")
        }
        let surgery = try ImageSurgery(image)
        var targets: [Range<UInt64>] = [1024..<2048, 4096..<8192]
        for path in ["/out", "/out/bin", "/out/bin/tool", "/out/many", "/out/many/f3", "/out/link", "/out/deep/a"] {
            let node = try surgery.inode(path)
            let at = try surgery.inodeOffset(node.number)
            targets.append(at..<(at + 160))
            // (A fast symlink keeps its target where the block map would be.)
            for run in try (node.type == .symlink ? [] : surgery.runs(node)).prefix(2) { targets.append(run.physical * 4096..<(run.physical * 4096 + 4096)) }
        }
        let fd = open(image, O_RDWR)
        try #require(fd >= 0)
        defer { close(fd) }
        var random = SplitMix64(seed: 0xA27_1FAC7)
        var reports = 0, refusals = 0
        for _ in 0..<150 {
            var saved: [(UInt64, UInt8)] = []
            for _ in 0..<(1 + random.below(8)) {
                let range = targets[random.below(targets.count)]
                let offset = range.lowerBound + UInt64(random.below(Int(range.upperBound - range.lowerBound)))
                var byte: UInt8 = 0
                pread(fd, &byte, 1, off_t(offset))
                saved.append((offset, byte))
                var new: UInt8 = random.below(3) == 0 ? byte ^ (1 << UInt8(random.below(8))) : UInt8(truncatingIfNeeded: random.next())
                pwrite(fd, &new, 1, off_t(offset))
            }
            switch try extract(scratch, image, limits: ArtifactLimits(maxEntries: 500, maxBytes: 16 << 20)) {
            case .success: reports += 1
            case .failure: refusals += 1
            }
            for (offset, byte) in saved.reversed() {
                var old = byte
                pwrite(fd, &old, 1, off_t(offset))
            }
        }
        #expect(reports > 0 && refusals > 0, "\(reports) reports, \(refusals) refusals")
    }

    func copy(_ image: String, _ scratch: Scratch, _ name: String) throws -> String {
        let path = scratch.path(name + ".ext4")
        try FileManager.default.copyItem(atPath: image, toPath: path)
        return path
    }
}

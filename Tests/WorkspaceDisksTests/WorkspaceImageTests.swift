import Foundation
import Testing
@testable import RootFS
@testable import WorkspaceDisks

/// A host directory made into the image a guest works in.
@Suite struct WorkspaceImageTests {
    static func stageProject(_ tree: Tree) throws {
        try tree.file("Makefile", "all:\n\tcc -o hello hello.c\n")
        try tree.file("hello.c", "int main(void) { return 0; }\n", mode: 0o640)
        try tree.file("run.sh", "#!/bin/sh\necho run\n", mode: 0o755)
        try tree.file("data/blob.bin", pattern(300_000, seed: 4), mode: 0o600)
        try tree.sparse("data/sparse.img", size: 64 << 20, data: [(0, pattern(5000, seed: 1)), (40 << 20, pattern(100, seed: 2))])
        try tree.dir("empty", mode: 0o700)
        try tree.symlink("link", to: "data/blob.bin")
        try tree.symlink("outside", to: "/etc/passwd")
    }

    @Test func theImageHoldsTheTreeWithModesLinksAndHoles() throws {
        let scratch = try Scratch()
        let tree = try Tree(scratch.path("src"))
        try Self.stageProject(tree)
        let before = try listHost(tree.root)
        let image = scratch.path("ws.ext4")
        let built = try WorkspaceImage.build(from: tree.root, extraBytes: 32 << 20, into: image)

        #expect(built.entries == 9)
        #expect(built.bytes >= built.contentBytes + (32 << 20) && built.bytes % (1 << 20) == 0)
        #expect(built.contentBytes < 1 << 20, "the 64 MiB sparse file counts its 2 stored blocks, not its size")
        var info = stat()
        #expect(stat(image, &info) == 0 && UInt64(info.st_size) == built.bytes)
        #expect(UInt64(info.st_blocks) * 512 < 4 << 20, "the image is sparse: \(info.st_blocks * 512) bytes stored")
        #expect(info.st_mode & 0o777 == 0o600, "the image is private to its user")

        let fs = try Ext4Image(path: image)
        #expect(try fs.readFile("/Makefile", limit: 1 << 20) == Array("all:\n\tcc -o hello hello.c\n".utf8))
        #expect(try fs.lookup("/hello.c")?.permissions == 0o640)
        #expect(try fs.lookup("/run.sh")?.isExecutable == true)
        #expect(try fs.lookup("/empty")?.permissions == 0o700)
        #expect(try fs.readFile("/data/blob.bin", limit: 1 << 20) == pattern(300_000, seed: 4))
        #expect(try fs.lookup("/link", followFinalSymlink: false)?.type == .symlink)
        #expect(try fs.lookup("/outside", followFinalSymlink: false)?.type == .symlink)
        let sparse = try #require(try fs.lookup("/data/sparse.img"))
        #expect(sparse.size == 64 << 20)
        // The guest has the free room asked for: the superblock's free blocks.
        let sb = try readBytes(image, at: 1024, count: 1024)
        let freeBlocks = UInt64(sb.le32(0x0C)) | UInt64(sb.le32(0x158)) << 32
        #expect(freeBlocks * 4096 >= 32 << 20 && freeBlocks * 4096 <= 36 << 20, "about the room asked for: \(freeBlocks) free blocks")
        let freeInodes = Int(sb.le32(0x10))
        #expect(freeInodes >= 1024)

        // The host directory was only read.
        let after = try listHost(tree.root)
        #expect(Set(before.keys) == Set(after.keys))
        for (path, a) in before {
            let b = after[path]!
            #expect(a.st_mtim.tv_sec == b.st_mtim.tv_sec && a.st_mtim.tv_nsec == b.st_mtim.tv_nsec && a.st_size == b.st_size
                    && a.st_mode == b.st_mode && a.st_ino == b.st_ino, "\(path) changed")
        }
    }

    @Test func manySmallFilesGetInodesToSpare() throws {
        let scratch = try Scratch()
        let tree = try Tree(scratch.path("src"))
        for i in 0..<3000 { try tree.file("d\(i % 30)/f\(i)", "") }
        let built = try WorkspaceImage.build(from: tree.root, extraBytes: 0, into: scratch.path("ws.ext4"))
        #expect(built.entries == 3030)
        #expect(built.inodes >= 3030 + 1024)
        #expect(try Ext4Image(path: built.path).lookup("/d29/f2999")?.type == .regular)
    }

    @Test func badInputIsRefusedWithWhatToDo() throws {
        let scratch = try Scratch()
        let tree = try Tree(scratch.path("src"))
        try tree.file("file", "x")
        let cases: [(String, String)] = [
            (scratch.path("missing"), "cannot be read"),
            (scratch.path("src/file"), "is not a directory"),
        ]
        for (directory, text) in cases {
            let error = workspaceError { () throws(WorkspaceError) in _ = try WorkspaceImage.build(from: directory, into: scratch.path("x.ext4")) }
            #expect(error?.description.contains(text) == true && error?.description.contains(directory) == true, "\(String(describing: error))")
        }
        // The image must be new: an existing file is never overwritten.
        let existing = scratch.path("exists.ext4")
        _ = FileManager.default.createFile(atPath: existing, contents: Data("keep".utf8))
        let error = workspaceError { () throws(WorkspaceError) in _ = try WorkspaceImage.build(from: tree.root, into: existing) }
        #expect(error?.description.contains("cannot create workspace image") == true)
        #expect(try String(contentsOfFile: existing, encoding: .utf8) == "keep")
        // mke2fs's own refusal comes back with its words: too little room for the contents.
        try tree.file("big", pattern(4 << 20))
        let tooBig = workspaceError { () throws(WorkspaceError) in
            _ = try WorkspaceImage.build(from: tree.root, extraBytes: 1 << 45, into: scratch.path("huge.ext4"))
        }
        #expect(tooBig?.description.contains("more than 16 TiB") == true)
        #expect(!FileManager.default.fileExists(atPath: scratch.path("huge.ext4")))
    }
}

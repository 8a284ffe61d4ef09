import Foundation
import Testing
@testable import RootFS
@testable import WorkspaceDisks

/// SHA-256 of a host file, by the same code path as a digest of a buffer.
func sha256(ofFile path: String) throws -> String {
    let data = try Data(contentsOf: URL(fileURLWithPath: path))
    let digest = SHA256Digest()
    data.withUnsafeBytes { digest.update($0) }
    return digest.finish()!
}

/// Artifacts from images an honest guest would leave.
@Suite struct ArtifactExtractorTests {
    @Test func sha256MatchesTheStandardVectors() {
        func digest(_ text: String) -> String? {
            let d = SHA256Digest()
            Array(text.utf8).withUnsafeBytes { d.update($0) }
            return d.finish()
        }
        #expect(digest("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        let zeros = SHA256Digest()
        zeros.updateZeros(1 << 20)
        let plain = SHA256Digest()
        [UInt8](repeating: 0, count: 1 << 20).withUnsafeBytes { plain.update($0) }
        #expect(zeros.finish() == plain.finish())
    }

    @Test func aBuildsOutputComesBackByteForByte() throws {
        let scratch = try Scratch()
        let image = try buildImage(scratch) { t in
            try t.file("src/main.c", "int main(void){return 0;}\n")
            try t.file("out/bin/hello", pattern(1_234_567, seed: 3), mode: 0o755)
            try t.file("out/lib/libx.a", pattern(70_000, seed: 5), mode: 0o644)
            try t.file("out/empty", "")
            try t.file("out/secret", "private\n", mode: 0o600)
            try t.file("out/readonly", "ro\n", mode: 0o444)
            try t.sparse("out/sparse.bin", size: 5 << 20, data: [(1 << 20, pattern(4096, seed: 9))])
            try t.symlink("out/bin/hi", to: "hello")
            try t.dir("out/share/doc", mode: 0o755)
            try t.dir("out/locked", mode: 0o500)
        }
        let output = scratch.path("result")
        let report = try ArtifactExtractor.extract(image: image, guestDirectory: "/out", displayPrefix: "/workspace/out", into: output)

        #expect(report.directory == output)
        #expect(report.notes.isEmpty, "\(report.notes)")
        let byPath = Dictionary(uniqueKeysWithValues: report.artifacts.map { ($0.path, $0) })
        #expect(Set(byPath.keys) == ["bin", "bin/hello", "bin/hi", "lib", "lib/libx.a", "empty", "secret", "readonly", "sparse.bin",
                                     "share", "share/doc", "locked"])
        #expect(report.artifacts.map(\.path) == report.artifacts.map(\.path).sorted())

        #expect(try Array(Data(contentsOf: URL(fileURLWithPath: output + "/bin/hello"))) == pattern(1_234_567, seed: 3))
        #expect(try Array(Data(contentsOf: URL(fileURLWithPath: output + "/lib/libx.a"))) == pattern(70_000, seed: 5))
        var sparse = [UInt8](repeating: 0, count: 5 << 20)
        sparse.replaceSubrange((1 << 20)..<((1 << 20) + 4096), with: pattern(4096, seed: 9))
        #expect(try Array(Data(contentsOf: URL(fileURLWithPath: output + "/sparse.bin"))) == sparse)
        var info = stat()
        #expect(stat(output + "/sparse.bin", &info) == 0 && info.st_blocks * 512 < 1 << 20, "holes stay holes")
        for (path, artifact) in byPath where artifact.kind == .file {
            #expect(artifact.sha256 == (try sha256(ofFile: output + "/" + path)), "\(path)")
            #expect(stat(output + "/" + path, &info) == 0 && UInt64(info.st_size) == artifact.size)
        }
        #expect(byPath["bin/hello"]?.size == 1_234_567 && byPath["empty"]?.sha256 == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(report.totalBytes == 1_234_567 + 70_000 + 8 + 3 + (5 << 20))

        // Modes as the guest left them; the link is a link.
        for (path, mode) in [("bin/hello", 0o755), ("secret", 0o600), ("readonly", 0o444), ("locked", 0o500), ("share/doc", 0o755)] {
            #expect(lstat(output + "/" + path, &info) == 0 && Int(info.st_mode & 0o7777) == mode, "\(path): \(String(info.st_mode & 0o7777, radix: 8))")
        }
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: output + "/bin/hi") == "hello")
        #expect(byPath["bin/hi"]?.kind == .symlink && byPath["bin/hi"]?.linkTarget == "hello" && byPath["bin/hi"]?.sha256 == nil)
        // Only the artifacts directory came out: not src/, not the image's lost+found.
        #expect(!FileManager.default.fileExists(atPath: output + "/src") && !FileManager.default.fileExists(atPath: output + "/main.c"))
    }

    @Test func anEmptyExistingOutputDirectoryIsFilledAndAMissingArtifactsDirectoryIsANote() throws {
        let scratch = try Scratch()
        let image = try buildImage(scratch) { t in try t.file("out/a", "a") }
        let output = scratch.path("existing")
        try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: false)
        try FileManager.default.setAttributes([.posixPermissions: 0o700], ofItemAtPath: output)
        // The caller's own path may go through a link.
        try FileManager.default.createSymbolicLink(atPath: scratch.path("via-link"), withDestinationPath: output)
        let report = try ArtifactExtractor.extract(image: image, guestDirectory: "/out", into: scratch.path("via-link"))
        #expect(report.artifacts.map(\.path) == ["a"])
        #expect(try String(contentsOfFile: output + "/a", encoding: .utf8) == "a")
        var info = stat()
        #expect(stat(output, &info) == 0 && info.st_mode & 0o777 == 0o700, "an existing output directory keeps its mode")

        let none = try ArtifactExtractor.extract(image: image, guestDirectory: "/nothing/here", displayPrefix: "/workspace/nothing/here",
                                                 into: scratch.path("none"))
        #expect(none.artifacts.isEmpty && none.notes == ["/workspace/nothing/here does not exist in the workspace after the run: no artifacts"])
        #expect(try FileManager.default.contentsOfDirectory(atPath: scratch.path("none")).isEmpty)
    }

    @Test func theOutputMustBeNewOrEmpty() throws {
        let scratch = try Scratch()
        let image = try buildImage(scratch) { t in try t.file("out/a", "a") }
        let full = scratch.path("full")
        try FileManager.default.createDirectory(atPath: full, withIntermediateDirectories: false)
        _ = FileManager.default.createFile(atPath: full + "/keep", contents: Data("mine".utf8))
        _ = FileManager.default.createFile(atPath: scratch.path("plain"), contents: Data())
        let cases: [(String, String)] = [
            (full, "is not empty"),
            (scratch.path("plain"), "is not a directory"),
            (scratch.path("no/such/parent"), "is not an existing directory"),
        ]
        for (output, text) in cases {
            let error = workspaceError { () throws(WorkspaceError) in _ = try ArtifactExtractor.extract(image: image, guestDirectory: "/out", into: output) }
            #expect(error?.description.contains(text) == true && error?.description.contains(output) == true, "\(String(describing: error))")
            #expect((try? ArtifactExtractor.checkOutput(output)) == nil)
        }
        #expect(try String(contentsOfFile: full + "/keep", encoding: .utf8) == "mine")
        #expect(!FileManager.default.fileExists(atPath: scratch.path("no")))
        try ArtifactExtractor.checkOutput(scratch.path("new"))
        #expect(!FileManager.default.fileExists(atPath: scratch.path("new")), "checking creates nothing")
    }

    @Test func theArtifactsPathMustBeADirectoryNotALinkOrFile() throws {
        let scratch = try Scratch()
        let image = try buildImage(scratch) { t in
            try t.file("file", "x")
            try t.file("real/a", "a")
            try t.symlink("out", to: "real")
        }
        for (guest, text) in [("/file", "is a regular file"), ("/out", "is a symbolic link")] {
            let output = scratch.path("o\(guest.count)")
            let error = workspaceError { () throws(WorkspaceError) in _ = try ArtifactExtractor.extract(image: image, guestDirectory: guest, into: output) }
            #expect(error?.description.contains(text) == true, "\(String(describing: error))")
            #expect(!FileManager.default.fileExists(atPath: output))
        }
    }
}

import Foundation
import Testing
@testable import RootFS
@testable import WorkspaceDisks

/// A scratch directory removed when the owner goes away.
final class Scratch {
    let root: String

    init() throws {
        root = NSTemporaryDirectory() + "airlock-workspace-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
    }

    deinit {
        // Extracted directories may have lost their write bits.
        _ = try? Process.run(URL(fileURLWithPath: "/bin/chmod"), arguments: ["-R", "u+rwx", root]).waitUntilExit()
        try? FileManager.default.removeItem(atPath: root)
    }

    func path(_ relative: String) -> String { root + "/" + relative }
}

struct TestError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Writes files into a staging tree.
struct Tree {
    let root: String

    init(_ root: String) throws {
        self.root = root
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
    }

    func dir(_ path: String, mode: Int = 0o755) throws {
        try FileManager.default.createDirectory(atPath: root + "/" + path, withIntermediateDirectories: true)
        try chmod(path, mode)
    }

    func file(_ path: String, _ bytes: [UInt8], mode: Int = 0o644) throws {
        let full = root + "/" + path
        try FileManager.default.createDirectory(atPath: (full as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        guard FileManager.default.createFile(atPath: full, contents: Data(bytes)) else { throw TestError("cannot create \(full)") }
        try chmod(path, mode)
    }

    func file(_ path: String, _ text: String, mode: Int = 0o644) throws { try file(path, Array(text.utf8), mode: mode) }

    func sparse(_ path: String, size: UInt64, data: [(UInt64, [UInt8])]) throws {
        let full = root + "/" + path
        guard FileManager.default.createFile(atPath: full, contents: nil) else { throw TestError("cannot create \(full)") }
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: full))
        defer { try? handle.close() }
        for (offset, bytes) in data {
            try handle.seek(toOffset: offset)
            try handle.write(contentsOf: Data(bytes))
        }
        try handle.truncate(atOffset: size)
    }

    func symlink(_ path: String, to target: String) throws {
        let full = root + "/" + path
        try FileManager.default.createDirectory(atPath: (full as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: root + "/" + path, withDestinationPath: target)
    }

    func chmod(_ path: String, _ mode: Int) throws {
        guard Glibc.chmod(root + "/" + path, mode_t(mode)) == 0 else { throw TestError("chmod \(path)") }
    }
}

/// Deterministic bytes that differ per offset and seed.
func pattern(_ count: Int, seed: UInt8 = 0) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ ($0 >> 9) &+ Int(seed) &* 7) | 1 }
}

func le16(_ v: UInt16) -> [UInt8] { [UInt8(truncatingIfNeeded: v), UInt8(truncatingIfNeeded: v >> 8)] }
func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }

/// Writes `bytes` at `offset` of the file at `path`.
func patch(_ path: String, at offset: UInt64, _ bytes: [UInt8]) throws {
    let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
    defer { try? handle.close() }
    try handle.seek(toOffset: offset)
    try handle.write(contentsOf: Data(bytes))
}

func readBytes(_ path: String, at offset: UInt64, count: Int) throws -> [UInt8] {
    let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
    defer { try? handle.close() }
    try handle.seek(toOffset: offset)
    return Array(try handle.read(upToCount: count) ?? Data())
}

/// On-disk places in an image, for editing it into a hostile one.
struct ImageSurgery {
    let path: String
    let image: Ext4Image

    init(_ path: String) throws {
        self.path = path
        image = try Ext4Image(path: path)
    }

    func budget() -> Budget { Budget(limits: .default, image: path, path: "(surgery)") }

    func inode(_ guestPath: String) throws -> Inode {
        guard let node = try image.resolve(guestPath, followFinalSymlink: false, budget: budget()) else {
            throw TestError("\(guestPath) is not in the image")
        }
        return node
    }

    /// Byte offset of an inode in the image file.
    func inodeOffset(_ number: UInt32) throws -> UInt64 {
        let g = image.geometry
        let index = UInt64(number - 1)
        let table = try image.inodeTable(group: index / g.inodesPerGroup, budget: budget())
        return table * g.blockSize + (index % g.inodesPerGroup) * g.inodeSize
    }

    /// The data runs of an inode.
    func runs(_ node: Inode) throws -> [Run] {
        var result: [Run] = []
        try image.forEachRun(of: node, blocks: 0..<image.blockCount(forSize: node.size), budget: budget()) { run in
            result.append(run)
            return true
        }
        return result
    }

    /// Byte offset in the image file of the directory entry `name` in `directory`.
    func direntOffset(_ directory: String, _ name: String) throws -> UInt64 {
        let dir = try inode(directory)
        let bs = image.geometry.blockSize
        for run in try runs(dir) {
            for k in 0..<run.count {
                let at = (run.physical + k) * bs
                let block = try readBytes(path, at: at, count: Int(bs))
                var offset = 0
                while offset + 8 <= block.count {
                    let length = Int(block.le16(offset + 4))
                    let nameLength = Int(block[offset + 6])
                    if block.le32(offset) != 0, Array(block[(offset + 8)..<(offset + 8 + nameLength)]) == Array(name.utf8) {
                        return at + UInt64(offset)
                    }
                    guard length >= 12 else { break }
                    offset += length
                }
            }
        }
        throw TestError("no entry '\(name)' in \(directory)")
    }
}

/// An image built from `tree` the way a run builds its workspace.
func buildImage(_ scratch: Scratch, _ stage: (Tree) throws -> Void, extra: UInt64 = 8 << 20) throws -> String {
    let tree = try Tree(scratch.path("stage-\(UUID().uuidString)"))
    try stage(tree)
    let image = scratch.path("ws-\(UUID().uuidString).ext4")
    _ = try WorkspaceImage.build(from: tree.root, extraBytes: extra, into: image)
    return image
}

/// Runs `body`, which must throw a WorkspaceError, and returns it.
func workspaceError(sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws(WorkspaceError) -> Void) -> WorkspaceError? {
    do {
        try body()
        Issue.record("expected a WorkspaceError, got success", sourceLocation: sourceLocation)
        return nil
    } catch {
        return error
    }
}

/// Every path under `root` with lstat's view of it (links not followed).
func listHost(_ root: String) throws -> [String: stat] {
    var found: [String: stat] = [:]
    guard let enumerator = FileManager.default.enumerator(atPath: root) else { return found }
    while let relative = enumerator.nextObject() as? String {
        var info = stat()
        guard lstat(root + "/" + relative, &info) == 0 else { throw TestError("lstat \(relative)") }
        found[relative] = info
    }
    return found
}

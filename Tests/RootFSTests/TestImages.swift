import Foundation
import Testing
@testable import RootFS

/// A scratch directory removed when the owner goes away.
final class Scratch {
    let root: String

    init() throws {
        root = NSTemporaryDirectory() + "airlock-rootfs-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: root) }

    func path(_ relative: String) -> String { root + "/" + relative }
}

/// Builds a directory tree for `mke2fs -d`.
struct Stage {
    let root: String

    init(_ root: String) throws {
        self.root = root
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
    }

    func dir(_ path: String, mode: Int = 0o755, owner: (Int, Int)? = nil) throws {
        let full = root + path
        try FileManager.default.createDirectory(atPath: full, withIntermediateDirectories: true)
        try set(full, mode: mode, owner: owner)
    }

    func file(_ path: String, _ contents: [UInt8], mode: Int = 0o644, owner: (Int, Int)? = nil) throws {
        let full = root + path
        try FileManager.default.createDirectory(atPath: (full as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        guard FileManager.default.createFile(atPath: full, contents: Data(contents)) else { throw StageError("cannot create \(full)") }
        try set(full, mode: mode, owner: owner)
    }

    func file(_ path: String, _ text: String, mode: Int = 0o644, owner: (Int, Int)? = nil) throws {
        try file(path, Array(text.utf8), mode: mode, owner: owner)
    }

    /// A file of `size` bytes that is a hole except for `chunks` (offset, bytes).
    func sparseFile(_ path: String, size: UInt64, chunks: [(UInt64, [UInt8])]) throws {
        let full = root + path
        guard FileManager.default.createFile(atPath: full, contents: nil) else { throw StageError("cannot create \(full)") }
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: full))
        defer { try? handle.close() }
        for (offset, bytes) in chunks {
            try handle.seek(toOffset: offset)
            try handle.write(contentsOf: Data(bytes))
        }
        try handle.truncate(atOffset: size)
    }

    func symlink(_ path: String, to target: String) throws {
        let full = root + path
        try FileManager.default.createDirectory(atPath: (full as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: full, withDestinationPath: target)
    }

    func fifo(_ path: String) throws {
        guard mkfifo(root + path, 0o644) == 0 else { throw StageError("mkfifo \(path): errno \(errno)") }
    }

    private func set(_ full: String, mode: Int, owner: (Int, Int)?) throws {
        var attributes: [FileAttributeKey: Any] = [.posixPermissions: mode]
        if let owner {
            attributes[.ownerAccountID] = owner.0
            attributes[.groupOwnerAccountID] = owner.1
        }
        try FileManager.default.setAttributes(attributes, ofItemAtPath: full)
    }
}

struct StageError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Runs mke2fs; `arguments` go before the image path and size.
func mke2fs(_ arguments: [String], stage: String, image: String, size: String) throws {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = ["mke2fs", "-q", "-F"] + arguments + ["-E", "root_owner=0:0", "-d", stage, image, size]
    let errors = Pipe()
    process.standardError = errors
    process.standardOutput = FileHandle.nullDevice
    try process.run()
    let message = errors.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else {
        throw StageError("mke2fs \(arguments) failed: \(String(decoding: message, as: UTF8.self))")
    }
}

/// Runs `e2fsck -fyD`, which rebuilds every directory of more than one block
/// as an htree (mke2fs -d writes them linear). Exit 1 means "fixed something".
func indexDirectories(image: String) throws {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = ["e2fsck", "-fyD", image]
    process.standardOutput = FileHandle.nullDevice
    process.standardError = FileHandle.nullDevice
    try process.run()
    process.waitUntilExit()
    guard process.terminationStatus <= 1 else { throw StageError("e2fsck -fyD \(image) exited \(process.terminationStatus)") }
}

/// Deterministic bytes that differ per offset and per `seed`, so a block read
/// from the wrong place cannot compare equal.
func pattern(_ count: Int, seed: UInt8 = 0) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ ($0 >> 9) &+ Int(seed) &* 7) | 1 }
}

/// The filesystem layouts every behaviour test runs against.
enum Layout: String, CaseIterable, CustomTestStringConvertible, Sendable {
    case ext4 = "ext4, 4 KiB blocks, 64bit"
    case ext4Small32 = "ext4, 1 KiB blocks, ^64bit"
    case ext4Inline = "ext4, inline_data"
    case ext4MetaBG = "ext4, meta_bg, 64 groups"
    case ext4Huge = "ext4, 64 KiB blocks"
    case ext4Bigalloc = "ext4, bigalloc"
    case ext3 = "ext3, 1 KiB blocks"
    case ext2 = "ext2, 1 KiB blocks"
    case ext2Rev0 = "ext2, revision 0"

    var testDescription: String { rawValue }

    var arguments: [String] {
        switch self {
        case .ext4: return ["-t", "ext4", "-b", "4096"]
        case .ext4Small32: return ["-t", "ext4", "-b", "1024", "-O", "^64bit"]
        case .ext4Inline: return ["-t", "ext4", "-b", "4096", "-O", "inline_data"]
        // 16 descriptors per block and 64 groups: descriptors live in 4 meta groups.
        case .ext4MetaBG: return ["-t", "ext4", "-b", "1024", "-g", "256", "-N", "1024", "-O", "meta_bg,^resize_inode"]
        case .ext4Huge: return ["-t", "ext4", "-b", "65536", "-N", "1024", "-O", "^has_journal"]
        case .ext4Bigalloc: return ["-t", "ext4", "-b", "1024", "-C", "16384", "-O", "bigalloc"]
        case .ext3: return ["-t", "ext3", "-b", "1024"]
        case .ext2: return ["-t", "ext2", "-b", "1024"]
        case .ext2Rev0: return ["-t", "ext2", "-b", "1024", "-r", "0"]
        }
    }

    var size: String { self == .ext4Huge ? "48M" : "16M" }
    var usesExtents: Bool { ![.ext3, .ext2, .ext2Rev0].contains(self) }
    var hasDirIndex: Bool { self != .ext2Rev0 }
}

/// The files every layout holds, and what the tests expect of them.
enum Tree {
    static let initBytes = Array("AIRLOCK-INIT\n".utf8) + pattern(3000, seed: 1)
    static let passwd = "root:x:0:0:root:/root:/bin/sh\nairlock:x:1000:1000::/home/airlock:/bin/sh\n"
    static let bigSize = 600_000  // > 268 KiB: needs a double indirect block at 1 KiB
    static let slowRelative = "../lib/./deep/../deep/nested/./dir/../dir/" + String(repeating: "./", count: 20) + "file.txt"
    static let slowAbsolute = "/usr/lib/deep/nested/dir/" + String(repeating: "./", count: 30) + "file.txt"
    static let bigEntries = 600
    /// Long names, so /big outgrows even one 64 KiB block and becomes an htree.
    static func bigEntry(_ i: Int) -> String { "entry-\(String(format: "%04d", i))-" + String(repeating: "x", count: 100) }
    // The sparse files end in data at a 64 KiB boundary: with inline_data,
    // mke2fs 1.47 drops a trailing hole and rounds the size up to a block.
    // tail-hole.bin covers trailing holes in the other layouts.
    /// 12 separate data chunks: more extents than fit in the inode, so an index node.
    static let holeChunks: [(UInt64, [UInt8])] = {
        var chunks: [(UInt64, [UInt8])] = []
        for i in 0..<12 { chunks.append((UInt64(i) * 262_144 + 1000, pattern(4096, seed: UInt8(i)))) }
        chunks.append((12 * 262_144 - 3000, pattern(3000, seed: 12)))
        return chunks
    }()
    static let holesSize: UInt64 = 12 * 262_144
    /// Past 64 MiB + 268 KiB: a triple indirect block at 1 KiB.
    static let sparseChunks: [(UInt64, [UInt8])] = [
        (0, pattern(5000, seed: 3)), (UInt64(5 << 20), pattern(5000, seed: 4)),
        (UInt64(65 << 20) + 123, pattern(5000, seed: 5)), (UInt64(66 << 20) - 100, pattern(100, seed: 6)),
    ]
    static let sparseSize: UInt64 = 66 << 20
    static let tailHoleData = pattern(10_000, seed: 7)
    static let tailHoleSize: UInt64 = 300_000
    static let symlinkChain = 40
    // mke2fs -d copies owners from the staging tree; only root can stage
    // other users' files, so elsewhere the files are the caller's.
    static let stagedOwner = (Int(geteuid()), Int(getegid()))
    static let homeOwner = geteuid() == 0 ? (1000, 1000) : stagedOwner
    static let profileOwner = geteuid() == 0 ? (1000, 1001) : stagedOwner

    static func build(in stage: Stage) throws {
        try stage.dir("/sbin")
        try stage.file("/sbin/airlock-init", initBytes, mode: 0o755)
        try stage.symlink("/sbin/init", to: "/sbin/airlock-init")
        try stage.file("/bin/busybox", pattern(100, seed: 2), mode: 0o755)
        try stage.symlink("/bin/sh", to: "busybox")
        try stage.file("/etc/passwd", passwd)
        try stage.file("/etc/notexec", "#!/bin/sh\necho\n", mode: 0o644)
        try stage.file("/etc/setuid", "x", mode: 0o4755)
        try stage.symlink("/etc/dirlink", to: "../usr/lib/deep")
        try stage.dir("/home/airlock", mode: 0o700, owner: homeOwner)
        try stage.file("/home/airlock/.profile", "PS1='$ '\n", mode: 0o600, owner: profileOwner)
        try stage.dir("/usr/lib/deep/nested/dir")
        try stage.file("/usr/lib/deep/nested/dir/file.txt", "deep file\n", mode: 0o640)
        try stage.file("/usr/lib/big.bin", pattern(bigSize, seed: 9))
        try stage.sparseFile("/usr/lib/holes.bin", size: holesSize, chunks: holeChunks)
        try stage.sparseFile("/usr/lib/sparse.bin", size: sparseSize, chunks: sparseChunks)
        try stage.sparseFile("/usr/lib/tail-hole.bin", size: tailHoleSize, chunks: [(0, tailHoleData)])
        try stage.symlink("/usr/bin/slow-rel", to: slowRelative)
        try stage.symlink("/usr/bin/slow-abs", to: slowAbsolute)
        try stage.symlink("/usr/bin/to-sbin", to: "../../sbin")
        try stage.symlink("/loop/a", to: "b")
        try stage.symlink("/loop/b", to: "/loop/a")
        try stage.symlink("/loop/self", to: "self")
        // chain0 -> chain1 -> ... -> chain40 -> /etc/passwd: chain1 takes 40 hops, chain0 41.
        for i in 0..<symlinkChain { try stage.symlink("/loop/chain\(i)", to: "chain\(i + 1)") }
        try stage.symlink("/loop/chain\(symlinkChain)", to: "/etc/passwd")
        try stage.symlink("/dangling", to: "/does/not/exist")
        try stage.fifo("/fifo")
        try stage.dir("/big")
        for i in 0..<bigEntries { try stage.file("/big/" + bigEntry(i), "") }
        try stage.file("/big/needle", "found\n", mode: 0o755)
        try stage.dir("/empty")
    }
}

/// Where the shared images live; removed when the test process exits.
let imageCacheRoot = NSTemporaryDirectory() + "airlock-rootfs-tests-\(getpid())"

/// Stages the tree once and builds each layout's image once per test process:
/// staging takes longer than mke2fs, and most tests only read.
final class ImageCache: @unchecked Sendable {
    // @unchecked: every field is touched only under `lock`.
    static let shared = ImageCache()
    private let lock = NSLock()
    private var stage: String?
    private var images: [Layout: String] = [:]

    private init() {
        atexit { try? FileManager.default.removeItem(atPath: imageCacheRoot) }
    }

    /// The staged tree every image was built from (read it only).
    func stageDirectory() throws -> String {
        lock.lock()
        defer { lock.unlock() }
        return try stagedLocked()
    }

    private func stagedLocked() throws -> String {
        if let existing = stage { return existing }
        let built = try Stage(imageCacheRoot + "/stage")
        try Tree.build(in: built)
        stage = built.root
        return built.root
    }

    func image(_ layout: Layout) throws -> String {
        lock.lock()
        defer { lock.unlock() }
        if let path = images[layout] { return path }
        let stage = try stagedLocked()
        let path = imageCacheRoot + "/\(layout).img"
        try mke2fs(layout.arguments, stage: stage, image: path, size: layout.size)
        try indexDirectories(image: path)
        images[layout] = path
        return path
    }
}

/// A built image: the shared one (read it only), or a private copy to edit.
struct TestImage {
    let scratch: Scratch
    let path: String
    let layout: Layout

    init(_ layout: Layout, privateCopy: Bool = false) throws {
        scratch = try Scratch()
        self.layout = layout
        let shared = try ImageCache.shared.image(layout)
        if privateCopy {
            path = scratch.path("rootfs.img")
            try FileManager.default.copyItem(atPath: shared, toPath: path)
        } else {
            path = shared
        }
    }

    func open(limits: Ext4Image.Limits = .default) throws -> Ext4Image { try Ext4Image(path: path, limits: limits) }

    var bytes: [UInt8] { get throws { Array(try Data(contentsOf: URL(fileURLWithPath: path))) } }
}

/// Runs `body`, which must throw a RootFSError, and returns it.
func rootFSError(sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws(RootFSError) -> Void) -> RootFSError? {
    do {
        try body()
        Issue.record("expected a RootFSError, got success", sourceLocation: sourceLocation)
        return nil
    } catch {
        return error
    }
}

/// The resolved inode, for tests that look at on-disk details.
func inode(_ image: Ext4Image, _ path: String) throws -> Inode? {
    try image.resolve(path, followFinalSymlink: false, budget: Budget(limits: image.limits, image: image.path, path: path))
}

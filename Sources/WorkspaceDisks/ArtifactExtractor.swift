import RootFS
#if canImport(Glibc)
import Glibc
#endif

/// Bounds on what one run may bring back.
public struct ArtifactLimits: Sendable, Codable, Equatable {
    /// Entries (files, directories and links) under the artifacts directory.
    public var maxEntries: Int
    /// Bytes of file contents, counted at their apparent size (a sparse file counts whole).
    public var maxBytes: UInt64

    public static let defaultMaxEntries = 10_000
    public static let defaultMaxBytes: UInt64 = 1 << 30

    public init(maxEntries: Int = defaultMaxEntries, maxBytes: UInt64 = defaultMaxBytes) {
        self.maxEntries = maxEntries
        self.maxBytes = maxBytes
    }
}

/// One thing that came back.
public struct Artifact: Sendable, Codable, Equatable {
    public enum Kind: String, Sendable, Codable { case file, directory, symlink }
    /// Relative to the output directory, '/'-separated ("bin/hello").
    public var path: String
    public var kind: Kind
    /// Bytes of a file; the target's length for a link; 0 for a directory.
    public var size: UInt64
    /// Lower-case hex SHA-256 of a file's contents; nil for directories and links.
    public var sha256: String?
    /// Where a link points, as written (never followed).
    public var linkTarget: String?
    /// Permission bits as written on the host (setuid, setgid and sticky never are).
    public var mode: UInt16

    public init(path: String, kind: Kind, size: UInt64, sha256: String? = nil, linkTarget: String? = nil, mode: UInt16) {
        self.path = path
        self.kind = kind
        self.size = size
        self.sha256 = sha256
        self.linkTarget = linkTarget
        self.mode = mode
    }
}

/// What an extraction wrote, and what it changed on the way.
public struct ArtifactReport: Sendable, Codable, Equatable {
    /// The host directory the artifacts are in.
    public var directory: String
    /// Every entry, sorted by path.
    public var artifacts: [Artifact]
    /// Bytes of file contents written.
    public var totalBytes: UInt64
    /// Things neutralised on the way (bits dropped, links that point outside).
    public var notes: [String]

    public init(directory: String, artifacts: [Artifact] = [], totalBytes: UInt64 = 0, notes: [String] = []) {
        self.directory = directory
        self.artifacts = artifacts
        self.totalBytes = totalBytes
        self.notes = notes
    }
}

/// Copies the files a guest left under a directory of its workspace image
/// into a host directory, treating the image as hostile: it was written by
/// the code under test, which may have crafted any byte of it.
///
/// What comes back is regular files, directories and symbolic links only.
/// Files get their permission bits without setuid, setgid and sticky; owners
/// and times are the host's (the extracting user, now). Links are recreated
/// as links and never followed, by this code or through it: every file is
/// created with openat in a directory this code created itself, with
/// O_EXCL|O_NOFOLLOW. A device node, FIFO or socket, a name that is not a
/// plain file name (a '/' inside it, empty, not UTF-8), a name seen twice, a
/// directory reached twice (a loop), a tree deeper than `maxDepth`, more than
/// `maxEntries` entries or `maxBytes` bytes refuse the whole extraction with
/// the offending entry named, and everything written so far is removed: the
/// output directory is left as it was found (absent, or empty).
public enum ArtifactExtractor {
    /// Nesting of directories under the artifacts directory.
    public static let maxDepth = 128
    /// Longest relative path brought back (Linux's PATH_MAX less the NUL).
    public static let maxPathBytes = 4095

    /// Extracts `guestDirectory` (an absolute path inside the image) into
    /// `output`, which must not exist or be an empty directory. A missing
    /// `guestDirectory` is no artifacts: an empty output directory and a note.
    public static func extract(image: String, guestDirectory: String, displayPrefix: String? = nil, into output: String,
                               limits: ArtifactLimits = ArtifactLimits()) throws(WorkspaceError) -> ArtifactReport {
        let target = try OutputDirectory.open(output)
        var extraction = Extraction(limits: limits, display: displayPrefix ?? guestDirectory, outputPath: output)
        do throws(WorkspaceError) {
            try extraction.run(image: image, guestDirectory: guestDirectory, into: target.fd, setRootMode: target.created)
            target.keep()
        } catch {
            target.discard()
            throw error
        }
        extraction.report.artifacts.sort { $0.path.utf8.lexicographicallyPrecedes($1.path.utf8) }
        return extraction.report
    }

    /// Checks, before a run, that `output` can take artifacts (absent or an empty
    /// directory, in a directory that exists), so that a build does not run for nothing.
    public static func checkOutput(_ output: String) throws(WorkspaceError) {
        var info = stat()
        // stat, not lstat: the output path is the caller's own, and may go through a link.
        if stat(output, &info) == 0 {
            guard info.st_mode & S_IFMT == S_IFDIR else {
                throw .invalid("output '\(output)' exists and is not a directory: give a new or empty directory")
            }
            guard try OutputDirectory.isEmpty(output) else {
                throw .invalid("output directory '\(output)' is not empty: give a new or empty directory (artifacts never overwrite files)")
            }
            return
        }
        let parent = output.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        let parentPath = parent.isEmpty ? (output.hasPrefix("/") ? "/" : ".") : parent
        guard stat(parentPath, &info) == 0, info.st_mode & S_IFMT == S_IFDIR else {
            throw .invalid("output '\(output)' cannot be created: '\(parentPath)' is not an existing directory")
        }
    }
}

/// The host side of one extraction: the output directory, and undoing it.
private final class OutputDirectory {
    let path: String
    let fd: Int32
    let created: Bool
    private var done = false

    private init(path: String, fd: Int32, created: Bool) {
        self.path = path
        self.fd = fd
        self.created = created
    }

    deinit { close(fd) }

    static func open(_ path: String) throws(WorkspaceError) -> OutputDirectory {
        try ArtifactExtractor.checkOutput(path)
        var created = false
        if mkdir(path, 0o755) == 0 {
            created = true
        } else if errno != EEXIST {
            throw .output("cannot create output directory '\(path)': \(String(cString: strerror(errno)))")
        }
        let fd = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = errno
            if created { rmdir(path) }
            throw .output("cannot open output directory '\(path)': \(String(cString: strerror(e)))")
        }
        let directory = OutputDirectory(path: path, fd: fd, created: created)
        // Checked again now that it is open: it must still be empty, so that everything
        // in it afterwards is this extraction's to remove on failure.
        guard (try? isEmpty(fd: fd)) == true else {
            throw .invalid("output directory '\(path)' is not empty: give a new or empty directory (artifacts never overwrite files)")
        }
        return directory
    }

    func keep() { done = true }

    /// Removes everything the extraction wrote, and the directory itself if it made it.
    func discard() {
        guard !done else { return }
        done = true
        Self.removeContents(of: fd)
        if created { rmdir(path) }
    }

    static func isEmpty(_ path: String) throws(WorkspaceError) -> Bool {
        let fd = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw .output("cannot open output directory '\(path)': \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        return try isEmpty(fd: fd)
    }

    static func isEmpty(fd: Int32) throws(WorkspaceError) -> Bool {
        let names = try list(fd)
        return names.isEmpty
    }

    /// Entry names of an open directory, without "." and "..".
    static func list(_ fd: Int32) throws(WorkspaceError) -> [String] {
        let copy = dup(fd)
        guard copy >= 0, let handle = fdopendir(copy) else { throw .system("fdopendir", errno: errno) }
        defer { closedir(handle) }
        rewinddir(handle)
        var names: [String] = []
        while let entry = readdir(handle) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    /// Removes a tree this extraction wrote: unlinkat never follows a link, and
    /// directories are opened with O_NOFOLLOW, so only what is inside goes.
    static func removeContents(of fd: Int32) {
        guard let names = try? list(fd) else { return }
        for name in names {
            if unlinkat(fd, name, 0) == 0 { continue }
            let child = openat(fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            if child >= 0 {
                // A directory left without write permission by its final mode.
                fchmod(child, 0o700)
                removeContents(of: child)
                close(child)
            }
            unlinkat(fd, name, AT_REMOVEDIR)
        }
    }
}

/// The walk itself: state shared by every directory of one extraction.
private struct Extraction {
    let limits: ArtifactLimits
    /// How entries are named in messages ("/workspace/out").
    let display: String
    let outputPath: String
    var report: ArtifactReport
    var entries = 0
    var bytes: UInt64 = 0
    var directories: Set<UInt32> = []
    var buffer = [UInt8]()

    init(limits: ArtifactLimits, display: String, outputPath: String) {
        self.limits = limits
        self.display = display
        self.outputPath = outputPath
        report = ArtifactReport(directory: outputPath)
    }

    /// `setRootMode`: the output directory was made here, so it takes the artifacts
    /// directory's mode (an existing one keeps its own).
    mutating func run(image path: String, guestDirectory: String, into root: Int32, setRootMode: Bool) throws(WorkspaceError) {
        guard limits.maxEntries >= 0 else { throw .invalid("the artifact entry limit \(limits.maxEntries) is negative") }
        let reader: TreeReader
        do {
            let image = try Ext4Image(path: path)
            // The reader's own budget follows the caller's limits: the file bytes allowed,
            // plus metadata for each entry allowed (inodes, directory blocks, extent nodes),
            // plus slack for what an honest filesystem stores beside them.
            let entries = limits.maxEntries
            let (metadata, o1) = entries.multipliedReportingOverflow(by: 8192)
            let cap = Int(min(limits.maxBytes, UInt64(Int.max / 2)))
            let (budget, o2) = cap.addingReportingOverflow(o1 ? Int.max / 4 : metadata + (64 << 20))
            reader = TreeReader(image, limits: Ext4Image.Limits(
                bytesRead: o2 ? Int.max : budget,
                directoryEntries: min(Int.max / 8, entries) * 4 + 100_000,
                mappingNodes: min(Int.max / 8, entries) + 65_536,
                symlinks: 40), purpose: "the artifacts under \(display)")
        } catch {
            throw .unreadableImage(error.summary)
        }
        let found: Node?
        do { found = try reader.node(at: guestDirectory) } catch { throw .unreadableImage(error.summary) }
        guard let top = found else {
            report.notes.append("\(display) does not exist in the workspace after the run: no artifacts")
            return
        }
        guard top.info.type == .directory else {
            throw .refused(entry: display, reason: "it is a \(top.info.type), not a directory (artifacts come from a directory)")
        }
        directories.insert(top.info.inode)
        do throws(WalkErrorBox) {
            try walk(reader, top, fd: root, relative: "", depth: 0)
            if setRootMode { try setMode(root, of: top, relative: "", display: display) }
        } catch {
            throw error.workspaceError(display: display)
        }
    }

    /// Thrown through the reader's callbacks, which cannot throw.
    enum WalkError: Error {
        case refused(entry: String, reason: String)
        case output(String)
        case image(RootFSError)
    }

    mutating func walk(_ reader: TreeReader, _ directory: Node, fd: Int32, relative: String, depth: Int) throws(WalkErrorBox) {
        // The directory's names first, counted against the limit as they come,
        // so a directory of a million names costs only the limit's worth.
        var listed: [DirectoryEntry] = []
        var over: String?
        let limit = limits.maxEntries
        var count = entries
        do {
            try reader.forEachEntry(of: directory) { entry in
                count += 1
                if count > limit {
                    over = String(decoding: entry.name, as: UTF8.self)
                    return false
                }
                listed.append(entry)
                return true
            }
        } catch {
            throw WalkErrorBox(.image(error))
        }
        entries = count
        if let over {
            throw WalkErrorBox(.refused(entry: join(relative, over),
                                        reason: "more than \(limit) entries under \(display) (the limit; raise it with --max-artifacts)"))
        }

        for entry in listed {
            let name = try validName(entry.name, in: relative)
            let rel = join(relative, name)
            guard rel.utf8.count <= ArtifactExtractor.maxPathBytes else {
                throw WalkErrorBox(.refused(entry: String(rel.prefix(200)) + "...", reason: "its path is longer than \(ArtifactExtractor.maxPathBytes) bytes"))
            }
            let node: Node
            do { node = try reader.node(entry, in: directory) } catch { throw WalkErrorBox(.image(error)) }
            switch node.info.type {
            case .directory:
                guard depth + 1 <= ArtifactExtractor.maxDepth else {
                    throw WalkErrorBox(.refused(entry: rel, reason: "it is nested more than \(ArtifactExtractor.maxDepth) directories deep"))
                }
                guard directories.insert(node.info.inode).inserted else {
                    throw WalkErrorBox(.refused(entry: rel, reason: "it is a directory already seen elsewhere in the tree (a hard-linked directory or a loop)"))
                }
                guard mkdirat(fd, name, 0o700) == 0 else { throw hostError(rel, "mkdir") }
                let child = openat(fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                guard child >= 0 else { throw hostError(rel, "open") }
                defer { close(child) }
                try walk(reader, node, fd: child, relative: rel, depth: depth + 1)
                try setMode(child, of: node, relative: rel, display: nil)
                report.artifacts.append(Artifact(path: rel, kind: .directory, size: 0, mode: node.info.permissions & 0o777))
            case .regular:
                try copyFile(reader, node, name: name, in: fd, relative: rel)
            case .symlink:
                try copyLink(reader, node, name: name, in: fd, relative: rel)
            case .other:
                throw WalkErrorBox(.refused(entry: rel, reason: "it is a device node, FIFO or socket (only regular files, directories and symbolic links come back)"))
            }
        }
    }

    /// A directory entry's name as a host file name: one path component of UTF-8.
    func validName(_ bytes: [UInt8], in relative: String) throws(WalkErrorBox) -> String {
        let shown = join(relative, String(decoding: bytes, as: UTF8.self))
        if bytes.isEmpty { throw WalkErrorBox(.refused(entry: shown, reason: "its name is empty")) }
        if bytes.contains(UInt8(ascii: "/")) {
            throw WalkErrorBox(.refused(entry: shown, reason: "its name contains '/' (a crafted entry that would reach outside its directory)"))
        }
        if bytes.contains(0) { throw WalkErrorBox(.refused(entry: shown, reason: "its name contains a NUL byte")) }
        guard let name = String(validating: bytes, as: UTF8.self) else {
            throw WalkErrorBox(.refused(entry: shown, reason: "its name is not valid UTF-8"))
        }
        return name
    }

    mutating func copyFile(_ reader: TreeReader, _ node: Node, name: String, in fd: Int32, relative rel: String) throws(WalkErrorBox) {
        let size = node.info.size
        let (total, overflow) = bytes.addingReportingOverflow(size)
        guard !overflow, total <= limits.maxBytes else {
            throw WalkErrorBox(.refused(entry: rel, reason: "its \(size) bytes take the artifacts past the \(limits.maxBytes)-byte limit (raise it with --max-artifacts)"))
        }
        bytes = total
        let file = openat(fd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard file >= 0 else { throw hostError(rel, "create") }
        defer { close(file) }
        let digest = SHA256Digest()
        var hashed: UInt64 = 0
        var failure: WalkError?
        do {
            try reader.forEachChunk(of: node) { offset, chunk in
                // Holes are zeros in the digest and holes in the host file.
                if offset > hashed { digest.updateZeros(offset - hashed) }
                digest.update(chunk)
                hashed = offset + UInt64(chunk.count)
                var done = 0
                while done < chunk.count {
                    let n = pwrite(file, chunk.baseAddress! + done, chunk.count - done, off_t(offset) + off_t(done))
                    if n < 0 && errno == EINTR { continue }
                    guard n > 0 else {
                        failure = .output("writing '\(rel)' into '\(outputPath)' failed: \(String(cString: strerror(errno)))")
                        return false
                    }
                    done += n
                }
                return true
            }
        } catch {
            throw WalkErrorBox(.image(error))
        }
        if let failure { throw WalkErrorBox(failure) }
        if size > hashed { digest.updateZeros(size - hashed) }
        guard ftruncate(file, off_t(size)) == 0 else { throw hostError(rel, "truncate") }
        try setMode(file, of: node, relative: rel, display: nil)
        report.totalBytes += size
        report.artifacts.append(Artifact(path: rel, kind: .file, size: size, sha256: digest.finish(), mode: node.info.permissions & 0o777))
    }

    mutating func copyLink(_ reader: TreeReader, _ node: Node, name: String, in fd: Int32, relative rel: String) throws(WalkErrorBox) {
        let raw: [UInt8]
        do { raw = try reader.symlinkTarget(of: node) } catch { throw WalkErrorBox(.image(error)) }
        guard let target = String(validating: raw, as: UTF8.self) else {
            throw WalkErrorBox(.refused(entry: rel, reason: "it is a symbolic link whose target is not valid UTF-8"))
        }
        guard symlinkat(target, fd, name) == 0 else { throw hostError(rel, "symlink") }
        if Self.leavesTree(target, from: rel) {
            report.notes.append("'\(rel)' is a symbolic link to '\(target)', outside the artifacts: kept as a link, not followed")
        }
        report.artifacts.append(Artifact(path: rel, kind: .symlink, size: UInt64(raw.count), linkTarget: target, mode: 0o777))
    }

    /// Permission bits without setuid, setgid and sticky (noted when dropped).
    mutating func setMode(_ fd: Int32, of node: Node, relative rel: String, display: String?) throws(WalkErrorBox) {
        let permissions = node.info.permissions
        if permissions & 0o7000 != 0 {
            let bits = [(0o4000, "setuid"), (0o2000, "setgid"), (0o1000, "sticky")].filter { permissions & UInt16($0.0) != 0 }.map(\.1)
            report.notes.append("'\(display ?? rel)': \(bits.joined(separator: ", ")) dropped (mode \(String(permissions, radix: 8)) written as \(String(permissions & 0o777, radix: 8)))")
        }
        guard fchmod(fd, mode_t(permissions & 0o777)) == 0 else { throw hostError(rel.isEmpty ? "." : rel, "chmod") }
    }

    /// Whether a link placed at `path` (relative, '/'-separated) with `target` resolves outside the tree.
    static func leavesTree(_ target: String, from path: String) -> Bool {
        if target.hasPrefix("/") { return true }
        var depth = path.split(separator: "/").count - 1  // the link's own directory
        for component in target.split(separator: "/") {
            switch component {
            case ".": continue
            case "..":
                depth -= 1
                if depth < 0 { return true }
            default: depth += 1
            }
        }
        return false
    }

    func join(_ relative: String, _ name: String) -> String { relative.isEmpty ? name : relative + "/" + name }

    func hostError(_ rel: String, _ what: String) -> WalkErrorBox {
        let e = errno
        if e == EEXIST {
            return WalkErrorBox(.refused(entry: rel, reason: "its name appears twice in its directory (a crafted directory)"))
        }
        return WalkErrorBox(.output("\(what) of '\(rel)' in '\(outputPath)' failed: \(String(cString: strerror(e)))"))
    }
}

/// Typed throws need a concrete error type; this one carries the walk's.
private struct WalkErrorBox: Error {
    let error: Extraction.WalkError
    init(_ error: Extraction.WalkError) { self.error = error }
}

extension WalkErrorBox {
    /// Entries are named by their guest path (`display` is the artifacts directory's).
    func workspaceError(display: String) -> WorkspaceError {
        switch error {
        case let .refused(entry, reason): return .refused(entry: display + "/" + entry, reason: reason)
        case let .output(m): return .output(m + "; nothing was kept in the output directory")
        case let .image(e): return .unreadableImage(e.summary)
        }
    }
}

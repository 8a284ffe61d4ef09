#if canImport(Glibc)
import Glibc
#endif

/// A host directory made into an ext4 image for a guest to work in: its
/// files, modes, owners, links and holes copied by `mke2fs -d` (e2fsprogs,
/// no loop mount, no root needed), with free room on top. The directory is
/// only read; the guest writes to the copy.
public enum WorkspaceImage {
    /// Free room on top of the contents when the caller gives none: enough
    /// for an object directory and a linked binary of a mid-sized project.
    /// The image is a sparse file, so unused room costs no host disk.
    public static let defaultExtraBytes: UInt64 = 1 << 30
    /// ext4 block size used for the image (and for sizing the contents).
    static let blockSize: UInt64 = 4096

    /// What went into an image.
    public struct Built: Sendable, Equatable {
        public var path: String
        /// The image's size in bytes (its apparent size: most of it is a hole).
        public var bytes: UInt64
        /// Files, directories and links copied from the host directory.
        public var entries: Int
        /// Bytes the copied contents take in 4 KiB blocks.
        public var contentBytes: UInt64
        public var inodes: Int
    }

    /// The sizes of a host tree, as an ext4 image with 4 KiB blocks would hold it.
    struct TreeSize {
        var entries = 0
        var bytes: UInt64 = 0
    }

    /// Builds `image` (which must not exist) from `directory`: the contents'
    /// blocks, their metadata, and `extraBytes` free for the guest.
    public static func build(from directory: String, extraBytes: UInt64 = defaultExtraBytes,
                             into image: String) throws(WorkspaceError) -> Built {
        var info = stat()
        guard stat(directory, &info) == 0 else {
            throw .invalid("workspace directory '\(directory)' cannot be read (\(String(cString: strerror(errno)))): give an existing directory")
        }
        guard info.st_mode & S_IFMT == S_IFDIR else {
            throw .invalid("workspace '\(directory)' is not a directory: give the directory whose contents the guest should see")
        }
        guard extraBytes <= 1 << 44 else {
            throw .invalid("workspace size \(extraBytes) bytes is more than 16 TiB: give a size such as 1G")
        }
        guard let mke2fs = HostProgram.find("mke2fs", candidates: ["/usr/sbin/mke2fs", "/sbin/mke2fs"]) else {
            throw .invalid("mke2fs is not installed, and workspace images are made with it: install e2fsprogs (apt-get install e2fsprogs)")
        }
        let tree = try measure(directory)

        // The contents with ext4's per-file rounding already counted, plus 5% for extent
        // blocks and directories that grow, plus the free room asked for; the filesystem's
        // own metadata comes on top, so that the guest really has that room: the inode
        // table (256 bytes an inode), bitmaps and descriptors (under 1%), the root,
        // lost+found and the reserved descriptor blocks (2 MiB covers them).
        let mib: UInt64 = 1 << 20
        let data = tree.bytes + tree.bytes / 20 + extraBytes
        // mke2fs's default is one inode per 16 KiB; a tree of many small files needs
        // more, and the guest some of its own to create.
        let inodes = max(Int(data / 16384), tree.entries + tree.entries / 4 + 1024)
        let wanted = data + UInt64(inodes) * 256 + data / 100 + 2 * mib
        let bytes = (wanted + mib - 1) / mib * mib

        let fd = open(image, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw .invalid("cannot create workspace image '\(image)': \(String(cString: strerror(errno)))")
        }
        let sized = ftruncate(fd, off_t(bytes)) == 0
        let sizeErrno = errno
        close(fd)
        guard sized else {
            unlink(image)
            throw .system("ftruncate \(image) to \(bytes) bytes", errno: sizeErrno)
        }
        // The image lives for one run and is read back by Airlock: no journal (nothing
        // replays it), no room kept to grow it (resize_inode), no metadata checksums (they
        // guard against failing disks, and cost the guest's emulated kernel a crc32c per
        // metadata write) but group-descriptor checksums (uninit_bg), which is what lets
        // inode tables stay unwritten: the file is all zeros, and the guest mounts with
        // noinit_itable, so nothing zeroes them later. Nothing reserved for root.
        let arguments = ["-q", "-F", "-t", "ext4", "-b", String(blockSize), "-N", String(inodes), "-m", "0",
                         "-O", "^has_journal,^resize_inode,^metadata_csum,uninit_bg",
                         "-E", "lazy_itable_init=1,nodiscard", "-L", "workspace",
                         "-d", directory, image, "\(bytes / 1024)k"]
        let outcome: HostProgram.Outcome
        do { outcome = try HostProgram.run(mke2fs, arguments) } catch {
            unlink(image)
            throw error
        }
        guard outcome.status == 0 else {
            unlink(image)
            throw .tool("copying workspace directory '\(directory)' into an ext4 image failed (mke2fs exited \(outcome.status)): "
                + "check that every file in it is readable", output: outcome.output)
        }
        return Built(path: image, bytes: bytes, entries: tree.entries, contentBytes: tree.bytes, inodes: inodes)
    }

    /// Walks `directory` with lstat (links are not followed, as mke2fs -d does not
    /// follow them), counting entries and the blocks their contents need. A file
    /// with several links is counted once. Paths are kept as bytes: a host name
    /// need not be UTF-8.
    static func measure(_ directory: String) throws(WorkspaceError) -> TreeSize {
        var size = TreeSize()
        var seen = Set<[UInt64]>()
        var pending: [[CChar]] = [Array(directory.utf8CString.dropLast())]
        while let dir = pending.popLast() {
            guard let handle = (dir + [0]).withUnsafeBufferPointer({ opendir($0.baseAddress!) }) else {
                throw .invalid("workspace directory '\(shown(dir))' cannot be listed (\(String(cString: strerror(errno)))): make it readable")
            }
            defer { closedir(handle) }
            size.bytes += blockSize  // the directory's own block (more for big ones, in the 5%)
            while let entry = readdir(handle) {
                let name: [CChar] = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                    Array(raw.bindMemory(to: CChar.self).prefix { $0 != 0 })
                }
                if name == [46] || name == [46, 46] { continue }
                let path = dir + [47] + name
                var info = stat()
                guard (path + [0]).withUnsafeBufferPointer({ lstat($0.baseAddress!, &info) }) == 0 else {
                    throw .invalid("'\(shown(path))' in the workspace cannot be read (\(String(cString: strerror(errno))))")
                }
                size.entries += 1
                switch info.st_mode & S_IFMT {
                case S_IFDIR:
                    pending.append(path)
                case S_IFREG, S_IFLNK:
                    if info.st_nlink > 1, !seen.insert([UInt64(info.st_dev), UInt64(info.st_ino)]).inserted { continue }
                    // Allocated blocks, not the apparent size: holes stay holes in the image.
                    let stored = UInt64(max(0, info.st_blocks)) * 512
                    size.bytes += (stored + blockSize - 1) / blockSize * blockSize
                default:
                    continue
                }
            }
        }
        return size
    }

    static func shown(_ path: [CChar]) -> String { String(decoding: path.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
}

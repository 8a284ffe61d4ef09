import AirlockOS

/// Why an ext2/3/4 image could not be read or a path in it could not be resolved.
///
/// Every case names the image file, because the user passed it and has to fix
/// or replace it; the descriptions end with what to do about it.
public enum RootFSError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The image could not be opened (missing, unreadable, a directory).
    case cannotOpen(image: String, SystemError)
    /// pread failed on an image that did open (an I/O error on the disk below).
    case readFailed(image: String, SystemError)
    /// No ext2/3/4 superblock: the file is something else.
    case notExt(image: String, detail: String)
    /// Something the image describes lies past the end of the file.
    case truncated(image: String, what: String, needed: UInt64, fileSize: UInt64)
    /// A valid filesystem using something this reader does not implement.
    case unsupported(image: String, what: String)
    /// Inconsistent metadata: a bad number, an overflow, a broken structure.
    case corrupt(image: String, detail: String)
    /// One look-up needed more work than `Ext4Image.Limits` allows.
    case workLimitExceeded(image: String, path: String, what: String, limit: Int)
    /// More symbolic links on the way than Linux would follow (a loop, most likely).
    case tooManySymlinks(image: String, path: String, limit: Int)
    /// A path the caller passed that cannot name anything (relative, empty, NUL).
    case invalidPath(image: String, path: String, reason: String)
    /// `readFile` was pointed at something that is not a regular file.
    case notRegularFile(image: String, path: String, type: FileType)
    /// `readFile` found a file larger than the caller's limit.
    case fileTooLarge(image: String, path: String, size: UInt64, limit: Int)

    public var description: String {
        switch self {
        case let .cannotOpen(image, error):
            return FileAccessError(path: image, role: "root filesystem image", underlying: error).description
        case let .readFailed(image, error):
            return "cannot read root filesystem image '\(image)': \(error): check the disk it is on, or copy the image elsewhere"
        case let .notExt(image, detail):
            return "'\(image)' is not an ext2/3/4 image (\(detail)): pass an ext4 image built by rootfs/build.sh (make images)"
        case let .truncated(image, what, needed, fileSize):
            return "root filesystem image '\(image)' is truncated: \(what) needs \(needed) bytes but the file has \(fileSize): "
                + "the copy is incomplete; copy or rebuild it (make images)"
        case let .unsupported(image, what):
            return "root filesystem image '\(image)' uses \(what), which Airlock's image reader does not support: "
                + "build it with rootfs/build.sh (mke2fs -t ext4) or without that feature"
        case let .corrupt(image, detail):
            return "root filesystem image '\(image)' is corrupt: \(detail): check it with 'e2fsck -fn \(image)' or rebuild it (make images)"
        case let .workLimitExceeded(image, path, what, limit):
            return "resolving '\(path)' in root filesystem image '\(image)' needed more than \(limit) \(what): "
                + "the image is corrupt or crafted; check it with 'e2fsck -fn \(image)' or rebuild it (make images)"
        case let .tooManySymlinks(image, path, limit):
            return "resolving '\(path)' in root filesystem image '\(image)' follows more than \(limit) symbolic links "
                + "(a link loop?): fix the links in the image"
        case let .invalidPath(image, path, reason):
            return "cannot look up '\(path)' in root filesystem image '\(image)': \(reason)"
        case let .notRegularFile(image, path, type):
            return "'\(path)' in root filesystem image '\(image)' is a \(type), not a regular file: "
                + "put a regular file there when building the image"
        case let .fileTooLarge(image, path, size, limit):
            return "'\(path)' in root filesystem image '\(image)' is \(size) bytes, more than the \(limit) this reads: "
                + "keep the file smaller, or raise the limit"
        }
    }
}

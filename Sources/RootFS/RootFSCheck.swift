/// What a root filesystem holds at the path the VM will exec.
public enum ExecutableCheck: Equatable, Sendable {
    /// A regular file with at least one execute bit.
    case present(FileInfo)
    /// Nothing there (or a dangling symlink, or a path through a non-directory).
    case missing
    /// Something there, but a directory, device, FIFO or socket.
    case notRegularFile(FileInfo)
    /// A regular file without any execute bit: the kernel would refuse to run it.
    case notExecutable(FileInfo)

    /// A sentence for the user when the check failed, nil when the file is fine.
    public func problem(image: String, path: String) -> String? {
        switch self {
        case .present:
            return nil
        case .missing:
            return "the root filesystem '\(image)' has no \(path): rebuild it with 'make rootfs'"
        case let .notRegularFile(info):
            return "\(path) in the root filesystem '\(image)' is a \(info.type), not a program: rebuild it with 'make rootfs'"
        case let .notExecutable(info):
            let mode = String(info.permissions, radix: 8)
            return "\(path) in the root filesystem '\(image)' is not executable (mode \(mode)): rebuild it with 'make rootfs'"
        }
    }
}

/// Checks run on a root filesystem image before a VM boots from it.
public enum RootFSCheck {
    /// Whether `path` in the image at `image` is a program the guest kernel can
    /// exec, following symlinks. Throws only for images that cannot be read.
    public static func findExecutable(image: String, path: String) throws(RootFSError) -> ExecutableCheck {
        let fs = try Ext4Image(path: image)
        guard let info = try fs.lookup(path) else { return .missing }
        guard info.type == .regular else { return .notRegularFile(info) }
        guard info.isExecutable else { return .notExecutable(info) }
        return .present(info)
    }
}

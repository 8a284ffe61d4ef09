import WorkspaceDisks

// Build steps: a workspace in, artifacts out, extra disks (docs/build-steps.md).

/// A host directory the command works in: copied into an ext4 image of its
/// own (the host directory is only read), attached read-write and mounted
/// at `guestPath`, which is then the command's default working directory.
public struct Workspace: Sendable, Codable, Equatable {
    public var hostDirectory: String
    public var guestPath: String
    /// Free room in the image on top of the contents (the image is sparse: unused room costs no disk).
    public var freeBytes: UInt64

    public static let defaultGuestPath = "/workspace"

    public init(_ hostDirectory: String, guestPath: String = Workspace.defaultGuestPath,
                freeBytes: UInt64 = WorkspaceImage.defaultExtraBytes) {
        self.hostDirectory = hostDirectory
        self.guestPath = guestPath
        self.freeBytes = freeBytes
    }
}

/// Which files come back after the command, and where to: the tree under
/// `guestPath` (inside the workspace) is copied into `outputDirectory`, a new
/// or empty host directory, as hostile input (`ArtifactExtractor`).
public struct ArtifactRequest: Sendable, Codable, Equatable {
    public var outputDirectory: String
    /// nil: the workspace's `out` directory (`/workspace/out`).
    public var guestPath: String?
    public var limits: ArtifactLimits

    public init(outputDirectory: String, guestPath: String? = nil, limits: ArtifactLimits = ArtifactLimits()) {
        self.outputDirectory = outputDirectory
        self.guestPath = guestPath
        self.limits = limits
    }
}

/// An image attached as a virtio-blk disk (a data set, a cache).
public struct Disk: Sendable, Codable, Equatable {
    public var path: String
    /// Read-only disks are opened O_RDONLY and offered to the guest as read-only.
    public var readOnly: Bool
    /// Where the agent mounts it (ext2/3/4); nil attaches it unmounted (/dev/vdX).
    public var guestPath: String?
    /// A read-write disk whose files the agent gives to each run's user (`Command.user`)
    /// before the run: its files carry the owners they had where the image was made.
    /// The workspace is such a disk.
    public var ownedByRunUser: Bool

    public init(_ path: String, readOnly: Bool = true, guestPath: String? = nil, ownedByRunUser: Bool = false) {
        self.path = path
        self.readOnly = readOnly
        self.guestPath = guestPath
        self.ownedByRunUser = ownedByRunUser
    }

    /// The most disks one machine takes besides its root filesystem and workspace
    /// (the virtio-mmio window has room for nine devices, the console among them).
    public static let maxExtra = 6
}

public typealias ArtifactLimits = WorkspaceDisks.ArtifactLimits
public typealias Artifact = WorkspaceDisks.Artifact
public typealias ArtifactReport = WorkspaceDisks.ArtifactReport

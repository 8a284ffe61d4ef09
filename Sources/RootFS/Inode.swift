/// What a path in the image names.
public enum FileType: Equatable, Sendable, CustomStringConvertible {
    case regular
    case directory
    case symlink
    /// A device node, FIFO or socket.
    case other

    public var description: String {
        switch self {
        case .regular: return "regular file"
        case .directory: return "directory"
        case .symlink: return "symbolic link"
        case .other: return "device, FIFO or socket"
        }
    }
}

/// The metadata of one inode, as `ls -ln` would show it.
public struct FileInfo: Equatable, Sendable {
    public var inode: UInt32
    public var type: FileType
    /// The low 12 bits of the mode: permissions plus setuid, setgid and sticky.
    public var permissions: UInt16
    public var uid: UInt32
    public var gid: UInt32
    public var size: UInt64

    public init(inode: UInt32, type: FileType, permissions: UInt16, uid: UInt32, gid: UInt32, size: UInt64) {
        self.inode = inode
        self.type = type
        self.permissions = permissions
        self.uid = uid
        self.gid = gid
        self.size = size
    }

    /// Whether the kernel would exec it for root: a regular file with any execute bit.
    public var isExecutable: Bool { type == .regular && permissions & 0o111 != 0 }
}

/// Inode flags this reader acts on.
enum InodeFlag {
    static let encrypted: UInt32 = 0x800
    static let hashIndexed: UInt32 = 0x1000
    static let hugeFile: UInt32 = 0x40000
    static let extents: UInt32 = 0x80000
    static let inlineData: UInt32 = 0x1000_0000
    static let casefold: UInt32 = 0x4000_0000
}

/// One on-disk inode, kept raw; fields are decoded on use.
struct Inode {
    static let rootNumber: UInt32 = 2
    /// Bytes of i_block: the block map, extent root, fast symlink or inline data.
    static let blockArea = 0x28..<0x64

    let number: UInt32
    let raw: [UInt8]
    let type: FileType
    /// With largedir, directory sizes use the high word too (kernel's ext4_isize).
    let largeDir: Bool

    var mode: UInt16 { raw.le16(0x00) }
    var flags: UInt32 { raw.le32(0x20) }
    var links: UInt16 { raw.le16(0x1A) }
    var uid: UInt32 { UInt32(raw.le16(0x02)) | UInt32(raw.le16(0x78)) << 16 }
    var gid: UInt32 { UInt32(raw.le16(0x18)) | UInt32(raw.le16(0x7A)) << 16 }
    var fileACL: UInt64 { UInt64(raw.le32(0x68)) | UInt64(raw.le16(0x76)) << 32 }
    var blockArea: [UInt8] { Array(raw[Inode.blockArea]) }

    var size: UInt64 {
        let low = UInt64(raw.le32(0x04))
        if largeDir || mode & 0xF000 == 0x8000 { return low | UInt64(raw.le32(0x6C)) << 32 }
        return low
    }

    /// nil for a mode whose type bits name nothing Linux knows.
    static func type(ofMode mode: UInt16) -> FileType? {
        switch mode & 0xF000 {
        case 0x8000: return .regular
        case 0x4000: return .directory
        case 0xA000: return .symlink
        case 0x1000, 0x2000, 0x6000, 0xC000: return .other
        default: return nil
        }
    }

    func has(_ flag: UInt32) -> Bool { flags & flag != 0 }

    /// i_blocks in 512-byte units, as the kernel's ext4_inode_blocks computes it.
    func sectors(hugeFileFeature: Bool, blockSize: UInt64) -> UInt64 {
        var blocks = UInt64(raw.le32(0x1C))
        guard hugeFileFeature else { return blocks }
        blocks |= UInt64(raw.le16(0x74)) << 32
        // At most 2^48 blocks of at most 2^16 bytes: the product stays below 2^64.
        return has(InodeFlag.hugeFile) ? blocks * (blockSize / 512) : blocks
    }

    var info: FileInfo {
        FileInfo(inode: number, type: type, permissions: mode & 0o7777, uid: uid, gid: gid, size: size)
    }
}

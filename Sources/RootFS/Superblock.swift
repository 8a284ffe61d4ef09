/// Feature bits from the superblock that change how the image is read.
enum Feature {
    static let compatSparseSuper2: UInt32 = 0x0200

    static let roCompatSparseSuper: UInt32 = 0x0001
    static let roCompatHugeFile: UInt32 = 0x0008
    static let roCompatBigalloc: UInt32 = 0x0200

    static let incompatCompression: UInt32 = 0x0001
    static let incompatFiletype: UInt32 = 0x0002
    static let incompatRecover: UInt32 = 0x0004
    static let incompatJournalDev: UInt32 = 0x0008
    static let incompatMetaBG: UInt32 = 0x0010
    static let incompatExtents: UInt32 = 0x0040
    static let incompat64Bit: UInt32 = 0x0080
    static let incompatMMP: UInt32 = 0x0100
    static let incompatFlexBG: UInt32 = 0x0200
    static let incompatEAInode: UInt32 = 0x0400
    static let incompatDirData: UInt32 = 0x1000
    static let incompatCsumSeed: UInt32 = 0x2000
    static let incompatLargeDir: UInt32 = 0x4000
    static let incompatInlineData: UInt32 = 0x8000
    static let incompatEncrypt: UInt32 = 0x10000
    static let incompatCasefold: UInt32 = 0x20000

    /// Incompatible features this reader understands. RECOVER is here because a
    /// read-only look-up only risks missing changes still in the journal, which
    /// is acceptable for a pre-boot check; the guest kernel replays it on mount.
    /// ENCRYPT and CASEFOLD only change directories that carry the matching
    /// inode flag; those are handled (or refused) per directory.
    static let supportedIncompat: UInt32 =
        incompatFiletype | incompatRecover | incompatMetaBG | incompatExtents | incompat64Bit | incompatMMP
        | incompatFlexBG | incompatEAInode | incompatCsumSeed | incompatLargeDir | incompatInlineData
        | incompatEncrypt | incompatCasefold

    static func incompatNames(_ bits: UInt32) -> String {
        let known: [(UInt32, String)] = [
            (incompatCompression, "compression"), (incompatJournalDev, "journal_dev"), (incompatDirData, "dirdata"),
        ]
        var parts: [String] = []
        var rest = bits
        for (bit, name) in known where bits & bit != 0 {
            parts.append(name)
            rest &= ~bit
        }
        if rest != 0 { parts.append("unknown bits \(hex(rest))") }
        return parts.joined(separator: ", ")
    }
}

/// The numbers from the superblock that locate everything else, validated.
struct Geometry: Sendable {
    var blockSize: UInt64
    var blocksCount: UInt64
    var firstDataBlock: UInt64
    var blocksPerGroup: UInt64
    var inodesPerGroup: UInt64
    var inodesCount: UInt64
    var inodeSize: UInt64
    var descriptorSize: UInt64
    var groupCount: UInt64
    var revision: UInt32
    var firstInode: UInt64
    var compat: UInt32
    var incompat: UInt32
    var roCompat: UInt32
    var firstMetaBG: UInt64
    var backupGroups: (UInt64, UInt64)
    var clusterSize: UInt64

    func has(incompat bit: UInt32) -> Bool { incompat & bit != 0 }
    func has(roCompat bit: UInt32) -> Bool { roCompat & bit != 0 }

    static let superblockOffset = 1024
    static let magicOffset = 1024 + 0x38

    /// Parses and validates the 1024-byte superblock. Mirrors the kernel's mount
    /// checks, so an image this accepts is one Linux would mount.
    static func parse(_ sb: [UInt8], image: String, fileSize: UInt64) throws(RootFSError) -> Geometry {
        func corrupt(_ detail: String) -> RootFSError { .corrupt(image: image, detail: "superblock: " + detail) }

        let magic = sb.le16(0x38)
        guard magic == 0xEF53 else {
            throw .notExt(image: image, detail: "no 0xEF53 magic at offset \(magicOffset), found \(hex(magic))")
        }
        let revision = sb.le32(0x4C)
        guard revision <= 1 else {
            throw .unsupported(image: image, what: "superblock revision \(revision) (only 0 and 1 exist)")
        }
        let incompat = revision >= 1 ? sb.le32(0x60) : 0
        let roCompat = revision >= 1 ? sb.le32(0x64) : 0
        let compat = revision >= 1 ? sb.le32(0x5C) : 0
        if incompat & Feature.incompatJournalDev != 0 {
            throw .unsupported(image: image, what: "the journal_dev feature (this is an external journal, not a filesystem)")
        }
        let unknown = incompat & ~Feature.supportedIncompat
        guard unknown == 0 else {
            throw .unsupported(image: image, what: "incompatible features \(Feature.incompatNames(unknown)) "
                + "(s_feature_incompat \(hex(incompat)))")
        }

        let logBlock = sb.le32(0x18)
        guard logBlock <= 6 else { throw corrupt("block size 2^(10+\(logBlock)) is outside 1 KiB..64 KiB") }
        let blockSize = UInt64(1024) << UInt64(logBlock)

        let is64 = incompat & Feature.incompat64Bit != 0
        let blocksCount = UInt64(sb.le32(0x04)) | (is64 ? UInt64(sb.le32(0x150)) << 32 : 0)
        let firstDataBlock = UInt64(sb.le32(0x14))
        let blocksPerGroup = UInt64(sb.le32(0x20))
        let inodesPerGroup = UInt64(sb.le32(0x28))
        let inodesCount = UInt64(sb.le32(0x00))

        var clusterSize = blockSize
        if roCompat & Feature.roCompatBigalloc != 0 {
            let logCluster = sb.le32(0x1C)
            guard logCluster >= logBlock, logCluster - logBlock <= 16 else {
                throw corrupt("cluster size 2^(10+\(logCluster)) is smaller than the block size or absurd")
            }
            clusterSize = UInt64(1024) << UInt64(logCluster)
            let clustersPerGroup = UInt64(sb.le32(0x24))
            guard clustersPerGroup >= 1, clustersPerGroup <= blockSize * 8,
                  blocksPerGroup == clustersPerGroup * (clusterSize / blockSize)
            else { throw corrupt("\(clustersPerGroup) clusters and \(blocksPerGroup) blocks per group do not agree") }
        } else {
            guard blocksPerGroup >= 1, blocksPerGroup <= blockSize * 8 else {
                throw corrupt("\(blocksPerGroup) blocks per group (must be 1..\(blockSize * 8))")
            }
        }
        // A sparse or truncated copy must still be as long as the filesystem says;
        // anything shorter means blocks are missing, so say so now, not at a random look-up.
        let (bytes, overflow) = blocksCount.multipliedReportingOverflow(by: blockSize)
        guard !overflow else { throw corrupt("\(blocksCount) blocks of \(blockSize) bytes overflow 64 bits") }
        guard bytes <= fileSize else {
            throw .truncated(image: image, what: "the filesystem (\(blocksCount) blocks of \(blockSize) bytes)",
                             needed: bytes, fileSize: fileSize)
        }

        guard firstDataBlock < blocksCount else {
            throw corrupt("first data block \(firstDataBlock) is not below the block count \(blocksCount)")
        }

        var inodeSize: UInt64 = 128
        var firstInode: UInt64 = 11
        if revision >= 1 {
            inodeSize = UInt64(sb.le16(0x58))
            firstInode = UInt64(sb.le32(0x54))
            guard inodeSize >= 128, inodeSize.isPowerOfTwo, inodeSize <= blockSize else {
                throw corrupt("inode size \(inodeSize) (must be a power of two, 128..block size)")
            }
            guard firstInode >= 11 else { throw corrupt("first non-reserved inode \(firstInode) is below 11") }
        }
        let inodesPerBlock = blockSize / inodeSize
        guard inodesPerGroup >= inodesPerBlock, inodesPerGroup <= blockSize * 8 else {
            throw corrupt("\(inodesPerGroup) inodes per group (must be \(inodesPerBlock)..\(blockSize * 8))")
        }

        var descriptorSize: UInt64 = 32
        if is64 {
            descriptorSize = UInt64(sb.le16(0xFE))
            guard descriptorSize >= 64, descriptorSize <= 1024, descriptorSize.isPowerOfTwo else {
                throw corrupt("group descriptor size \(descriptorSize) (64bit needs a power of two, 64..1024)")
            }
        }

        // Cannot overflow: blocksCount - firstDataBlock < 2^64 and blocksPerGroup <= 2^19.
        let span = blocksCount - firstDataBlock
        let groupCount = span / blocksPerGroup + (span % blocksPerGroup == 0 ? 0 : 1)
        guard groupCount <= (UInt64(1) << 32) - blockSize / descriptorSize else {
            throw corrupt("\(groupCount) block groups is more than ext4 allows")
        }
        // inodesPerGroup <= 2^19 and groupCount < 2^32, so this fits.
        guard groupCount * inodesPerGroup == inodesCount else {
            throw corrupt("inode count \(inodesCount) is not \(groupCount) groups x \(inodesPerGroup) inodes")
        }

        return Geometry(
            blockSize: blockSize, blocksCount: blocksCount, firstDataBlock: firstDataBlock,
            blocksPerGroup: blocksPerGroup, inodesPerGroup: inodesPerGroup, inodesCount: inodesCount,
            inodeSize: inodeSize, descriptorSize: descriptorSize, groupCount: groupCount, revision: revision,
            firstInode: firstInode, compat: compat, incompat: incompat, roCompat: roCompat,
            firstMetaBG: UInt64(sb.le32(0x104)),
            backupGroups: (UInt64(sb.le32(0x24C)), UInt64(sb.le32(0x250))),
            clusterSize: clusterSize)
    }

    /// Whether a block group holds a superblock backup (and so, with meta_bg,
    /// a descriptor block after it). Same rule as the kernel's ext4_bg_has_super.
    func groupHasSuperblock(_ group: UInt64) -> Bool {
        if group == 0 { return true }
        if compat & Feature.compatSparseSuper2 != 0 {
            return group == backupGroups.0 || group == backupGroups.1
        }
        if group <= 1 || roCompat & Feature.roCompatSparseSuper == 0 { return true }
        if group & 1 == 0 { return false }
        for base: UInt64 in [3, 5, 7] {
            var p = base
            while p < group { p *= base }
            if p == group { return true }
        }
        return false
    }
}

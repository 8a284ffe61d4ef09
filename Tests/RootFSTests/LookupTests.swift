import Foundation
import Testing
@testable import RootFS

/// The same tree, built by mke2fs in each layout, must read back the same.
@Suite struct LookupTests {
    @Test(arguments: Layout.allCases)
    func filesDirectoriesAndMetadata(_ layout: Layout) throws {
        let built = try TestImage(layout)
        let image = try built.open()

        let root = try #require(try image.lookup("/"))
        #expect(root.inode == 2 && root.type == .directory)

        let agent = try #require(try image.lookup("/sbin/airlock-init"))
        #expect(agent.type == .regular)
        #expect(agent.permissions == 0o755)
        #expect(Int(agent.uid) == Tree.stagedOwner.0 && Int(agent.gid) == Tree.stagedOwner.1)
        #expect(agent.size == UInt64(Tree.initBytes.count))
        #expect(agent.isExecutable)

        let passwd = try #require(try image.lookup("/etc/passwd"))
        #expect(passwd.type == .regular && passwd.permissions == 0o644 && !passwd.isExecutable)
        #expect(try image.lookup("/etc/setuid")?.permissions == 0o4755)
        #expect(try image.lookup("/usr/lib/deep/nested/dir/file.txt")?.permissions == 0o640)
        #expect(try image.lookup("/fifo")?.type == .other)
        #expect(try image.lookup("/usr/lib/big.bin")?.size == UInt64(Tree.bigSize))
        #expect(try image.lookup("/usr/lib/sparse.bin")?.size == Tree.sparseSize)

        let home = try #require(try image.lookup("/home/airlock"))
        #expect(home.type == .directory && home.permissions == 0o700)
        #expect(Int(home.uid) == Tree.homeOwner.0 && Int(home.gid) == Tree.homeOwner.1)
        let profile = try #require(try image.lookup("/home/airlock/.profile"))
        #expect(Int(profile.uid) == Tree.profileOwner.0 && Int(profile.gid) == Tree.profileOwner.1 && profile.permissions == 0o600)

        #expect(try image.lookup("/nope") == nil)
        #expect(try image.lookup("/sbin/nope") == nil)
        #expect(try image.lookup("/nope/airlock-init") == nil)
        #expect(try image.lookup("/etc/passwd/x") == nil, "a file is not a directory")
        #expect(try image.lookup("/etc/passwd/") == nil, "a trailing slash needs a directory")
        #expect(try image.lookup("/etc/")?.type == .directory)
        #expect(try image.lookup("/empty")?.type == .directory)
        #expect(try image.lookup("/empty/x") == nil)
        #expect(try image.lookup("/" + String(repeating: "n", count: 300)) == nil)
    }

    @Test(arguments: Layout.allCases)
    func symlinks(_ layout: Layout) throws {
        let built = try TestImage(layout)
        let image = try built.open()
        let agent = try #require(try image.lookup("/sbin/airlock-init"))
        let deep = try #require(try image.lookup("/usr/lib/deep/nested/dir/file.txt"))

        // Absolute and relative fast symlinks.
        #expect(try image.lookup("/sbin/init") == agent)
        #expect(try image.lookup("/bin/sh")?.inode == image.lookup("/bin/busybox")?.inode)
        let link = try #require(try image.lookup("/sbin/init", followFinalSymlink: false))
        #expect(link.type == .symlink && link.size == UInt64("/sbin/airlock-init".utf8.count))
        #expect(try image.isFastSymlink(#require(try inode(image, "/sbin/init"))))

        // Slow symlinks (targets over 60 bytes), relative and absolute.
        for path in ["/usr/bin/slow-rel", "/usr/bin/slow-abs"] {
            let raw = try #require(try inode(image, path))
            #expect(raw.type == .symlink)
            let stored = raw.has(InodeFlag.inlineData) || !image.isFastSymlink(raw)
            #expect(stored, "\(path) should be stored outside i_block")
            #expect(try image.lookup(path) == deep, "\(path)")
        }
        #expect(text(try image.readSymlink(#require(try inode(image, "/usr/bin/slow-rel")), budget: budget(image))) == Tree.slowRelative)

        // Links to directories, in the middle of a path.
        #expect(try image.lookup("/usr/bin/to-sbin/airlock-init") == agent)
        #expect(try image.lookup("/usr/bin/to-sbin/init") == agent)
        #expect(try image.lookup("/etc/dirlink/nested/dir/file.txt") == deep)
        #expect(try image.lookup("/usr/bin/to-sbin/")?.type == .directory, "a trailing slash follows the link")
        // ".." after a link goes to the target's parent, as in Linux.
        #expect(try image.lookup("/usr/bin/to-sbin/../etc/passwd") == image.lookup("/etc/passwd"))
        #expect(try image.lookup("/etc/dirlink/../big.bin")?.size == UInt64(Tree.bigSize))

        // Dangling links resolve to nothing, but are there themselves.
        #expect(try image.lookup("/dangling") == nil)
        #expect(try image.lookup("/dangling", followFinalSymlink: false)?.type == .symlink)
    }

    @Test(arguments: [Layout.ext4, .ext2])
    func symlinkLoopsHitTheHopLimit(_ layout: Layout) throws {
        let built = try TestImage(layout)
        let image = try built.open()
        for path in ["/loop/a", "/loop/self", "/loop/a/x", "/loop/chain0"] {
            let error = rootFSError { () throws(RootFSError) in _ = try image.lookup(path) }
            guard case let .tooManySymlinks(name, reported, limit)? = error else {
                Issue.record("\(path): \(String(describing: error))")
                continue
            }
            #expect(name == built.path && reported == path && limit == 40)
            #expect(error!.description.contains(built.path) && error!.description.contains("symbolic links"))
        }
        // Exactly 40 links is what Linux still follows.
        #expect(try image.lookup("/loop/chain1") == image.lookup("/etc/passwd"))
        #expect(try image.lookup("/loop/a", followFinalSymlink: false)?.type == .symlink)
        let strict = try built.open(limits: .init(symlinks: 1))
        #expect(try strict.lookup("/sbin/init")?.type == .regular)
        #expect(rootFSError { () throws(RootFSError) in _ = try strict.lookup("/usr/bin/to-sbin/init") } != nil)
    }

    @Test func dotsAndSlashes() throws {
        let built = try TestImage(.ext4)
        let image = try built.open()
        let passwd = try #require(try image.lookup("/etc/passwd"))
        for path in ["//etc//passwd", "/./etc/./passwd", "/../../etc/passwd", "/usr/lib/deep/../../../etc/passwd",
                     "/etc/../etc/passwd", "/home/airlock/../../etc/passwd"] {
            #expect(try image.lookup(path) == passwd, "\(path)")
        }
        #expect(try image.lookup("/..")?.inode == 2)
        #expect(try image.lookup("/.")?.inode == 2)
        #expect(try image.lookup("/sbin/.")?.type == .directory)
        #expect(try image.lookup("/etc/passwd/.") == nil)
        #expect(try image.lookup("/etc/passwd/..") == nil)

        for bad in ["etc/passwd", "", "/etc/\0passwd"] {
            guard case .invalidPath? = rootFSError({ () throws(RootFSError) in _ = try image.lookup(bad) }) else {
                Issue.record("\(bad.debugDescription) was accepted")
                continue
            }
        }
    }

    @Test(arguments: Layout.allCases)
    func largeDirectory(_ layout: Layout) throws {
        let built = try TestImage(layout)
        let image = try built.open()
        let big = try #require(try inode(image, "/big"))
        let indexed = big.has(InodeFlag.hashIndexed)
        #expect(indexed == layout.hasDirIndex, "e2fsck -D makes /big an htree where dir_index is on")
        #expect(big.size > UInt64(image.blockSize), "/big spans several blocks")
        var seen = Set<UInt32>()
        for i in stride(from: 0, to: Tree.bigEntries, by: 37) + [Tree.bigEntries - 1] {
            let info = try #require(try image.lookup("/big/" + Tree.bigEntry(i)))
            #expect(info.type == .regular && info.size == 0)
            seen.insert(info.inode)
        }
        #expect(seen.count == 18, "each name finds its own inode")
        #expect(try image.lookup("/big/needle")?.isExecutable == true)
        #expect(try image.lookup("/big/" + Tree.bigEntry(Tree.bigEntries)) == nil)
        #expect(try image.lookup("/big/entry-0001") == nil, "a prefix is not a match")
    }

    @Test(arguments: Layout.allCases)
    func readsFiles(_ layout: Layout) throws {
        let built = try TestImage(layout)
        let image = try built.open()

        #expect(try image.readFile("/etc/passwd", limit: 4096) == Array(Tree.passwd.utf8))
        #expect(try image.readFile("/sbin/init", limit: 1 << 20) == Tree.initBytes)
        #expect(try image.readFile("/big/" + Tree.bigEntry(1), limit: 0) == [])
        if layout != .ext4Inline {
            let tail = try #require(try image.readFile("/usr/lib/tail-hole.bin", limit: 1 << 20))
            #expect(tail.count == Int(Tree.tailHoleSize))
            #expect(Array(tail[0..<Tree.tailHoleData.count]) == Tree.tailHoleData)
            #expect(tail[Tree.tailHoleData.count...].allSatisfy { $0 == 0 })
        }
        #expect(try image.readFile("/usr/lib/big.bin", limit: 1 << 20) == pattern(Tree.bigSize, seed: 9))
        #expect(try image.readFile("/nope", limit: 10) == nil)

        // Holes read as zeros, and are holes on disk (mke2fs keeps them).
        var expected = [UInt8](repeating: 0, count: Int(Tree.holesSize))
        for (offset, bytes) in Tree.holeChunks { expected.replaceSubrange(Int(offset)..<Int(offset) + bytes.count, with: bytes) }
        #expect(try image.readFile("/usr/lib/holes.bin", limit: 8 << 20) == expected)
        let holes = try #require(try inode(image, "/usr/lib/holes.bin"))
        let stored = holes.sectors(hugeFileFeature: image.geometry.has(roCompat: Feature.roCompatHugeFile), blockSize: image.geometry.blockSize) * 512
        #expect(stored < Tree.holesSize / 2, "holes.bin stores \(stored) bytes")

        // Far into a sparse file: the triple indirect block at 1 KiB.
        let sparse = try #require(try inode(image, "/usr/lib/sparse.bin"))
        for (offset, bytes) in Tree.sparseChunks {
            let read = try image.readContents(of: sparse, from: offset, count: bytes.count, budget: budget(image))
            #expect(read == bytes, "sparse.bin at \(offset)")
        }
        let gap = try image.readContents(of: sparse, from: 30 << 20, count: 4096, budget: budget(image))
        #expect(gap == [UInt8](repeating: 0, count: 4096))

        guard case .fileTooLarge(_, "/usr/lib/sparse.bin", Tree.sparseSize, 1 << 20)? =
            rootFSError({ () throws(RootFSError) in _ = try image.readFile("/usr/lib/sparse.bin", limit: 1 << 20) })
        else { Issue.record("a file over the limit was read"); return }
        guard case .notRegularFile(_, "/etc", .directory)? = rootFSError({ () throws(RootFSError) in _ = try image.readFile("/etc", limit: 1 << 20) })
        else { Issue.record("a directory was read as a file"); return }
        #expect(rootFSError { () throws(RootFSError) in _ = try image.readFile("/fifo", limit: 10) } != nil)
    }

    @Test(arguments: Layout.allCases)
    func mappingMatchesTheLayout(_ layout: Layout) throws {
        let built = try TestImage(layout)
        let image = try built.open()
        let big = try #require(try inode(image, "/usr/lib/big.bin"))
        let holes = try #require(try inode(image, "/usr/lib/holes.bin"))
        #expect(big.has(InodeFlag.extents) == layout.usesExtents)
        if layout.usesExtents {
            let depth = holes.blockArea.le16(6)
            #expect(depth >= 1, "12 separate extents need an index node")
        } else {
            // i_block[13] is the double indirect block; big.bin reaches it.
            #expect(big.blockArea.le32(13 * 4) != 0)
            let sparse = try #require(try inode(image, "/usr/lib/sparse.bin"))
            #expect(sparse.blockArea.le32(14 * 4) != 0, "sparse.bin's tail needs the triple indirect block")
        }
        if layout == .ext4Inline {
            let passwd = try #require(try inode(image, "/etc/passwd"))
            #expect(passwd.has(InodeFlag.inlineData), "small files are inline")
            let sbin = try #require(try inode(image, "/sbin"))
            #expect(sbin.has(InodeFlag.inlineData), "small directories are inline")
        }
        if layout == .ext4MetaBG {
            #expect(image.geometry.has(incompat: Feature.incompatMetaBG) && image.geometry.groupCount == 64)
            // Some entry lies past the first meta group (16 groups of 64-byte descriptors in
            // 1 KiB). Which one depends on the order mke2fs met the files in (the host's
            // readdir order), so all are looked up.
            var highestGroup: UInt64 = 0
            for i in 0..<Tree.bigEntries {
                let entry = try #require(try image.lookup("/big/" + Tree.bigEntry(i)))
                highestGroup = max(highestGroup, (UInt64(entry.inode) - 1) / image.geometry.inodesPerGroup)
            }
            #expect(highestGroup >= 16)
        }
        if layout == .ext2Rev0 {
            #expect(image.geometry.revision == 0 && image.geometry.inodeSize == 128)
        }
    }

    @Test func findExecutable() throws {
        let built = try TestImage(.ext4)
        let image = built.path
        guard case let .present(info) = try RootFSCheck.findExecutable(image: image, path: "/sbin/airlock-init") else {
            Issue.record("the agent was not found"); return
        }
        #expect(info.permissions == 0o755)
        #expect(try RootFSCheck.findExecutable(image: image, path: "/sbin/init") == .present(info))
        #expect(try RootFSCheck.findExecutable(image: image, path: "/big/needle").problem(image: image, path: "/big/needle") == nil)

        let missing = try RootFSCheck.findExecutable(image: image, path: "/sbin/airlock-agent")
        #expect(missing == .missing)
        #expect(missing.problem(image: image, path: "/sbin/airlock-agent")
                == "the root filesystem '\(image)' has no /sbin/airlock-agent: rebuild it with 'make rootfs'")
        #expect(try RootFSCheck.findExecutable(image: image, path: "/dangling") == .missing)

        let directory = try RootFSCheck.findExecutable(image: image, path: "/sbin")
        guard case .notRegularFile(let dirInfo) = directory else { Issue.record("\(directory)"); return }
        #expect(dirInfo.type == .directory)
        #expect(directory.problem(image: image, path: "/sbin")?.contains("is a directory, not a program") == true)
        guard case .notRegularFile = try RootFSCheck.findExecutable(image: image, path: "/fifo") else {
            Issue.record("a FIFO passed"); return
        }

        let plain = try RootFSCheck.findExecutable(image: image, path: "/etc/notexec")
        guard case .notExecutable(let plainInfo) = plain else { Issue.record("\(plain)"); return }
        #expect(plainInfo.permissions == 0o644)
        #expect(plain.problem(image: image, path: "/etc/notexec")?.contains("not executable (mode 644)") == true)

        guard case .cannotOpen? = rootFSError({ () throws(RootFSError) in _ = try RootFSCheck.findExecutable(image: image + ".missing", path: "/sbin/init") })
        else { Issue.record("a missing image was accepted"); return }
    }
}

func budget(_ image: Ext4Image) -> Budget { Budget(limits: image.limits, image: image.path, path: "(test)") }
func text(_ bytes: [UInt8]) -> String { String(decoding: bytes, as: UTF8.self) }

// Seeded hostile workspace images against the artifact extractor and the ext4
// tree reader under it: `airlock-fuzz-artifacts [ROUNDS] [SEED]` (make fuzz-artifacts).
//
// It builds one workspace image the way `airlock run --workspace` does, then in
// each round overwrites a few random bytes of what the image stores (its data
// regions: superblock, descriptors, bitmaps, inode tables, directories, extent
// nodes, file blocks), extracts /out into a fresh directory, checks what came
// of it, and puts the bytes back. Every round must end in a report or a
// refusal; a report must hold only regular files, directories and links,
// without setuid, setgid or sticky bits, all inside the output directory and
// matching the report's sizes and digests; a refusal must leave nothing. A
// trap or a hang is a failure too. Exit status 0 when every round held.

import RootFS
import SeededRandom
import WorkspaceDisks
#if canImport(Glibc)
import Glibc
#endif

func fail(_ message: String) -> Never {
    print("airlock-fuzz-artifacts: FAILED: \(message)")
    exit(1)
}

func run(_ argv: [String]) {
    var pointers: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
    defer { for p in pointers { free(p) } }
    var pid: pid_t = 0
    guard posix_spawnp(&pid, argv[0], nil, nil, &pointers, environ) == 0 else { fail("cannot run \(argv)") }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
}

func write(_ path: String, _ bytes: [UInt8], mode: mode_t = 0o644) {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode)
    guard fd >= 0 else { fail("cannot create \(path)") }
    _ = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
    fchmod(fd, mode)
    close(fd)
}

/// Every path under `root` with its lstat, links not followed.
func list(_ root: String, _ relative: String = "") -> [(String, stat)] {
    guard let dir = opendir(root + relative) else { return [] }
    defer { closedir(dir) }
    var found: [(String, stat)] = []
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name == "." || name == ".." { continue }
        let path = relative + "/" + name
        var info = stat()
        guard lstat(root + path, &info) == 0 else { fail("lstat \(root + path)") }
        found.append((path, info))
        if info.st_mode & S_IFMT == S_IFDIR { found += list(root, path) }
    }
    return found
}

/// Removes a tree (links are unlinked, never followed).
func remove(_ path: String) {
    var info = stat()
    guard lstat(path, &info) == 0 else { return }
    if info.st_mode & S_IFMT == S_IFDIR {
        chmod(path, 0o700)
        for (child, _) in list(path) where !child.dropFirst().contains("/") { remove(path + child) }
        rmdir(path)
    } else {
        unlink(path)
    }
}

func digest(of path: String) -> String? {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    let d = SHA256Digest()
    var buffer = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { break }
        buffer.withUnsafeBytes { d.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
    }
    return d.finish()
}

let arguments = CommandLine.arguments
let rounds = arguments.count > 1 ? Int(arguments[1]) ?? 20_000 : 20_000
let seed = arguments.count > 2 ? UInt64(arguments[2]) ?? 1 : 1

// In RAM where there is a tmpfs: every round writes and removes a tree, and on a
// busy disk that, not the code under test, would set the pace.
var shm = stat()
let base = stat("/dev/shm", &shm) == 0 && shm.st_mode & S_IFMT == S_IFDIR && access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
var template = Array("\(base)/airlock-fuzz-artifacts-XXXXXX".utf8CString)
guard let made = mkdtemp(&template) else { fail("mkdtemp") }
let scratch = String(cString: made)
defer { run(["rm", "-rf", scratch]) }

// The tree: small files, so that most stored bytes are metadata the walk reads.
let stage = scratch + "/stage"
for dir in ["", "/out", "/out/bin", "/out/lib", "/out/many", "/out/deep", "/out/deep/a", "/out/deep/a/b", "/src"] {
    mkdir(stage + dir, 0o755)
}
write(stage + "/out/bin/tool", (0..<20_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }, mode: 0o755)
write(stage + "/out/lib/a.so", (0..<5_000).map { UInt8(truncatingIfNeeded: $0 &* 13) })
write(stage + "/out/setuid", Array("x".utf8), mode: 0o4755)
for i in 0..<120 { write(stage + "/out/many/file-\(i)", Array(repeating: UInt8(i), count: i * 10)) }
write(stage + "/out/deep/a/b/leaf", Array("leaf\n".utf8))
write(stage + "/src/main.c", Array("int main(void) { return 0; }\n".utf8))
symlink("bin/tool", stage + "/out/link")
symlink("/etc/passwd", stage + "/out/outside")
let image = scratch + "/workspace.ext4"
do {
    _ = try WorkspaceImage.build(from: stage, extraBytes: 4 << 20, into: image)
} catch {
    fail("building the image: \(error)")
}

// What the image stores: its data regions (the file is sparse), metadata first.
let fd = open(image, O_RDWR)
guard fd >= 0 else { fail("open \(image)") }
// SEEK_DATA and SEEK_HOLE (3 and 4) need _GNU_SOURCE, which Swift's Glibc module lacks.
let seekData: Int32 = 3, seekHole: Int32 = 4
var regions: [Range<Int>] = []
var at = 0
let end = lseek(fd, 0, SEEK_END)
while at < end {
    let data = lseek(fd, at, seekData)
    guard data >= 0 else { break }
    let hole = lseek(fd, data, seekHole)
    regions.append(data..<hole)
    at = hole
}
let stored = regions.reduce(0) { $0 + $1.count }
// The used part of group 0's inode table, from the superblock and the first group
// descriptor (the image is ext4 with 4 KiB blocks and 64-bit descriptors).
func field(_ offset: Int, _ width: Int) -> Int {
    var bytes = [UInt8](repeating: 0, count: width)
    pread(fd, &bytes, width, off_t(offset))
    return bytes.enumerated().reduce(0) { $0 | Int($1.element) << (8 * $1.offset) }
}
let inodeSize = field(1024 + 0x58, 2)
let inodeTable = (field(4096 + 0x08, 4) | field(4096 + 0x28, 4) << 32) * 4096
let usedInodes = field(1024, 4) - field(1024 + 0x10, 4)
let targets: [Range<Int>] = [1024..<2048, 4096..<(4096 + 64), inodeTable..<(inodeTable + usedInodes * inodeSize)] + regions
print("airlock-fuzz-artifacts: \(rounds) rounds, seed \(seed), image \(image): \(stored) bytes stored, \(usedInodes) inodes in use")
fflush(nil)

var random = SplitMix64(seed: seed)
var reports = 0, refusals = 0
var kinds: [String: Int] = [:]
let started = monotonicSeconds()
for round in 0..<rounds {
    var saved: [(Int, UInt8)] = []
    for _ in 0..<(1 + random.below(8)) {
        // Mostly the superblock, the descriptors and the inodes in use; the rest anywhere stored.
        let pick = random.below(8)
        let region = pick < 6 ? targets[pick % 3] : regions[random.below(regions.count)]
        let offset = region.lowerBound + random.below(region.count)
        var byte: UInt8 = 0
        pread(fd, &byte, 1, off_t(offset))
        saved.append((offset, byte))
        var new: UInt8
        switch random.below(4) {
        case 0: new = byte ^ (1 << UInt8(random.below(8)))
        case 1: new = 0xFF
        case 2: new = 0
        default: new = UInt8(truncatingIfNeeded: random.next())
        }
        pwrite(fd, &new, 1, off_t(offset))
    }

    let parent = scratch + "/round"
    mkdir(parent, 0o755)
    let output = parent + "/out"
    let roundStart = monotonicSeconds()
    do {
        let report = try ArtifactExtractor.extract(image: image, guestDirectory: "/out", into: output,
                                                   limits: ArtifactLimits(maxEntries: 1_000, maxBytes: 64 << 20))
        reports += 1
        let beside = list(parent).filter { !$0.0.hasPrefix("/out/") }
        guard beside.map(\.0) == ["/out"] else { fail("round \(round): wrote beside the output: \(beside.map(\.0))") }
        let found = list(output)
        guard found.count == report.artifacts.count else {
            fail("round \(round): \(found.count) entries on disk, \(report.artifacts.count) in the report")
        }
        for (path, info) in found {
            let type = info.st_mode & S_IFMT
            guard type == S_IFREG || type == S_IFDIR || type == S_IFLNK else { fail("round \(round): \(path) is a special file") }
            guard type == S_IFLNK || info.st_mode & 0o7000 == 0 else { fail("round \(round): \(path) has mode \(String(info.st_mode, radix: 8))") }
            if type == S_IFREG {
                guard let artifact = report.artifacts.first(where: { "/" + $0.path == path }), artifact.size == UInt64(info.st_size),
                      artifact.sha256 == digest(of: output + path)
                else { fail("round \(round): \(path) does not match the report") }
            }
        }
    } catch {
        refusals += 1
        let text = error.description
        let kind = text.split(separator: ":").prefix(2).joined(separator: ":").split(separator: "'").enumerated()
            .map { $0.offset % 2 == 1 ? "..." : String($0.element) }.joined(separator: "'")
        kinds[String(kind.prefix(100)), default: 0] += 1
        let left = list(parent)
        guard left.isEmpty else { fail("round \(round): a refusal left \(left.map(\.0)) (\(text))") }
    }
    if monotonicSeconds() - roundStart > 10 { fail("round \(round) took \(monotonicSeconds() - roundStart) s") }
    remove(parent)
    for (offset, byte) in saved.reversed() {
        var old = byte
        pwrite(fd, &old, 1, off_t(offset))
    }
    if (round + 1) % 1000 == 0 {
        print("  \(round + 1) rounds: \(reports) reports, \(refusals) refusals")
        fflush(nil)
    }
}
let elapsed = monotonicSeconds() - started
print("airlock-fuzz-artifacts: \(rounds) rounds in \(Int(elapsed)) s: \(reports) reports, \(refusals) refusals; most common refusals:")
for (kind, count) in kinds.sorted(by: { $0.value > $1.value }).prefix(8) { print("  \(count)x \(kind)") }
print("airlock-fuzz-artifacts: ok")

func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

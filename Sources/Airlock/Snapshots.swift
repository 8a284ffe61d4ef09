import AirlockOS
import FoundationEssentials
import KVM
import Logging
import SandboxEngine
import Snapshot
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// How a sandbox uses snapshots (docs/snapshots.md).
public enum SnapshotPolicy: String, Sendable, Codable, Equatable {
    /// Boot cold and save nothing (`airlock run --no-snapshot`; the library's default).
    case none
    /// Restore the store's snapshot for these inputs when there is a good one;
    /// otherwise boot cold and save one into the store before the first command
    /// (`airlock run`'s default).
    case automatic
}

/// What a snapshot for one sandbox configuration is made from: the inputs its
/// manifest pins and its key in the store is derived from.
public struct SnapshotInputs: Sendable, Equatable {
    public var kernelSHA256: String
    public var rootfsSHA256: String
    /// The whole kernel command line the guest boots with (Airlock's, the guest mode's, the
    /// session's, the caller's), for each guest mode a snapshot of it may have been made in.
    public var commandLines: [HostProfile.GuestMode: String]
    public var memoryBytes: UInt64
    public var vcpuCount: Int
    public var hostProfile: HostProfile

    /// The store's name for a snapshot of these inputs: 16 hex digits of the
    /// SHA-256 of all of them (and of the format version), so a change to any
    /// input is a different snapshot, never a stale one.
    public var key: String {
        let lines = commandLines.sorted { $0.key.rawValue < $1.key.rawValue }.map { "\($0.key.rawValue)=\($0.value)" }
        // The profile's wire name: its PV preference too (pv=off runs keep emulated snapshots of their own).
        let text = (["airlock-snapshot", "\(SnapshotFormat.version)", kernelSHA256, rootfsSHA256] + lines
                    + ["\(memoryBytes)", "\(vcpuCount)", hostProfile.wireName]).joined(separator: "\n")
        return String(sha256Hex(Array(text.utf8)).prefix(16))
    }

    /// What a snapshot must have been made from to stand for these inputs on
    /// this host: the CPU KVM gives guests here and its XSAVE size, when /dev/kvm can be asked.
    func requirements(kvmPath: String = KVMSystem.defaultPath) -> SnapshotRequirements {
        var r = SnapshotRequirements(kernelSHA256: kernelSHA256, rootfsSHA256: rootfsSHA256,
                                     commandLines: Dictionary(uniqueKeysWithValues: commandLines.map { ($0.key.rawValue, $0.value) }),
                                     memoryBytes: memoryBytes, vcpuCount: vcpuCount, hostBackend: hostProfile.snapshotBackendName)
        if let kvm = try? KVMSystem(path: kvmPath), let supported = try? kvm.supportedCPUID() {
            r.cpuid = CPUSetup.guestCPUID(supported, vcpuID: 0, vcpuCount: UInt32(vcpuCount))
            r.xsaveSize = kvm.xsaveSize
        }
        return r
    }
}

/// Snapshots in Airlock's data directory: `$AIRLOCK_HOME/snapshots/<key>.snap`
/// (beside `images/`), one per set of inputs (`SnapshotInputs.key`), and a
/// digest cache (`digests.json`) so that the images and the snapshots' RAM
/// images are hashed again only when their files change.
public struct SnapshotStore: Sendable {
    public let directory: String
    public static let fileExtension = ".snap"

    /// Where the digest cache lives: the data directory's store, also for snapshots kept elsewhere.
    let cacheDirectory: String

    public init(imageStore: ImageStore = ImageStore()) {
        directory = imageStore.home + "/snapshots"
        cacheDirectory = directory
    }
    public init(directory: String, cacheDirectory: String? = nil) {
        self.directory = directory
        self.cacheDirectory = cacheDirectory ?? directory
    }

    public func path(forKey key: String) -> String { directory + "/" + key + Self.fileExtension }
    var digestCache: DigestCache { DigestCache(path: cacheDirectory + "/digests.json") }

    /// Creates the directory (root's, 0700: a snapshot holds a whole guest's memory).
    func makeDirectory() throws(SandboxError) {
        try Self.makeDirectory(directory)
        if cacheDirectory != directory { try Self.makeDirectory(cacheDirectory) }
    }

    static func makeDirectory(_ directory: String) throws(SandboxError) {
        var info = stat()
        if stat(directory, &info) == 0 { return }
        let parent = String(directory[..<(directory.lastIndex(of: "/") ?? directory.endIndex)])
        if !parent.isEmpty, stat(parent, &info) != 0 { _ = mkdir(parent, 0o755) }
        guard mkdir(directory, 0o700) == 0 || errno == EEXIST else {
            throw .invalidConfiguration("cannot create the snapshot directory \(directory) (\(String(cString: strerror(errno)))): check AIRLOCK_HOME and its permissions")
        }
    }

    /// The inputs a sandbox with `config` would boot from, with the images'
    /// digests (from the cache when the files have not changed).
    func inputs(for config: SandboxConfig, kernelPath: String, rootfsPath: String, hostProfile: HostProfile) throws(SandboxError) -> SnapshotInputs {
        var c = config
        c.hostProfile = hostProfile
        let cache = digestCache
        return SnapshotInputs(kernelSHA256: try cache.sha256(of: kernelPath, role: "guest kernel"),
                              rootfsSHA256: try cache.sha256(of: rootfsPath, role: "root filesystem"),
                              commandLines: Dictionary(uniqueKeysWithValues: hostProfile.restorableGuestModes(extraCommandLine: config.extraKernelCommandLine).map {
                                  ($0, SessionCommandLine.whole(guestMode: $0, diskCount: 0, agentPath: config.agentPath,
                                                                copyConsole: config.consoleFD != nil, extra: config.extraKernelCommandLine) ?? "")
                              }),
                              memoryBytes: UInt64(config.memoryMiB) << 20, vcpuCount: config.cpus, hostProfile: hostProfile)
    }

    /// Opens `path` and checks all of it against `requirements`: header,
    /// manifest and machine state (`SnapshotFile.open`), the inputs and host
    /// (`SnapshotManifest.check`), and the RAM image's digest, which is read
    /// in full only when the file changed since it was last verified.
    func openChecked(_ path: String, requirements: SnapshotRequirements) throws(SnapshotError) -> SnapshotFile {
        let snapshot = try SnapshotFile.open(path)
        try snapshot.manifest.check(requirements, path: path)
        let cache = digestCache
        if !cache.isVerified(snapshot: path, file: snapshot.file) {
            try snapshot.verifyMemory()
            cache.markVerified(snapshot: path, file: snapshot.file)
        }
        return snapshot
    }

    /// A place to write a new snapshot for `key`: a fresh file beside where it
    /// will go, installed by `install` once written and checked.
    func temporaryFile(forKey key: String) throws(SandboxError) -> (path: String, fd: OwnedFileDescriptor) {
        try makeDirectory()
        let path = directory + "/.\(key).\(getpid()).\(monotonicNanoseconds() % 1_000_000_000).tmp"
        do {
            return (path, try OwnedFileDescriptor.open(path, flags: O_RDWR | O_CREAT | O_EXCL, mode: 0o600))
        } catch {
            throw .invalidConfiguration("cannot create a snapshot file in \(directory): \(error)")
        }
    }

    /// Checks a freshly written snapshot in full (whoever wrote it, it is a
    /// file like any other from here on) and renames it into place for `key`,
    /// replacing an older one. The temporary file is removed either way.
    func install(_ temporaryPath: String, key: String, requirements: SnapshotRequirements) throws(SnapshotError) -> String {
        defer { unlink(temporaryPath) }
        let written = try SnapshotFile.open(temporaryPath)
        try written.manifest.check(requirements, path: temporaryPath)
        try written.verifyMemory()
        let final = path(forKey: key)
        guard rename(temporaryPath, final) == 0 else {
            throw .io(path: final, SystemError("rename", subject: temporaryPath, errno: errno))
        }
        digestCache.markVerified(snapshot: final, file: written.file)
        return final
    }

    /// One snapshot in the store, as `airlock snapshot list` shows it.
    public struct Entry: Sendable {
        public let key: String
        public let path: String
        /// The bytes it takes on disk (its holes are free).
        public let allocatedBytes: UInt64
        /// Nil when the file cannot be used; `problem` then says why.
        public let manifest: SnapshotManifest?
        public let problem: String?
    }

    /// Every snapshot file in the store, checked (header, manifest, state; not the RAM image).
    public func entries() -> [Entry] {
        guard let dir = opendir(directory) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: Int(NAME_MAX) + 1) { String(cString: $0) }
            }
            if name.hasSuffix(Self.fileExtension), !name.hasPrefix(".") { names.append(name) }
        }
        return names.sorted().map { name in
            let path = directory + "/" + name
            var info = stat()
            let allocated = stat(path, &info) == 0 ? UInt64(info.st_blocks) * 512 : 0
            let key = String(name.dropLast(Self.fileExtension.count))
            do throws(SnapshotError) {
                let file = try SnapshotFile.open(path)
                return Entry(key: key, path: path, allocatedBytes: allocated, manifest: file.manifest, problem: nil)
            } catch {
                return Entry(key: key, path: path, allocatedBytes: allocated, manifest: nil, problem: error.description)
            }
        }
    }

    /// Removes the snapshot named by its key (or a unique prefix of it); returns its path.
    public func remove(_ key: String) throws(SandboxError) -> String {
        let matches = entries().filter { $0.key.hasPrefix(key) }
        guard !key.isEmpty, matches.count == 1, let entry = matches.first else {
            throw .invalidConfiguration(matches.isEmpty
                ? "no snapshot '\(key)' in \(directory): see 'airlock snapshot list'"
                : "'\(key)' names \(matches.count) snapshots: give more of the key (airlock snapshot list)")
        }
        guard unlink(entry.path) == 0 else {
            throw .invalidConfiguration("cannot remove \(entry.path): \(String(cString: strerror(errno)))")
        }
        digestCache.forget(entry.path)
        return entry.path
    }
}

/// SHA-256 digests of files, remembered with the identity of the file they
/// were taken of (device, inode, size, modification and change times), so a
/// 12 MB kernel and a root filesystem are not hashed again at every run. Any
/// write to a file changes its change time, which the caller cannot set: a
/// changed file is always hashed again. The cache is a small JSON file
/// written atomically; losing an update only costs a hash.
struct DigestCache {
    let path: String

    struct Identity: Codable, Equatable {
        var device: UInt64, inode: UInt64, size: Int64
        var modified: Int64, modifiedNanoseconds: Int64, changed: Int64, changedNanoseconds: Int64

        init?(fd: Int32) {
            var info = stat()
            guard fstat(fd, &info) == 0 else { return nil }
            device = UInt64(info.st_dev); inode = UInt64(info.st_ino); size = Int64(info.st_size)
            modified = Int64(info.st_mtim.tv_sec); modifiedNanoseconds = Int64(info.st_mtim.tv_nsec)
            changed = Int64(info.st_ctim.tv_sec); changedNanoseconds = Int64(info.st_ctim.tv_nsec)
        }
    }

    struct Entry: Codable {
        var identity: Identity
        /// The file's SHA-256, or "verified" for a snapshot whose RAM image matched its digest.
        var value: String
    }

    static let verified = "verified"

    func load() -> [String: Entry] {
        guard let file = try? MappedFile(path: path, role: "digest cache"), file.size <= 1 << 20,
              let decoded = try? JSONDecoder().decode([String: Entry].self, from: Data(file.bytes))
        else { return [:] }
        return decoded
    }

    func store(_ entries: [String: Entry]) {
        guard let data = try? JSONEncoder().encode(entries) else { return }
        let temporary = path + ".\(getpid()).tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return }
        let ok = (try? data.withUnsafeBytes { try AirlockOS.writeAll(fd: fd, $0) }) != nil
        close(fd)
        if ok { rename(temporary, path) } else { unlink(temporary) }
    }

    func update(_ key: String, _ entry: Entry?) {
        var all = load()
        all[key] = entry
        store(all)
    }

    /// The SHA-256 of the file at `file` (hex).
    func sha256(of file: String, role: String) throws(SandboxError) -> String {
        let mapped: MappedFile
        do { mapped = try MappedFile(path: file, role: role) } catch { throw .invalidConfiguration(error.description) }
        guard let identity = Identity(fd: mapped.descriptor.rawValue) else {
            throw .invalidConfiguration("cannot read the \(role) \(file)")
        }
        if let entry = load()[file], entry.identity == identity, entry.value != Self.verified { return entry.value }
        let digest = withExtendedLifetime(mapped) { sha256Hex(mapped.bytes) }
        update(file, Entry(identity: identity, value: digest))
        return digest
    }

    func isVerified(snapshot path: String, file: OwnedFileDescriptor) -> Bool {
        guard let identity = Identity(fd: file.rawValue), let entry = load()[path] else { return false }
        return entry.identity == identity && entry.value == Self.verified
    }

    func markVerified(snapshot path: String, file: OwnedFileDescriptor) {
        guard let identity = Identity(fd: file.rawValue) else { return }
        update(path, Entry(identity: identity, value: Self.verified))
    }

    func forget(_ path: String) { update(path, nil) }
}

/// What one run does with snapshots, decided before any VM exists.
struct SnapshotPlan: Sendable {
    enum Action: Sendable, Equatable {
        /// Restore this checked snapshot.
        case restore(path: String)
        /// Boot cold and save a snapshot for the store before the first command.
        case bootAndSave
    }
    let action: Action
    let inputs: SnapshotInputs
    let requirements: SnapshotRequirements
    let store: SnapshotStore
    /// The snapshot to restore, opened and checked whole (nil when booting).
    var checked: SnapshotFile? = nil

    /// The plan for `config`. A snapshot in the store that cannot be used
    /// (damaged, or made on another host) is refused here, before any VM: the
    /// run then boots cold and replaces it, and the warning names the file and
    /// says why.
    static func make(_ config: SandboxConfig, kernelPath: String, rootfsPath: String, hostProfile: HostProfile,
                     store: SnapshotStore = SnapshotStore(), logger: Logger) throws(SandboxError) -> SnapshotPlan {
        let t0 = monotonicNanoseconds()
        let inputs = try store.inputs(for: config, kernelPath: kernelPath, rootfsPath: rootfsPath, hostProfile: hostProfile)
        let t1 = monotonicNanoseconds()
        let requirements = inputs.requirements(kvmPath: config.kvmPath)
        let t2 = monotonicNanoseconds()
        defer {
            func ms(_ a: UInt64, _ b: UInt64) -> String { "\(Double(b &- a) / 1e6) ms" }
            logger.debug("snapshot plan: image digests \(ms(t0, t1)), host requirements \(ms(t1, t2)), the snapshot's checks \(ms(t2, monotonicNanoseconds()))")
        }
        let path = store.path(forKey: inputs.key)
        guard ImageStore.exists(path) else {
            return SnapshotPlan(action: .bootAndSave, inputs: inputs, requirements: requirements, store: store)
        }
        do {
            let file = try store.openChecked(path, requirements: requirements)
            return SnapshotPlan(action: .restore(path: path), inputs: inputs, requirements: requirements, store: store, checked: file)
        } catch {
            logger.warning("\(error.description); booting without it, and replacing it")
            return SnapshotPlan(action: .bootAndSave, inputs: inputs, requirements: requirements, store: store)
        }
    }
}

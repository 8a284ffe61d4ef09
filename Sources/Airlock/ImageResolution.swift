import AirlockOS
import KVM
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// Turns a `SandboxConfig` into what a VM boots from, opened here by the supervisor: the
/// jailed VMM gets descriptors, never paths, so it works on images only the caller can
/// read (root-owned, mode 0600) and every message names the caller's own paths. Everything
/// that can be checked is checked before a boot that takes seconds: the sizes make sense,
/// /dev/kvm is really KVM, the files are regular and readable, the root filesystem has the
/// agent.
enum ImageResolution {
    struct Images {
        let kvm: KVMSystem
        let kernel: OwnedFileDescriptor
        let rootfs: OwnedFileDescriptor
        let kernelName: String
        let rootfsName: String
    }

    static func resolve(_ config: SandboxConfig, store: ImageStore = ImageStore()) throws(SandboxError) -> Images {
        try validate(config)
        let kvm: KVMSystem
        do { kvm = try KVMSystem(path: config.kvmPath) } catch { throw .invalidConfiguration(error.description) }
        let kernelPath = config.kernelPath ?? store.kernelPath
        let rootfsPath = config.rootfsPath ?? store.rootfsPath
        let kernel = try open(kernelPath, what: "guest kernel", option: "--kernel", installed: config.kernelPath == nil)
        let rootfs = try open(rootfsPath, what: "root filesystem", option: "--rootfs", installed: config.rootfsPath == nil)
        try AgentCheck.verify(rootfs: rootfsPath, agentPath: config.agentPath)
        return Images(kvm: kvm, kernel: kernel, rootfs: rootfs, kernelName: kernelPath, rootfsName: rootfsPath)
    }

    static func validate(_ config: SandboxConfig) throws(SandboxError) {
        // HostProfile.detect would quietly take a value it does not know as `auto`.
        if let raw = getenv("AIRLOCK_PV").map({ String(cString: $0) }), !raw.isEmpty,
           HostProfile.PVPreference(rawValue: raw) == nil {
            throw .invalidConfiguration("AIRLOCK_PV='\(raw)' is not auto, off or kernel: unset it, or set AIRLOCK_PV=off to force the emulated guest kernel")
        }
        let minimum = Int(Layout.minimumMemory >> 20)
        guard config.memoryMiB >= minimum else {
            throw .invalidConfiguration("--memory \(config.memoryMiB) MiB is too small: give at least \(minimum) MiB")
        }
        guard config.memoryMiB <= 1 << 20 else {
            throw .invalidConfiguration("--memory \(config.memoryMiB) MiB is more than 1 TiB: give the size in MiB (or with a G suffix)")
        }
        guard config.memoryMiB % 2 == 0 else {
            throw .invalidConfiguration("--memory \(config.memoryMiB) MiB is odd: give a whole number of 2 MiB pages (e.g. \(config.memoryMiB + 1))")
        }
        guard config.cpus == 1 else {
            throw .invalidConfiguration("--cpus \(config.cpus): Airlock runs 1 vCPU until SMP support lands; use --cpus 1")
        }
        guard config.bootTimeoutSeconds.isFinite, config.bootTimeoutSeconds > 0 else {
            throw .invalidConfiguration("--boot-timeout \(config.bootTimeoutSeconds) is not a positive number of seconds")
        }
        guard config.agentPath.hasPrefix("/") else {
            throw .invalidConfiguration("the agent path '\(config.agentPath)' must be absolute (e.g. /sbin/airlock-init)")
        }
    }

    /// Opens an image read-only for the VMM, or says exactly why it cannot be used.
    static func open(_ path: String, what: String, option: String, installed: Bool) throws(SandboxError) -> OwnedFileDescriptor {
        let fd: OwnedFileDescriptor
        do { fd = try OwnedFileDescriptor.open(path, flags: O_RDONLY) } catch {
            throw .invalidConfiguration(problem(path, what: what, option: option, installed: installed, errno: error.errno))
        }
        var info = stat()
        guard fstat(fd.rawValue, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG else {
            throw .invalidConfiguration("\(what) \(path) is not a regular file: give the image file itself with \(option)")
        }
        return fd
    }

    /// Why `path` cannot be opened, in words that tell a missing image from a permission problem.
    static func problem(_ path: String, what: String, option: String, installed: Bool, errno code: Int32) -> String {
        let why = String(cString: strerror(code))
        switch code {
        case ENOENT:
            let fix = installed ? "install the default images with 'make images' (or pass \(option) FILE)" : "check the path given to \(option)"
            return "\(what) \(path) does not exist: \(fix)"
        case EACCES, EPERM:
            return "\(what) \(path) exists but this user (uid \(getuid())) may not read it (\(why)): \(FilePermissions.describe(path)); fix its owner or mode, or run as a user who can read it"
        default:
            return "\(what) \(path) cannot be opened (\(why)): check the path given to \(option)"
        }
    }
}

/// The owner and mode of a path (and of the first directory on the way that this user may
/// not search), for a permission error.
enum FilePermissions {
    static func describe(_ path: String) -> String {
        var info = stat()
        if stat(path, &info) == 0 {
            return "it is owned by uid \(info.st_uid), gid \(info.st_gid), mode \(String(info.st_mode & 0o7777, radix: 8))"
        }
        // The file cannot even be looked at: a directory above it is not searchable.
        var dir = path
        while let slash = dir.lastIndex(of: "/"), slash != dir.startIndex {
            dir = String(dir[..<slash])
            if access(dir, X_OK) != 0, stat(dir, &info) == 0 {
                return "the directory \(dir) (owned by uid \(info.st_uid), mode \(String(info.st_mode & 0o7777, radix: 8))) is not searchable by this user"
            }
        }
        return "its owner and mode cannot be read by this user"
    }
}

import AirlockOS
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// Turns a `SandboxConfig` into the files a VM boots from, and checks what
/// can be checked before a boot that takes seconds: the files exist and are
/// readable, the sizes make sense, the root filesystem has the agent.
enum ImageResolution {
    struct Images { let kernel: String; let rootfs: String }

    static func resolve(_ config: SandboxConfig, store: ImageStore = ImageStore()) throws(SandboxError) -> Images {
        try validate(config)
        let kernel = config.kernelPath ?? store.kernelPath
        let rootfs = config.rootfsPath ?? store.rootfsPath
        try checkReadable(kernel, what: "guest kernel", option: "--kernel", installed: config.kernelPath == nil)
        try checkReadable(rootfs, what: "root filesystem", option: "--rootfs", installed: config.rootfsPath == nil)
        try AgentCheck.verify(rootfs: rootfs, agentPath: config.agentPath)
        return Images(kernel: kernel, rootfs: rootfs)
    }

    static func validate(_ config: SandboxConfig) throws(SandboxError) {
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
        guard config.bootTimeoutSeconds > 0 else {
            throw .invalidConfiguration("--boot-timeout \(config.bootTimeoutSeconds) is not a positive number of seconds")
        }
        guard config.agentPath.hasPrefix("/") else {
            throw .invalidConfiguration("the agent path '\(config.agentPath)' must be absolute (e.g. /sbin/airlock-init)")
        }
    }

    static func checkReadable(_ path: String, what: String, option: String, installed: Bool) throws(SandboxError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let why = String(cString: strerror(errno))
            let fix = installed ? "install the default images with 'make images' (or pass \(option) FILE)" : "check the path given to \(option)"
            throw .invalidConfiguration("\(what) \(path) cannot be opened (\(why)): \(fix)")
        }
        close(fd)
    }
}

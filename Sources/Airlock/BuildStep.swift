import AgentProtocol
import AirlockOS
import RootFS
import SessionProtocol
import WorkspaceDisks
#if canImport(Glibc)
import Glibc
#endif

/// One run's build step, around the run itself: before the boot, the
/// workspace image is built from the host directory and put first among the
/// machine's disks; after the VM has ended, the artifacts are copied out of
/// it. Runs on the host side, outside any jail: it reads the caller's
/// directory and writes the caller's output directory.
///
/// The run path calls `prepare` before it builds the session (or the jail),
/// `collect` when the result is in, and `cleanUp` (also run on deinit) at
/// the end; everything else about a run is unchanged.
final class BuildStep: @unchecked Sendable {
    // @unchecked: immutable after `prepare`; `cleanUp` is called once, by the owner.
    /// The command with its default working directory (the workspace) filled in.
    let command: Command
    /// The machine with the workspace disk first among `disks`.
    let config: SandboxConfig
    /// The private directory that holds the workspace image, removed by `cleanUp`.
    private let scratch: String?
    private let image: String?
    /// Where the artifacts are inside the workspace image, and under their guest name.
    private let artifacts: (request: ArtifactRequest, inImage: String, guestPath: String)?
    let workspaceMs: Double

    private init(command: Command, config: SandboxConfig, scratch: String?, image: String?,
                 artifacts: (ArtifactRequest, String, String)?, workspaceMs: Double) {
        self.command = command
        self.config = config
        self.scratch = scratch
        self.image = image
        self.artifacts = artifacts
        self.workspaceMs = workspaceMs
    }

    deinit { cleanUp() }

    /// Checks the workspace, the artifact request and the disks against the
    /// root filesystem, then builds the workspace image. Everything that can be
    /// refused is refused here, before a boot.
    static func prepare(_ command: Command, config: SandboxConfig, rootfs: String) throws(SandboxError) -> BuildStep {
        let started = monotonicNanoseconds()
        var command = command
        var config = config
        var artifacts: (ArtifactRequest, String, String)?
        if let workspace = command.workspace, let problem = GuestMount.targetProblem(workspace.guestPath) {
            throw .invalidConfiguration("--workspace guest path '\(workspace.guestPath)' cannot be used: \(problem)")
        }
        if let request = command.artifacts {
            guard let workspace = command.workspace else {
                throw .invalidConfiguration("artifacts come from the workspace: give --workspace DIR with --output (Command.workspace with Command.artifacts)")
            }
            let guestPath = request.guestPath ?? workspace.guestPath + "/out"
            if let problem = GuestMount.targetProblem(guestPath) {
                throw .invalidConfiguration("--artifacts '\(guestPath)' cannot be used: \(problem)")
            }
            guard GuestMount.path(guestPath, isUnder: workspace.guestPath) else {
                throw .invalidConfiguration("--artifacts '\(guestPath)' is not inside the workspace \(workspace.guestPath): artifacts come back from the workspace disk only")
            }
            guard request.limits.maxEntries >= 0 else {
                throw .invalidConfiguration("--max-artifacts \(request.limits.maxEntries) is negative: give a number of entries")
            }
            do { try ArtifactExtractor.checkOutput(request.outputDirectory) } catch {
                throw .invalidConfiguration("--output: \(error)")
            }
            let inImage = "/" + guestPath.dropFirst(workspace.guestPath.count).drop { $0 == "/" }
            artifacts = (request, inImage, guestPath)
        }
        if let workspace = command.workspace {
            if command.workingDirectory == "/" { command.workingDirectory = workspace.guestPath }
            config.disks.insert(Disk("(workspace \(workspace.hostDirectory))", readOnly: false, guestPath: workspace.guestPath,
                                     ownedByRunUser: true), at: 0)
        }
        try checkDisks(config, rootfs: rootfs, hasWorkspace: command.workspace != nil)

        guard let workspace = command.workspace else {
            return BuildStep(command: command, config: config, scratch: nil, image: nil, artifacts: nil, workspaceMs: 0)
        }
        let base = ImageStore.processEnvironment()["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
        var template = Array("\(base)/airlock-workspace-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else {
            throw .invalidConfiguration("cannot make a directory for the workspace image in \(base) (\(String(cString: strerror(errno)))): set TMPDIR to a writable directory")
        }
        let scratch = String(cString: made)
        let image = scratch + "/workspace.ext4"
        do {
            _ = try WorkspaceImage.build(from: workspace.hostDirectory, extraBytes: workspace.freeBytes, into: image)
        } catch {
            rmdir(scratch)
            throw .invalidConfiguration("--workspace: \(error)")
        }
        config.disks[0].path = image
        return BuildStep(command: command, config: config, scratch: scratch, image: image, artifacts: artifacts,
                         workspaceMs: Double(monotonicNanoseconds() - started) / 1e6)
    }

    /// The disks: how many, readable, mountable where asked. A mount point must be a
    /// directory in the root filesystem, or lie under another mount (the workspace, or
    /// /mnt, which becomes a tmpfs when something is mounted below it).
    static func checkDisks(_ config: SandboxConfig, rootfs: String, hasWorkspace: Bool) throws(SandboxError) {
        if config.disks.isEmpty { return }
        let extra = config.disks.count - (hasWorkspace ? 1 : 0)
        guard extra <= Disk.maxExtra else {
            throw .invalidConfiguration("\(extra) disks are more than the \(Disk.maxExtra) a machine takes besides its root filesystem and workspace")
        }
        var targets: [String] = []
        for (i, disk) in config.disks.enumerated() {
            let isWorkspace = hasWorkspace && i == 0
            let option = isWorkspace ? "--workspace" : "--disk \(disk.path)"
            if !isWorkspace {
                _ = try ImageResolution.open(disk.path, what: "disk image", option: "--disk", installed: false)
            }
            guard let target = disk.guestPath else { continue }
            if let problem = GuestMount.targetProblem(target) {
                throw .invalidConfiguration("\(option): guest path '\(target)' cannot be used: \(problem)")
            }
            guard !targets.contains(target) else {
                throw .invalidConfiguration("\(option): \(target) is already a mount point of another disk: give each disk its own guest path")
            }
            targets.append(target)
            if !isWorkspace {
                do { _ = try Ext4Image(path: disk.path) } catch {
                    throw .invalidConfiguration("\(option): only ext2/3/4 images can be mounted at \(target): \(error.summary) (the API's Disk(guestPath: nil) attaches any image unmounted)")
                }
            }
        }
        let fs: Ext4Image
        do { fs = try Ext4Image(path: rootfs) } catch { throw .invalidConfiguration("\(error)") }
        let undermount = MountPlan.mounts(for: config.disks).map(\.target)
        for (i, target) in targets.enumerated() {
            let parents = undermount.filter { $0 != target && GuestMount.path(target, isUnder: $0) }
            if !parents.isEmpty { continue }
            let found: FileInfo?
            do { found = try fs.lookup(target) } catch { throw .invalidConfiguration("\(error)") }
            guard found?.type == .directory else {
                let option = hasWorkspace && i == 0 ? "--workspace" : "--disk"
                throw .invalidConfiguration("\(option): \(target) is not a directory in the root filesystem \(rootfs), which is read-only: mount at a directory it has (such as /workspace), or under /mnt")
            }
        }
        if undermount.contains("/mnt"), !config.disks.contains(where: { $0.guestPath == "/mnt" }) {
            let mnt: FileInfo?
            do { mnt = try fs.lookup("/mnt") } catch { throw .invalidConfiguration("\(error)") }
            guard mnt?.type == .directory else {
                throw .invalidConfiguration("the root filesystem \(rootfs) has no /mnt for the disks mounted below it: mount them at directories it has")
            }
        }
    }

    /// Copies the artifacts out of the workspace image into the result, once the VM has ended.
    func collect(into result: inout RunResult) {
        result.timings.workspaceMs = workspaceMs
        guard let artifacts, let image else { return }
        guard !result.timedOut, result.systemEvent != nil else {
            result.artifactsError = "the artifacts were not collected: the VM was stopped before it wrote its disks back"
            return
        }
        let started = monotonicNanoseconds()
        do {
            result.artifacts = try ArtifactExtractor.extract(image: image, guestDirectory: artifacts.inImage,
                                                             displayPrefix: artifacts.guestPath,
                                                             into: artifacts.request.outputDirectory, limits: artifacts.request.limits)
        } catch {
            result.artifactsError = error.description
        }
        result.timings.artifactsMs = Double(monotonicNanoseconds() - started) / 1e6
    }

    /// Removes the workspace image (the host directory was never written).
    func cleanUp() {
        guard let scratch else { return }
        if let image { unlink(image) }
        rmdir(scratch)
    }

    /// A booted sandbox cannot take a workspace: its disks were attached at boot.
    static func refuseInSession(_ command: Command) throws(SandboxError) {
        if command.workspace != nil || command.artifacts != nil {
            throw .invalidConfiguration("a workspace is a disk attached when a VM boots: run the command in a fresh VM with Sandbox.run(command, config:), or attach an image with SandboxConfig.disks")
        }
    }
}

/// Where the agent mounts the machine's disks: the n-th entry of `disks` is
/// the guest's /dev/vd(b+n) (the VMM attaches the root filesystem, vda, and
/// then the disks in order), mounted at its guest path, parents before
/// children; a tmpfs goes on /mnt first when a disk is mounted below it,
/// since the root filesystem is read-only.
enum MountPlan {
    static func mounts(for disks: [Disk]) -> [GuestMount] {
        var mounts: [GuestMount] = []
        for (i, disk) in disks.enumerated() {
            guard let target = disk.guestPath else { continue }
            mounts.append(GuestMount(source: .disk(GuestMount.diskName(index: i + 1)), target: target, readOnly: disk.readOnly,
                                     ownedByRunUser: disk.ownedByRunUser && !disk.readOnly))
        }
        if mounts.contains(where: { $0.target.hasPrefix("/mnt/") }) && !mounts.contains(where: { $0.target == "/mnt" }) {
            mounts.insert(GuestMount(source: .tmpfs, target: "/mnt", readOnly: false), at: 0)
        }
        // Stable: equal depths keep their order.
        return mounts.enumerated().sorted { a, b in
            let da = a.element.target.split(separator: "/").count, db = b.element.target.split(separator: "/").count
            return da != db ? da < db : a.offset < b.offset
        }.map(\.element)
    }
}

/// The disks a boot sends the VMM: opened here by the supervisor (read-only ones
/// `O_RDONLY`, so no guest request can change them), with the parameter that tells
/// the agent where to mount them and the largest writable one's size (the jail's
/// RLIMIT_FSIZE: no write reaches past a disk's end).
struct DiskFiles {
    let files: [OwnedFileDescriptor]
    let request: [BootRequest.Disk]
    /// `AIRLOCK_MOUNTS=...` for the kernel command line, or "".
    let commandLine: String
    let writableBytes: UInt64

    static func open(_ disks: [Disk]) throws(SandboxError) -> DiskFiles {
        guard disks.count <= SessionProtocol.Limits.disks else {
            throw .invalidConfiguration("\(disks.count) disks are more than a VM takes (\(SessionProtocol.Limits.disks))")
        }
        var files: [OwnedFileDescriptor] = []
        var writable: UInt64 = 0
        for disk in disks {
            let fd: OwnedFileDescriptor
            do { fd = try OwnedFileDescriptor.open(disk.path, flags: disk.readOnly ? O_RDONLY : O_RDWR) } catch {
                throw .invalidConfiguration(ImageResolution.problem(disk.path, what: "disk image", option: "--disk", installed: false,
                                                                    errno: error.errno))
            }
            var info = stat()
            guard fstat(fd.rawValue, &info) == 0, info.st_mode & S_IFMT == S_IFREG else {
                throw .invalidConfiguration("disk image \(disk.path) is not a regular file: give the image file itself with --disk")
            }
            if !disk.readOnly { writable = max(writable, UInt64(info.st_size)) }
            files.append(fd)
        }
        let mounts = MountPlan.mounts(for: disks)
        return DiskFiles(files: files, request: disks.map { BootRequest.Disk(name: $0.path, readOnly: $0.readOnly) },
                         commandLine: mounts.isEmpty ? "" : "\(GuestMount.variable)=\(GuestMount.encode(mounts))",
                         writableBytes: writable)
    }
}

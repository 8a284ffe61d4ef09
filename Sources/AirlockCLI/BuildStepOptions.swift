import Airlock
import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif

/// The build-step options of `airlock run`: a workspace in, artifacts out,
/// extra disks, and the root filesystem by image name (docs/build-steps.md).
struct BuildStepOptions: ParsableArguments {
    @Option(help: ArgumentHelp(
        "Copy DIR into the guest at GUESTPATH (default /workspace), on a disk of its own, writable there; the command starts there. DIR itself is only read.",
        valueName: "DIR[:GUESTPATH]"))
    var workspace: String?

    @Option(help: ArgumentHelp("Free room in the workspace disk on top of DIR's contents (K, M, G suffixes; default 1G). A full disk gives the command ENOSPC.",
                               valueName: "SIZE"))
    var workspaceSize: String?

    @Option(help: ArgumentHelp("After the command, copy the files it left under --artifacts into DIR (new or empty), checked as hostile input: regular files, directories and links only, no setuid bits, bounded by --max-artifacts.",
                               valueName: "DIR"))
    var output: String?

    @Option(help: ArgumentHelp("The guest directory that --output copies (default: the workspace's out/, /workspace/out). Must be inside the workspace.",
                               valueName: "GUESTPATH"))
    var artifacts: String?

    @Option(help: ArgumentHelp("At most COUNT entries and SIZE bytes of artifacts (default 10000:1G); more refuses them all.", valueName: "COUNT[:SIZE]"))
    var maxArtifacts: String?

    @Option(name: .customLong("disk"), help: ArgumentHelp(
        "Attach an ext4 image as a disk, mounted at GUESTPATH (default /mnt/diskN); read-only (opened O_RDONLY) unless :rw. Repeatable.",
        valueName: "IMAGE[:GUESTPATH][:ro|:rw]"))
    var disks: [String] = []

    @Option(help: ArgumentHelp("Boot the installed root filesystem NAME: 'build' is the toolchain image (make rootfs-build: gcc, make, python3, git); 'default' the busybox one.",
                               valueName: "NAME"))
    var image: String?

    func validate() throws {
        if let workspaceSize { _ = try cli(SizeArgument.bytes(workspaceSize, option: "--workspace-size")) }
        if let maxArtifacts { _ = try cli(BuildStepArguments.artifactLimits(maxArtifacts)) }
        if output == nil, artifacts != nil || maxArtifacts != nil {
            throw ValidationError("--artifacts and --max-artifacts choose what --output copies: give --output DIR too")
        }
        if output != nil && workspace == nil {
            throw ValidationError("--output copies files from the workspace: give --workspace DIR too")
        }
        if workspaceSize != nil && workspace == nil { throw ValidationError("--workspace-size sizes the --workspace disk: give --workspace DIR too") }
        if let image, !ImageStore.isImageName(image) {
            throw ValidationError("--image '\(image)' is not an image name: use lower-case letters, digits and '-' (e.g. build)")
        }
    }

    /// Puts the options into the command and the machine.
    func apply(to command: inout Command, config: inout SandboxConfig) throws {
        if let image {
            guard config.rootfsPath == nil else { throw ValidationError("--image and --rootfs both choose the root filesystem: give one of them") }
            let path = ImageStore().rootfsPath(image: image)
            guard ImageStore.exists(path) else {
                throw ValidationError("--image \(image): \(path) is not installed: build it with '\(ImageStore.buildHint(image: image))'")
            }
            config.rootfsPath = path
        }
        if let workspace {
            let free = try workspaceSize.map { UInt64(try cli(SizeArgument.bytes($0, option: "--workspace-size"))) }
            command.workspace = try cli(BuildStepArguments.workspace(workspace, freeBytes: free ?? Workspace(".").freeBytes))
        }
        if let output {
            command.artifacts = ArtifactRequest(outputDirectory: output, guestPath: artifacts,
                                                limits: try maxArtifacts.map { try cli(BuildStepArguments.artifactLimits($0)) } ?? ArtifactLimits())
        }
        config.disks = try disks.enumerated().map { try cli(BuildStepArguments.disk($1, index: $0)) }
    }

    /// What came back, for stderr (stdout is the command's): a summary, the notes, or the refusal.
    func artifactNotices(_ result: RunResult) -> [String] {
        var notices: [String] = []
        if let report = result.artifacts {
            let files = report.artifacts.filter { $0.kind == .file }.count
            let entries = report.artifacts.count
            notices.append("airlock: \(files) file\(files == 1 ? "" : "s") (\(report.totalBytes) bytes, \(entries) entr\(entries == 1 ? "y" : "ies")) copied to \(report.directory)")
            notices += report.notes.map { "airlock: artifacts: \($0)" }
        }
        if let error = result.artifactsError { notices.append("airlock: \(error)") }
        return notices
    }
}

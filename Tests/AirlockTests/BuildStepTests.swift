import AgentProtocol
import Foundation
import RootFS
import Testing
@testable import Airlock

/// A scratch directory with a tiny root filesystem (/workspace, /mnt, /data)
/// and a workspace tree, removed afterwards.
final class BuildStepScratch {
    let root: String
    let rootfs: String

    init() throws {
        root = NSTemporaryDirectory() + "airlock-buildstep-\(UUID().uuidString)"
        let stage = root + "/rootfs-stage"
        for dir in ["workspace", "mnt", "data", "sbin"] {
            try FileManager.default.createDirectory(atPath: stage + "/" + dir, withIntermediateDirectories: true)
        }
        _ = FileManager.default.createFile(atPath: stage + "/file", contents: Data("x".utf8))
        rootfs = root + "/rootfs.ext4"
        try Self.mke2fs(stage, rootfs)
        try FileManager.default.createDirectory(atPath: root + "/src/out", withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: root + "/src/main.c", contents: Data("int main(void){return 0;}\n".utf8))
        _ = FileManager.default.createFile(atPath: root + "/src/out/prebuilt", contents: Data("from the host\n".utf8))
    }

    deinit { try? FileManager.default.removeItem(atPath: root) }

    static func mke2fs(_ stage: String, _ image: String, size: String = "4M") throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["mke2fs", "-q", "-F", "-t", "ext4", "-d", stage, image, size]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw TestFailure("mke2fs \(image) failed") }
    }

    func command(output: String? = "built", artifacts: String? = nil) -> Command {
        var c = Command(["make"])
        c.workspace = Workspace(root + "/src", freeBytes: 1 << 20)
        if let output { c.artifacts = ArtifactRequest(outputDirectory: root + "/" + output, guestPath: artifacts) }
        return c
    }

    func prepare(_ command: Command, _ config: SandboxConfig = SandboxConfig()) throws(SandboxError) -> BuildStep {
        try BuildStep.prepare(command, config: config, rootfs: rootfs)
    }

    func refusal(_ command: Command, _ config: SandboxConfig = SandboxConfig()) -> String {
        do {
            _ = try prepare(command, config)
            return "accepted"
        } catch {
            return error.description
        }
    }
}

/// The build step around a run, on the host side: no VM needed.
@Suite struct BuildStepTests {
    @Test func theCLIsTextParses() throws {
        #expect(try BuildStepArguments.workspace("src") == Workspace("src"))
        #expect(try BuildStepArguments.workspace("src:/work", freeBytes: 5) == Workspace("src", guestPath: "/work", freeBytes: 5))
        #expect(try BuildStepArguments.workspace("a:b").hostDirectory == "a:b", "a colon not followed by / belongs to the directory")
        #expect(throws: SandboxError.self) { try BuildStepArguments.workspace(":/work") }

        #expect(try BuildStepArguments.disk("data.ext4", index: 0) == Disk("data.ext4", readOnly: true, guestPath: "/mnt/disk0"))
        #expect(try BuildStepArguments.disk("data.ext4:rw", index: 2) == Disk("data.ext4", readOnly: false, guestPath: "/mnt/disk2"))
        #expect(try BuildStepArguments.disk("data.ext4:ro", index: 1).readOnly)
        #expect(try BuildStepArguments.disk("c.img:/cache:rw", index: 0) == Disk("c.img", readOnly: false, guestPath: "/cache"))
        #expect(try BuildStepArguments.disk("d:/data", index: 0) == Disk("d", readOnly: true, guestPath: "/data"))
        #expect(throws: SandboxError.self) { try BuildStepArguments.disk(":rw", index: 0) }

        #expect(try BuildStepArguments.artifactLimits("500") == ArtifactLimits(maxEntries: 500))
        #expect(try BuildStepArguments.artifactLimits("500:2G") == ArtifactLimits(maxEntries: 500, maxBytes: 2 << 30))
        #expect(try BuildStepArguments.artifactLimits(":64M") == ArtifactLimits(maxBytes: 64 << 20))
        for bad in ["", "x", "1:2:3", "-1", "5:lots"] {
            #expect(throws: SandboxError.self, "\(bad)") { try BuildStepArguments.artifactLimits(bad) }
        }
    }

    @Test func disksAreMountedParentsFirstWithATmpfsOnMnt() {
        let disks = [Disk("ws", readOnly: false, guestPath: "/workspace"), Disk("cache", readOnly: false, guestPath: "/workspace/cache"),
                     Disk("d0", guestPath: "/mnt/disk0"), Disk("raw", guestPath: nil), Disk("d1", guestPath: "/data")]
        let mounts = MountPlan.mounts(for: disks)
        #expect(GuestMount.encode(mounts) == "tmpfs:/mnt:rw,vdb:/workspace:rw,vdf:/data:ro,vdc:/workspace/cache:rw,vdd:/mnt/disk0:ro")
        #expect(MountPlan.mounts(for: [Disk("d", guestPath: "/mnt"), Disk("e", guestPath: "/mnt/x")]).map(\.target) == ["/mnt", "/mnt/x"],
                "a disk on /mnt itself needs no tmpfs")
        #expect(MountPlan.mounts(for: []).isEmpty)
    }

    @Test func aPreparedStepHasTheWorkspaceDiskFirstAndItsDefaults() throws {
        let s = try BuildStepScratch()
        var config = SandboxConfig()
        let data = s.root + "/data.ext4"
        try BuildStepScratch.mke2fs(s.root + "/src", data)
        config.disks = [Disk(data, guestPath: "/data")]
        var command = s.command()
        let step = try s.prepare(command, config)
        #expect(step.command.workingDirectory == "/workspace", "the workspace is the default working directory")
        #expect(step.config.disks.count == 2 && step.config.disks[1] == Disk(data, guestPath: "/data"))
        let workspace = step.config.disks[0]
        #expect(!workspace.readOnly && workspace.guestPath == "/workspace")
        #expect(FileManager.default.fileExists(atPath: workspace.path))
        #expect(try Ext4Image(path: workspace.path).readFile("/main.c", limit: 100) == Array("int main(void){return 0;}\n".utf8))
        step.cleanUp()
        #expect(!FileManager.default.fileExists(atPath: workspace.path), "the image goes with the step")
        #expect(!FileManager.default.fileExists(atPath: (workspace.path as NSString).deletingLastPathComponent))

        command.workingDirectory = "/workspace/sub"
        #expect(try s.prepare(command).command.workingDirectory == "/workspace/sub", "an explicit one is kept")
        #expect(try s.prepare(Command(["true"])).config.disks.isEmpty, "no workspace, no disk")
    }

    /// What a run leaves under the artifacts directory comes back once the VM has
    /// ended by itself; a VM that was stopped leaves its disk unsynced, so nothing is read.
    @Test func artifactsAreCollectedOnlyFromAVMThatEndedItself() throws {
        let s = try BuildStepScratch()
        let step = try s.prepare(s.command())
        var stopped = RunResult()
        stopped.timedOut = true
        step.collect(into: &stopped)
        #expect(stopped.artifacts == nil && stopped.artifactsError?.contains("were not collected") == true)
        #expect(!FileManager.default.fileExists(atPath: s.root + "/built"))

        var ended = RunResult()
        ended.systemEvent = "reset on vCPU 0"
        step.collect(into: &ended)
        // The host's own out/ went in with the workspace; an untouched image gives it back.
        #expect(ended.artifactsError == nil)
        #expect(ended.artifacts?.artifacts.map(\.path) == ["prebuilt"])
        #expect(try String(contentsOfFile: s.root + "/built/prebuilt", encoding: .utf8) == "from the host\n")
        #expect(ended.timings.artifactsMs > 0 && ended.timings.workspaceMs > 0)

        let document = try JSONSerialization.jsonObject(with: Data(ended.jsonDocument().utf8)) as! [String: Any]
        let artifacts = try #require(document["artifacts"] as? [String: Any])
        #expect(artifacts["directory"] as? String == s.root + "/built" && artifacts["totalBytes"] as? Int == 14)
        let file = try #require((artifacts["files"] as? [[String: Any]])?.first)
        #expect(Set(file.keys) == ["path", "kind", "size", "sha256", "linkTarget", "mode"])
        #expect(file["path"] as? String == "prebuilt" && file["kind"] as? String == "file" && file["size"] as? Int == 14)
        #expect(file["sha256"] as? String == "32004ac815aef63f2c80e94134b683ba9d8b98275959383b29bfb42473004945")
        #expect(file["linkTarget"] is NSNull && file["mode"] as? String == "644")
        #expect(document["artifactsError"] is NSNull)
    }

    @Test func badRequestsAreRefusedBeforeAnythingBoots() throws {
        let s = try BuildStepScratch()
        try FileManager.default.createDirectory(atPath: s.root + "/full", withIntermediateDirectories: false)
        _ = FileManager.default.createFile(atPath: s.root + "/full/x", contents: Data())
        var noWorkspace = Command(["true"])
        noWorkspace.artifacts = ArtifactRequest(outputDirectory: s.root + "/o")
        #expect(s.refusal(noWorkspace).contains("give --workspace DIR with --output"))
        #expect(s.refusal(s.command(artifacts: "/tmp/out")).contains("is not inside the workspace /workspace"))
        #expect(s.refusal(s.command(artifacts: "/workspace2/out")).contains("is not inside the workspace"))
        #expect(s.refusal(s.command(artifacts: "/workspace/a b")).contains("only letters"))
        #expect(s.refusal(s.command(output: "full")).contains("is not empty"))
        var badPath = s.command()
        badPath.workspace?.guestPath = "/work space"
        #expect(s.refusal(badPath).contains("--workspace guest path '/work space' cannot be used"))
        var notThere = s.command()
        notThere.workspace?.guestPath = "/src"
        #expect(s.refusal(notThere).contains("--workspace: /src is not a directory in the root filesystem"))
        var missing = s.command()
        missing.workspace?.hostDirectory = s.root + "/nope"
        #expect(s.refusal(missing).contains("\(s.root)/nope"))

        var config = SandboxConfig()
        config.disks = [Disk(s.root + "/no.ext4")]
        #expect(s.refusal(Command(["true"]), config).contains("disk image \(s.root)/no.ext4 does not exist: check the path given to --disk"))
        config.disks = [Disk(s.root + "/src/main.c", guestPath: "/data")]
        #expect(s.refusal(Command(["true"]), config).contains("only ext2/3/4 images can be mounted at /data"))
        config.disks = [Disk(s.rootfs, guestPath: "/nowhere")]
        #expect(s.refusal(Command(["true"]), config).contains("/nowhere is not a directory in the root filesystem"))
        config.disks = [Disk(s.rootfs, guestPath: "/data"), Disk(s.rootfs, guestPath: "/data")]
        #expect(s.refusal(Command(["true"]), config).contains("already a mount point"))
        config.disks = [Disk](repeating: Disk(s.rootfs, guestPath: nil), count: Disk.maxExtra + 1)
        #expect(s.refusal(Command(["true"]), config).contains("7 disks are more than the 6"))
        // Unmounted disks need no file system; mounts under /mnt need no directory of their own.
        config.disks = [Disk(s.root + "/src/main.c", guestPath: nil), Disk(s.rootfs, guestPath: "/mnt/a/b")]
        #expect(s.refusal(Command(["true"]), config) == "accepted")
        // Nor do mounts inside the workspace.
        config.disks = [Disk(s.rootfs, guestPath: "/workspace/data")]
        #expect(s.refusal(s.command(), config) == "accepted")
        #expect(!FileManager.default.fileExists(atPath: s.root + "/built"), "checking the output creates nothing")
    }

    @Test func aBootedSandboxRefusesAWorkspace() throws {
        let s = try BuildStepScratch()
        #expect(throws: SandboxError.self) { try BuildStep.refuseInSession(s.command()) }
        var c = Command(["true"])
        c.workspace = Workspace(s.root)
        #expect(throws: SandboxError.self) { try BuildStep.refuseInSession(c) }
        try BuildStep.refuseInSession(Command(["true"]))
    }
}

/// The build-step options of `airlock run`, refused before anything boots.
struct BuildStepCLIInputTests {
    @Test(arguments: [
        (["run", "--output", "/tmp/x", "--", "true"], "--output copies files from the workspace: give --workspace DIR too"),
        (["run", "--workspace", "/tmp", "--artifacts", "/workspace/o", "--", "true"], "give --output DIR too"),
        (["run", "--workspace-size", "1G", "--", "true"], "give --workspace DIR too"),
        (["run", "--workspace", "/tmp", "--workspace-size", "big", "--", "true"], "--workspace-size 'big' is not a size"),
        (["run", "--workspace", "/tmp", "--output", "/tmp/o", "--max-artifacts", "x", "--", "true"], "'x' is not a number of entries"),
        (["run", "--workspace", "/no/such/dir", "--", "true"], "workspace directory '/no/such/dir' cannot be read"),
        (["run", "--workspace", "/tmp", "--output", "/etc", "--", "true"], "output directory '/etc' is not empty"),
        (["run", "--disk", "/no/such.ext4", "--", "true"], "disk image /no/such.ext4 does not exist: check the path given to --disk"),
        (["run", "--disk", "/etc/passwd", "--", "true"], "only ext2/3/4 images can be mounted at /mnt/disk0"),
        (["run", "--image", "Build!", "--", "true"], "--image 'Build!' is not an image name"),
        (["run", "--image", "nosuchimage", "--", "true"], "rootfs-nosuchimage.ext4 is not installed: build it with 'rootfs/build-debian.sh --name nosuchimage"),
        (["run", "--image", "build", "--rootfs", "/tmp/x.ext4", "--", "true"], "--image and --rootfs both choose the root filesystem"),
    ])
    func badBuildStepInputIsRefusedWithWhatToDo(arguments: [String], message: String) throws {
        let r = try VMTests.airlock(arguments)
        #expect(r.status == 125, "\(arguments): \(r.stderr)")
        #expect(r.stderr.contains(message), "\(arguments): \(r.stderr)")
        #expect(r.stdout.isEmpty)
    }
}

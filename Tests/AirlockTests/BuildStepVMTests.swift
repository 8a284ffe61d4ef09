import AirlockTestSupport
import Foundation
import Testing
@testable import Airlock

/// Helpers for the build-step VM tests: host trees, their snapshots, digests.
enum BuildStepVM {
    static func scratch() throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("airlock-buildstep-vm-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir
    }

    static func write(_ dir: URL, _ path: String, _ bytes: [UInt8], mode: Int = 0o644) throws {
        let url = dir.appendingPathComponent(path)
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try Data(bytes).write(to: url)
        try FileManager.default.setAttributes([.posixPermissions: mode], ofItemAtPath: url.path)
    }

    /// Every path under `root` with its type, mode, size, mtime and contents: what "unchanged" means.
    static func snapshot(_ root: URL) throws -> [String: String] {
        var found: [String: String] = [:]
        let enumerator = FileManager.default.enumerator(atPath: root.path)
        while let path = enumerator?.nextObject() as? String {
            var info = stat()
            lstat(root.path + "/" + path, &info)
            var line = "\(String(info.st_mode, radix: 8)) \(info.st_size) \(info.st_mtim.tv_sec).\(info.st_mtim.tv_nsec)"
            if info.st_mode & S_IFMT == S_IFREG { line += " " + (try Data(contentsOf: root.appendingPathComponent(path))).base64EncodedString() }
            found[path] = line
        }
        return found
    }

    static func json(_ text: String) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
    }

    static var toolchainImage: String { ImageStore().rootfsPath(image: ImageStore.toolchainImage) }
    static var toolchainInstalled: Bool { FileManager.default.fileExists(atPath: toolchainImage) }
}

/// A workspace in and artifacts out, end to end through the jailed CLI: one boot
/// covers the workspace's files and modes, a read-only data disk, ENOSPC on a
/// full workspace, the host directory left as it was, and artifacts (with a link
/// to /etc/passwd and a setuid bit to neutralise) back byte for byte; a second
/// boot, through the Swift API as an unprivileged user that the workspace is
/// given to, has the guest leave a FIFO, which refuses them all.
@Suite(.serialized, .enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct BuildStepVMTests {
    static let blob: [UInt8] = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ $0 >> 11) }

    @Test(.timeLimit(.minutes(15)))
    func aWorkspaceGoesInAndItsArtifactsComeBackByteForByte() async throws {
        // Blocking work (processes, a VM) on a thread of its own: the cooperative pool has a
        // thread per core, and a test that holds one for a boot stalls every async test.
        let test = self
        try await offThread { try test.aWorkspaceGoesInAndItsArtifactsComeBackByteForByteBlocking() }
    }

    func aWorkspaceGoesInAndItsArtifactsComeBackByteForByteBlocking() throws {
        let dir = try BuildStepVM.scratch()
        defer { try? FileManager.default.removeItem(at: dir) }
        let workspace = dir.appendingPathComponent("ws")
        try BuildStepVM.write(workspace, "src/a.txt", Array("alpha\n".utf8), mode: 0o640)
        try BuildStepVM.write(workspace, "run.sh", Array("#!/bin/sh\necho script ran\n".utf8), mode: 0o755)
        try BuildStepVM.write(workspace, "secret", Array("s\n".utf8), mode: 0o600)
        try BuildStepVM.write(workspace, "blob.bin", Self.blob)
        try FileManager.default.setAttributes([.posixPermissions: 0o750], ofItemAtPath: workspace.appendingPathComponent("src").path)
        try FileManager.default.createSymbolicLink(atPath: workspace.appendingPathComponent("a-link").path, withDestinationPath: "src/a.txt")
        let before = try BuildStepVM.snapshot(workspace)
        // A read-only data disk.
        let dataStage = dir.appendingPathComponent("data")
        try BuildStepVM.write(dataStage, "set.csv", Array("x,y\n1,2\n".utf8))
        let disk = dir.appendingPathComponent("data.ext4").path
        try BuildStepScratch.mke2fs(dataStage.path, disk)
        let output = dir.appendingPathComponent("built").path

        let script = """
            pwd; stat -c '%a %n' src src/a.txt run.sh secret; readlink a-link; ./run.sh; cat src/a.txt
            cat /mnt/disk0/set.csv; touch /mnt/disk0/new 2>/dev/null || echo "data disk is read-only"
            dd if=/dev/zero of=fill bs=64k count=400 2>&1 | grep -o 'No space left on device' | head -1; rm -f fill
            rm src/a.txt; echo rewritten > run.sh; chmod 600 run.sh
            mkdir -p out/bin; cp blob.bin out/bin/blob.bin; seq 1 30000 > out/seq.txt; chmod 4755 out/bin/blob.bin
            ln -s /etc/passwd out/passwd; ln -s bin/blob.bin out/link; mkdir out/empty
            """
        let r = try VMTests.airlock(["run", "--json", "--workspace", workspace.path, "--workspace-size", "512K",
                                     "--disk", disk, "--output", output, "--", "sh", "-c", script])
        #expect(r.status == 0, "stderr: \(r.stderr)")
        let receipt = try BuildStepVM.json(r.stdout)
        #expect(receipt["stdout"] as? String == """
            /workspace
            750 src
            640 src/a.txt
            755 run.sh
            600 secret
            src/a.txt
            script ran
            alpha
            x,y
            1,2
            data disk is read-only
            No space left on device

            """, "\(receipt["stderr"] ?? "")")

        // The host directory is as it was, after the guest deleted and rewrote files in its copy.
        #expect(try BuildStepVM.snapshot(workspace) == before)

        // The artifacts, byte for byte, as the receipt lists them.
        let seq = (1...30000).map(String.init).joined(separator: "\n") + "\n"
        #expect(try Data(contentsOf: URL(fileURLWithPath: output + "/bin/blob.bin")) == Data(Self.blob))
        #expect(try String(contentsOfFile: output + "/seq.txt", encoding: .utf8) == seq)
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: output + "/passwd") == "/etc/passwd")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: output + "/link") == "bin/blob.bin")
        var info = stat()
        #expect(stat(output + "/bin/blob.bin", &info) == 0 && info.st_mode & 0o7777 == 0o755, "the setuid bit is dropped")
        let artifacts = try #require(receipt["artifacts"] as? [String: Any])
        let files = try #require(artifacts["files"] as? [[String: Any]])
        #expect(Set(files.compactMap { $0["path"] as? String }) == ["bin", "bin/blob.bin", "seq.txt", "passwd", "link", "empty"])
        let blob = try #require(files.first { $0["path"] as? String == "bin/blob.bin" })
        #expect(blob["size"] as? Int == Self.blob.count && blob["sha256"] as? String == sha256Hex(Self.blob))
        #expect(files.first { $0["path"] as? String == "seq.txt" }?["sha256"] as? String == sha256Hex(Array(seq.utf8)))
        let notes = try #require(artifacts["notes"] as? [String])
        #expect(notes.contains { $0.contains("'passwd' is a symbolic link to '/etc/passwd', outside the artifacts") })
        #expect(notes.contains { $0.contains("'bin/blob.bin': setuid dropped") })
        #expect(receipt["artifactsError"] is NSNull)
        #expect(JailProbe.leftovers(of: r.pid).isEmpty)
    }

    /// Through the Swift API (in process, unjailed: the disks are opened by path).
    @Test(.timeLimit(.minutes(15)))
    func specialFilesTheGuestLeavesRefuseTheArtifacts() async throws {
        let dir = try BuildStepVM.scratch()
        defer { try? FileManager.default.removeItem(at: dir) }
        let workspace = dir.appendingPathComponent("ws")
        try BuildStepVM.write(workspace, "input", Array("in\n".utf8))
        let output = dir.appendingPathComponent("built").path
        // As an unprivileged user: the workspace (root's files on the host) is given to it.
        var command = Command(["sh", "-c", "id -u; stat -c '%u %n' . input; mkdir out; echo a > out/a; mkfifo out/pipe; echo done"])
        command.user = "airlock"
        command.workspace = Workspace(workspace.path)
        command.artifacts = ArtifactRequest(outputDirectory: output)
        let result = try await Sandbox.run(command, config: SandboxConfig(memoryMiB: 128))
        #expect(result.exitCode == 0, "\(result.stderrText)")
        #expect(result.stdoutText == "1000\n1000 .\n1000 input\ndone\n", "\(result.stderrText)")
        #expect(result.artifacts == nil)
        #expect(result.artifactsError?.contains("artifact '/workspace/out/pipe' refused: it is a device node, FIFO or socket") == true,
                "\(result.artifactsError ?? "no error")")
        #expect(!FileManager.default.fileExists(atPath: output), "nothing is kept")
        #expect(result.timings.workspaceMs > 0 && result.timings.artifactsMs > 0)
    }
}

/// The toolchain image end to end: a C project with a Makefile and a test is
/// built and tested in the VM, and its binary comes out and runs on the host.
/// Needs `make rootfs-build`; without it the suite is skipped with this reason
/// (make bench builds the image and runs the same build as its C benchmark).
@Suite(.enabled(if: VMTests.enabled && BuildStepVM.toolchainInstalled,
                "the toolchain image \(BuildStepVM.toolchainImage) is not installed: build it with 'make rootfs-build' (make bench builds it and runs this build)"))
struct ToolchainVMTests {
    // Generous: on a PVM host the compiler's forks, execs and page faults are all
    // emulated kernel work (5 minutes alone, far more beside other VM tests).
    @Test(.timeLimit(.minutes(30)))
    func aCProjectIsBuiltAndTestedAndItsBinaryComesOut() async throws {
        // Blocking work (processes, a VM) on a thread of its own: the cooperative pool has a
        // thread per core, and a test that holds one for a boot stalls every async test.
        let test = self
        try await offThread { try test.aCProjectIsBuiltAndTestedAndItsBinaryComesOutBlocking() }
    }

    func aCProjectIsBuiltAndTestedAndItsBinaryComesOutBlocking() throws {
        let dir = try BuildStepVM.scratch()
        defer { try? FileManager.default.removeItem(at: dir) }
        let project = dir.appendingPathComponent("calc")
        try BuildStepVM.write(project, "calc.h", Array("int add(int a, int b);\nint mul(int a, int b);\n".utf8))
        try BuildStepVM.write(project, "add.c", Array("#include \"calc.h\"\nint add(int a, int b) { return a + b; }\n".utf8))
        try BuildStepVM.write(project, "mul.c", Array("#include \"calc.h\"\nint mul(int a, int b) { return a * b; }\n".utf8))
        try BuildStepVM.write(project, "main.c", Array("""
            #include <stdio.h>
            #include <stdlib.h>
            #include "calc.h"
            int main(int argc, char **argv) {
                int a = argc > 2 ? atoi(argv[1]) : 6, b = argc > 2 ? atoi(argv[2]) : 7;
                printf("%d %d\\n", add(a, b), mul(a, b));
                return 0;
            }

            """.utf8))
        try BuildStepVM.write(project, "Makefile", Array("""
            calc: main.o add.o mul.o
            \tcc -o $@ $^
            %.o: %.c calc.h
            \tcc -O2 -Wall -c $<
            test: calc
            \ttest "$$(./calc 3 4)" = "7 12"
            .PHONY: test

            """.utf8))
        let output = dir.appendingPathComponent("built").path
        let r = try VMTests.airlock(["run", "--image", "build", "--json", "--workspace", project.path, "--output", output, "--",
                                     "sh", "-c", "make && make test && mkdir -p out && cp calc out/ && echo tested"])
        #expect(r.status == 0, "\(r.stderr)")
        let receipt = try BuildStepVM.json(r.stdout)
        #expect((receipt["stdout"] as? String)?.hasSuffix("tested\n") == true, "\(receipt["stdout"] ?? "") \(receipt["stderr"] ?? "")")
        let binary = output + "/calc"
        #expect(FileManager.default.isExecutableFile(atPath: binary))
        let run = Process()
        run.executableURL = URL(fileURLWithPath: binary)
        run.arguments = ["20", "22"]
        let pipe = Pipe()
        run.standardOutput = pipe
        try run.run()
        run.waitUntilExit()
        #expect(String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self) == "42 440\n", "the binary built in the VM runs here")
        let files = try #require((receipt["artifacts"] as? [String: Any])?["files"] as? [[String: Any]])
        #expect(files.first?["sha256"] as? String == sha256Hex(Array(try Data(contentsOf: URL(fileURLWithPath: binary)))))
    }
}

func sha256Hex(_ bytes: [UInt8]) -> String {
    bytes.withUnsafeBytes { ImageStore.sha256($0) } ?? ""
}

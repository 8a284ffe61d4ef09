import AgentProtocol
import Dispatch
import Foundation
import Synchronization
import Testing
@testable import Airlock

/// The supervisor's side of a run without a VM: option parsing, validation, the receipt.
struct ConfigurationTests {
    @Test func sizesParseWithUnitsAndRejectTheRest() throws {
        #expect(try SizeArgument.mebibytes("256", option: "--memory") == 256)
        #expect(try SizeArgument.mebibytes("1G", option: "--memory") == 1024)
        #expect(try SizeArgument.mebibytes("512M", option: "--memory") == 512)
        #expect(try SizeArgument.bytes("4k", option: "--max-output") == 4096)
        #expect(try SizeArgument.bytes("100", option: "--max-output") == 100)
        for bad in ["lots", "-5", "1.5G", "", "0"] {
            #expect(throws: SandboxError.self) { try SizeArgument.mebibytes(bad, option: "--memory") }
        }
        do { _ = try SizeArgument.mebibytes("lots", option: "--memory") } catch {
            #expect(error.description.contains("--memory 'lots' is not a size"))
        }
        #expect(throws: SandboxError.self) { try SizeArgument.bytes("99999999999G", option: "--max-output") }
    }

    func message(_ config: SandboxConfig) -> String {
        do { try ImageResolution.validate(config); return "" } catch { return error.description }
    }

    @Test func badMachinesAreRefusedWithWhatToDo() {
        #expect(message(SandboxConfig(memoryMiB: 8)).contains("--memory 8 MiB is too small"))
        #expect(message(SandboxConfig(memoryMiB: 129)).contains("2 MiB"))
        #expect(message(SandboxConfig(cpus: 2)).contains("until SMP support lands"))
        var c = SandboxConfig()
        c.agentPath = "sbin/init"
        #expect(message(c).contains("must be absolute"))
        #expect(message(SandboxConfig()) == "")
    }

    @Test func missingImagesNameTheFileAndTheFix() {
        let store = ImageStore(environment: ["AIRLOCK_HOME": "/nonexistent-airlock-home"])
        do {
            _ = try ImageResolution.resolve(SandboxConfig(), store: store)
            Issue.record("resolved a missing kernel")
        } catch {
            #expect(error.description.contains("/nonexistent-airlock-home/images/vmlinux"))
            #expect(error.description.contains("make images"))
        }
        do {
            _ = try ImageResolution.resolve(SandboxConfig(kernelPath: "/etc/hostname", rootfsPath: "/no/such.ext4"), store: store)
            Issue.record("resolved a missing rootfs")
        } catch {
            #expect(error.description.contains("/no/such.ext4") && error.description.contains("--rootfs"))
        }
    }

    @Test func emptyOrBadCommandsAreRefused() {
        #expect(throws: SandboxError.self) { try CommandValidation.check(Command([])) }
        #expect(throws: SandboxError.self) { try CommandValidation.check(Command([""])) }
        var c = Command(["true"])
        c.environment = [("A=B", "x")]
        #expect(throws: SandboxError.self) { try CommandValidation.check(c) }
        c = Command(["true"])
        c.timeoutSeconds = 0
        #expect(throws: SandboxError.self) { try CommandValidation.check(c) }
    }

    /// Commands over the agent's limits are refused before any boot, with a
    /// message that says what is too big, instead of trapping or being refused
    /// by the agent after the boot.
    @Test func commandsOverTheAgentsLimitsAreRefusedBeforeBooting() {
        func problem(_ c: Command) -> String? {
            do { try CommandValidation.check(c); return nil } catch { return error.description }
        }
        let big = String(repeating: "x", count: AgentProtocol.Limits.stringBytes + 1)
        #expect(problem(Command(["echo", big]))?.contains("an argument of \(big.utf8.count) bytes") == true)
        #expect(problem(Command(["true"] + [String](repeating: "a", count: AgentProtocol.Limits.arguments)))?
            .contains("arguments are more than") == true)
        var env = Command(["true"])
        env.environment = [("A", big)]
        #expect(problem(env)?.contains("an environment variable") == true)
        // Each piece within its limit, together over one frame.
        let piece = String(repeating: "y", count: AgentProtocol.Limits.stringBytes)
        let total = problem(Command(["echo"] + [String](repeating: piece, count: 9)))
        #expect(total?.contains("one run request may hold") == true, "\(total ?? "accepted")")
        #expect(problem(Command(["echo"] + [String](repeating: piece, count: 7))) == nil)
    }

    @Test func theJSONDocumentHasEveryKey() throws {
        var r = RunResult()
        r.stdout = Array("out\n".utf8)
        r.exitCode = 7
        r.timings.commandMs = 1.5
        let object = try JSONSerialization.jsonObject(with: Data(r.jsonDocument().utf8)) as! [String: Any]
        #expect(Set(object.keys) == ["stdout", "stderr", "stdoutBase64", "stderrBase64", "exitCode", "signal", "timedOut",
                                     "outputTruncated", "stdoutDroppedBytes", "stderrDroppedBytes", "failure", "systemEvent", "guestMode", "timings",
                                     "artifacts", "artifactsError", "snapshot"])
        #expect(object["stdout"] as? String == "out\n" && object["exitCode"] as? Int == 7)
        #expect(object["signal"] is NSNull && object["stdoutBase64"] is NSNull && object["stderrBase64"] is NSNull)
        #expect(object["guestMode"] is NSNull)
        #expect(object["snapshot"] is NSNull, "no snapshot used: null, not missing")
        r.guestMode = "pvm-native"
        let again = try JSONSerialization.jsonObject(with: Data(r.jsonDocument().utf8)) as! [String: Any]
        #expect(again["guestMode"] as? String == "pvm-native")
        let timings = try #require(object["timings"] as? [String: Any])
        #expect(Set(timings.keys) == ["vmmStartMs", "kernelBootMs", "restoreMs", "agentReadyMs", "commandMs", "shutdownMs", "totalMs",
                                      "workspaceMs", "artifactsMs"])
        #expect(object["artifacts"] is NSNull && object["artifactsError"] is NSNull)
        r.snapshot = SnapshotUse(path: "/s.snap", restored: true, restoreMs: 2.5)
        let restored = try JSONSerialization.jsonObject(with: Data(r.jsonDocument().utf8)) as! [String: Any]
        let snapshot = try #require(restored["snapshot"] as? [String: Any])
        #expect(snapshot["restored"] as? Bool == true && snapshot["restoreMs"] as? Double == 2.5 && snapshot["path"] as? String == "/s.snap")
    }
}

extension ConfigurationTests {
    /// Output that is not UTF-8 keeps its exact bytes in base64 beside the text.
    @Test func theJSONDocumentKeepsBytesThatAreNotText() throws {
        var r = RunResult()
        r.stdout = [0x68, 0x69, 0xFF, 0x00, 0x0A]
        r.stderr = Array("é\n".utf8)
        let object = try JSONSerialization.jsonObject(with: Data(r.jsonDocument().utf8)) as! [String: Any]
        #expect(object["stdout"] as? String == "hi\u{FFFD}\u{0}\n")
        let exact = try #require((object["stdoutBase64"] as? String).flatMap { Data(base64Encoded: $0) })
        #expect([UInt8](exact) == r.stdout)
        #expect(object["stderr"] as? String == "é\n" && object["stderrBase64"] is NSNull)
    }
}


extension ConfigurationTests {
    /// A guest larger than what the host has available is refused before any VM, saying how much there is.
    @Test func guestMemoryIsCheckedAgainstWhatTheHostHas() throws {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:         1000000 kB\nMemAvailable:    8388608 kB\n"
        #expect(HostMemory.available(meminfo: meminfo) == 8 << 30)
        #expect(throws: Never.self) { try HostMemory.check(guestMiB: 4096, meminfo: meminfo) }
        do {
            try HostMemory.check(guestMiB: 65536, meminfo: meminfo)
            Issue.record("64 GiB accepted with 8 GiB available")
        } catch {
            #expect(error.description.contains("--memory 65536 MiB is more than this host can give: 8192 MiB is available"), "\(error)")
            #expect(error.description.contains("ask for at most 8064 MiB"), "\(error)")
        }
        // Without /proc/meminfo there is nothing to check against: the cgroup limit still bounds the VMM.
        #expect(throws: Never.self) { try HostMemory.check(guestMiB: 65536, meminfo: "") }
    }

    /// A permission problem is not reported as a missing image: it names the owner and mode.
    @Test func anUnreadableImageIsToldFromAMissingOne() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("airlock-perm-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = dir.appendingPathComponent("vmlinux").path
        FileManager.default.createFile(atPath: image, contents: Data([1, 2, 3]))
        chmod(image, 0o600)
        let denied = ImageResolution.problem(image, what: "guest kernel", option: "--kernel", installed: true, errno: EACCES)
        #expect(denied.contains("exists but this user") && denied.contains("mode 600") && !denied.contains("make images"), "\(denied)")
        let missing = ImageResolution.problem(dir.appendingPathComponent("none").path, what: "guest kernel", option: "--kernel",
                                              installed: true, errno: ENOENT)
        #expect(missing.contains("does not exist") && missing.contains("make images"), "\(missing)")
        // A directory on the way that cannot be searched is named instead of the file.
        chmod(dir.path, 0o000)
        defer { chmod(dir.path, 0o755) }
        if getuid() != 0 {
            #expect(FilePermissions.describe(image).contains("is not searchable"))
        }
    }
}

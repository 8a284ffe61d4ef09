import AirlockOS
import Foundation
import Logging
import Snapshot
import Testing
@testable import Airlock

/// Snapshots of a real guest: one cold boot saved, then restored several times.
@Suite(.enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct SnapshotSessionVMTests {
    @Test(.timeLimit(.minutes(6)))
    func experiment() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("airlock-snap-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let store = ImageStore()
        var config = SandboxConfig(memoryMiB: 128)
        config.hostProfile = nil
        let logger = Logger(label: "test")
        let t0 = monotonicNanoseconds()
        let cold = try VMSession(config: config, kernelPath: store.kernelPath, rootfsPath: store.rootfsPath,
                                 requestedAt: t0, logger: logger)
        try cold.boot()
        let path = dir.appendingPathComponent("s.snap").path
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        let report = try cold.saveSnapshot(into: fd, path: path, kernelSHA256: "k", rootfsSHA256: "r")
        close(fd)
        print("snapshot: \(report)")
        let first = try cold.run(Command(["sh", "-c", "echo cold; date +%s"]), shutdownAfter: true)
        print("cold run: \(first.exitCode) \(first.stdoutText) \(first.stderrText) \(first.failure ?? "")")

        for i in 0..<2 {
            let snap = try SnapshotFile.open(path)
            let t1 = monotonicNanoseconds()
            let s = try VMSession(config: config, kernelPath: "", rootfsPath: store.rootfsPath, requestedAt: t1, logger: logger, snapshot: snap)
            try s.start()
            let r = try s.run(Command(["sh", "-c", "echo restored \(i); head -c 16 /dev/urandom | od -An -tx1; date +%s"]), shutdownAfter: true)
            print("restored run \(i): \(r.exitCode) \(r.stdoutText) \(r.stderrText) \(r.failure ?? "") \(r.timings)")
            print("console: \(s.consoleLog.capture.text.suffix(2000))")
        }
    }
}

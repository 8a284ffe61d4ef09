import AirlockOS
import Foundation
import GuestMemory
import KVM
import Testing
import Virtio
import VirtioDevices
@testable import Snapshot
@testable import VMM

/// VM tests run wherever /dev/kvm is, and fail (never skip) where it is not,
/// unless the run asked to leave them out with AIRLOCK_SKIP_VM_TESTS=1.
enum VMTests {
    static var enabled: Bool { ProcessInfo.processInfo.environment["AIRLOCK_SKIP_VM_TESTS"] != "1" }
}

/// A scratch directory removed when the value goes.
final class ScratchDirectory {
    let url: URL
    init() throws {
        url = FileManager.default.temporaryDirectory.appendingPathComponent("airlock-snapshot-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }
    func path(_ name: String) -> String { url.appendingPathComponent(name).path }
    deinit { try? FileManager.default.removeItem(at: url) }
}

/// Writes a snapshot of `machine` (paused, or not started) to `path`.
@discardableResult
func writeSnapshot(_ machine: Machine, manifest: SnapshotManifest, to path: String) throws -> SnapshotWriteReport {
    let state = try machine.captureState()
    let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    try #require(fd >= 0)
    defer { close(fd) }
    return try SnapshotWriter.write(fd: fd, path: path, manifest: manifest, state: state, memory: machine.memory)
}

func testManifest(memoryBytes: UInt64, cpuid: CPUIDTable = CPUIDTable(entries: [])) -> SnapshotManifest {
    SnapshotManifest(createdAt: 1_700_000_000, kernelSHA256: String(repeating: "a", count: 64), rootfsSHA256: String(repeating: "b", count: 64),
                     commandLine: "console=ttyS0 test", hostBackend: "pvm", guestMode: "pvm-emulated", memoryBytes: memoryBytes,
                     vcpuCount: 1, tscKHz: 2_000_000, xsaveSize: 4096, cpuid: cpuid, dataPages: 0)
}

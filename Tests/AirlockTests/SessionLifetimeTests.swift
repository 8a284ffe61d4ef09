import Foundation
import Testing
@testable import Airlock

/// A session that is gone leaves nothing open: no KVM descriptor, no guest RAM. A
/// long-lived process (`airlock serve`) makes one per request. Builds the machine
/// without booting it, so it costs milliseconds (but needs /dev/kvm and the images).
@Suite(.enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct SessionLifetimeTests {
    static func kvmDescriptors() -> Int {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).filter { fd in
            ((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)")) ?? "").contains("kvm")
        }.count
    }

    @Test func aDroppedSessionClosesItsVM() throws {
        // Other suites run VMs in this process at the same time: count only this test's own, by
        // building several and seeing the count come back down by as many.
        var sessions: [VMSession] = []
        for _ in 0..<3 {
            sessions.append(try Sandbox.makeSession(SandboxConfig(memoryMiB: 64), requestedAt: 0, logger: .init(label: "test")))
        }
        let withThem = Self.kvmDescriptors()
        #expect(withThem >= 6)  // /dev/kvm and the VM's descriptor, at least, for each
        for s in sessions { s.abandon() }
        sessions.removeAll()
        #expect(Self.kvmDescriptors() <= withThem - 6)
    }
}

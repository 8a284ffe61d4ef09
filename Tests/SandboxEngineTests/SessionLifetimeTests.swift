import AirlockOS
import Foundation
import SessionProtocol
import Testing
import VMM
@testable import SandboxEngine

/// A session that is gone leaves nothing open: no KVM descriptor, no guest RAM. An
/// in-process VMM (the unjailed debug mode) in a long-lived program (`airlock serve`)
/// makes one per request. Builds machines without booting them: milliseconds, but it
/// needs /dev/kvm and the installed images (make images).
@Suite(.enabled(if: ProcessInfo.processInfo.environment["AIRLOCK_SKIP_VM_TESTS"] != "1", "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct SessionLifetimeTests {
    static func kvmDescriptors() -> Int {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).filter { fd in
            ((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)")) ?? "").contains("kvm")
        }.count
    }

    static func open(_ path: String) throws -> OwnedFileDescriptor {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw TestError("cannot open \(path): install the images (make images) or AIRLOCK_SKIP_VM_TESTS=1") }
        return OwnedFileDescriptor(adopting: fd)
    }

    struct TestError: Error, CustomStringConvertible {
        let description: String
        init(_ d: String) { description = d }
    }

    @Test func aDroppedSessionClosesItsMachine() throws {
        // Where ImageStore (Airlock) looks: $AIRLOCK_HOME, else $XDG_DATA_HOME/airlock, else ~/.local/share/airlock.
        let env = ProcessInfo.processInfo.environment
        let home = env["AIRLOCK_HOME"].flatMap { $0.isEmpty ? nil : $0 }
            ?? env["XDG_DATA_HOME"].flatMap { $0.isEmpty ? nil : $0 + "/airlock" }
            ?? (env["HOME"] ?? "/root") + "/.local/share/airlock"
        let kernel = home + "/images/vmlinux", rootfs = home + "/images/rootfs.ext4"
        // Other suites run VMs in this process at the same time: build several and see the
        // count come back down by at least as many.
        var sessions: [VMSession] = []
        for _ in 0..<3 {
            let request = BootRequest(memoryMiB: 64, bootTimeoutSeconds: 30, agentPath: "/sbin/airlock-init",
                                      hostProfile: HostProfile.detect().wireName, kernelName: kernel, rootfsName: rootfs,
                                      requestedAt: monotonicNanoseconds())
            let files = BootFiles(kvm: try Self.open("/dev/kvm"), kernel: try Self.open(kernel), rootfs: try Self.open(rootfs), disks: [])
            sessions.append(try VMSession(request, files: files, hostProfile: HostProfile.detect(), logger: .init(label: "test"),
                                          vcpuThreadSetup: nil))
        }
        let withThem = Self.kvmDescriptors()
        #expect(withThem >= 6)  // the VM's descriptor and a vCPU's, at least, for each
        for s in sessions { s.abandon() }
        sessions.removeAll()
        #expect(Self.kvmDescriptors() <= withThem - 6)
    }
}

import VirtioDevices
import GuestMemory
import KVM
import Testing
@testable import VMM

/// Hand-assembled 64-bit payloads run on the real /dev/kvm: no kernel needed,
/// each runs in well under a second even where guest kernel code is emulated.
@Suite(.enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct PayloadKVMTests {
    static let entry = GuestAddress(0x10_0000)

    static func machine(console: BoundedCapture) throws -> Machine {
        var config = MachineConfig()
        config.memoryBytes = 64 << 20
        config.console = console
        return try Machine(config)
    }

    /// Prints a message with `rep outsb` and one `out`, then asks the i8042 for a reset.
    static let hello: [UInt8] = {
        let message = Array("Hello from Airlock\n".utf8)
        var code: [UInt8] = [
            0x66, 0xBA, 0xF8, 0x03,                    // mov dx, 0x3F8
            0x48, 0x8D, 0x35, 17, 0, 0, 0,             // lea rsi, [rip+17] -> message
            0xB9, UInt8(message.count), 0, 0, 0,       // mov ecx, len
            0xF3, 0x6E,                                // rep outsb
            0xB0, 0x21,                                // mov al, '!'
            0xEE,                                      // out dx, al
            0xB0, 0xFE,                                // mov al, 0xFE
            0xE6, 0x64,                                // out 0x64, al  (i8042 reset)
            0xF4,                                      // hlt
            0xEB, 0xFD,                                // jmp hlt
        ]
        code += message
        return code
    }()

    @Test func consoleBytesAndTheResetEvent() throws {
        let console = BoundedCapture(limit: 1 << 20)
        let m = try Self.machine(console: console)
        try m.loadPayload(Self.hello, at: Self.entry)
        let exit = try m.run(timeout: 30)
        #expect(console.text == "Hello from Airlock\n!")
        #expect(exit.event == SystemEvent(kind: .reset, cause: .i8042Reset, vcpu: 0))
        #expect(!exit.timedOut)
        #expect(exit.timings.firstRun >= exit.timings.created)
    }

    @Test func int3WithNoIDTTripleFaultsIntoAResetEvent() throws {
        // On PVM the int3 reaches the VMM as an emulation failure and the assist
        // injects #BP; on hardware the CPU raises it. Either way the empty IDT
        // turns it into a triple fault.
        let m = try Self.machine(console: BoundedCapture(limit: 1 << 20))
        try m.loadPayload([0xCC, 0xF4], at: Self.entry)
        let exit = try m.run(timeout: 30)
        guard case .tripleFault? = exit.event?.cause else {
            Issue.record("expected a triple fault, got \(String(describing: exit.event))")
            return
        }
        #expect(exit.event?.kind == .reset)
    }

    @Test func fwaitIsCompletedAndTheGuestGoesOn() throws {
        let m = try Self.machine(console: BoundedCapture(limit: 1 << 20))
        try m.loadPayload([0x9B, 0xB0, 0xFE, 0xE6, 0x64, 0xF4], at: Self.entry)
        let exit = try m.run(timeout: 30)
        #expect(exit.event?.cause == .i8042Reset)
    }

    @Test func aSpinningGuestIsStoppedAtTheTimeout() throws {
        let m = try Self.machine(console: BoundedCapture(limit: 1 << 20))
        try m.loadPayload([0xEB, 0xFE], at: Self.entry)  // jmp $
        let start = ContinuousClock.now
        let exit = try m.run(timeout: 1)
        #expect(exit.timedOut && exit.event == nil)
        #expect(ContinuousClock.now - start < .seconds(10))
    }

    @Test func unsupportedInstructionsEndWithAClearError() throws {
        // cmpxchg16b [rsi] is one of the instructions PVM's emulator rejects; on
        // hardware it runs and faults differently, so only check PVM's path.
        guard HostProfile.detect().backend == .pvm else { return }
        let m = try Self.machine(console: BoundedCapture(limit: 1 << 20))
        try m.loadPayload([0x48, 0x0F, 0xC7, 0x0E, 0xF4], at: Self.entry)
        #expect { try m.run(timeout: 30) } throws: { error in
            "\(error)".contains("48 0f c7 0e") && "\(error)".contains("RIP 0x100000")
        }
    }

    @Test func badKernelFilesAreClearErrors() throws {
        let m = try Self.machine(console: BoundedCapture(limit: 1 << 20))
        #expect { try m.loadLinux(kernelPath: "/nonexistent/vmlinux", initrdPath: nil, extraCommandLine: "") } throws: { error in
            "\(error)".contains("/nonexistent/vmlinux") && "\(error)".contains("does not exist")
        }
        #expect { try m.loadLinux(kernelPath: "/etc/hostname", initrdPath: nil, extraCommandLine: "") } throws: { error in
            "\(error)".contains("/etc/hostname")
        }
        #expect { try m.loadLinux(kernelPath: "/tmp", initrdPath: nil, extraCommandLine: "") } throws: { error in
            "\(error)".contains("directory")
        }
    }

    @Test func tooLittleMemoryOrTooManyCPUsAreRejected() {
        var config = MachineConfig()
        config.memoryBytes = 16 << 20
        #expect { try Machine(config) } throws: { "\($0)".contains("too small") }
        config.memoryBytes = 64 << 20
        config.vcpuCount = 2
        #expect { try Machine(config) } throws: { "\($0)".contains("1 vCPU") }
    }
}

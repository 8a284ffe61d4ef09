import GuestMemory
import VirtioDevices
import KVM
import Testing
@testable import VMM

/// Whether this host is a PVM host whose paravirtual interface answers.
enum PVHost {
    static var hasTheInterface: Bool {
        HostProfile.detect().backend == .pvm && ((try? KVMSystem()).map(PVInterface.probe(kvm:)) ?? false)
    }
}

/// A guest in the PVM host's native mode that misuses the paravirtual interface: garbage in
/// its VIF page, unknown hypercalls, return frames and page tables the host must refuse. The
/// VMM must come through every one with an event or its own timeout, never a crash or a hang
/// (guest-kernel/probes/README.md has the host's answers, probed one by one). Hand-assembled
/// payloads that run natively from their first instruction; each takes milliseconds.
@Suite(.enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"),
       .enabled(if: PVHost.hasTheInterface, "no PVM paravirtual interface on this host"))
struct PVHostileKVMTests {
    static let entry = GuestAddress(0x10_0000)

    /// x86-64 encodings the payloads need.
    struct Code {
        var bytes: [UInt8] = []
        static func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian, Array.init) }
        mutating func movEAX(_ v: UInt32) { bytes += [0xB8] + Self.le(v) }
        mutating func movECX(_ v: UInt32) { bytes += [0xB9] + Self.le(v) }
        mutating func movRBX(_ v: UInt64) { bytes += [0x48, 0xBB] + Self.le(v) }
        mutating func movRDI(_ v: UInt64) { bytes += [0x48, 0xBF] + Self.le(v) }
        mutating func movRAX(_ v: UInt64) { bytes += [0x48, 0xB8] + Self.le(v) }
        mutating func storeRAX(at address: UInt32) { bytes += [0x48, 0x89, 0x04, 0x25] + Self.le(address) }
        mutating func invlpg(_ address: UInt32) { bytes += [0x0F, 0x01, 0x3C, 0x25] + Self.le(address) }
        mutating func hypercall() { bytes += [0xCD, 0x1B] }                 // int $0x1b
        mutating func fillRDIWithAL(count: UInt32) { movECX(count); bytes += [0xF3, 0xAA] }  // rep stosb
        mutating func wrmsr(_ msr: UInt32, _ value: UInt64) {
            movECX(msr); movEAX(UInt32(truncatingIfNeeded: value))
            bytes += [0xBA] + Self.le(UInt32(truncatingIfNeeded: value >> 32))   // mov edx, imm32
            bytes += [0x0F, 0x30]
        }
        /// Prints '1' if rax == -38 (ENOSYS), else '0', on the UART.
        mutating func printENOSYS() {
            bytes += [0x48, 0x83, 0xF8, 0xDA]     // cmp rax, -38
            bytes += [0x0F, 0x94, 0xC0]           // sete al
            bytes += [0x04, 0x30]                 // add al, '0'
            bytes += [0x66, 0xBA, 0xF8, 0x03]     // mov dx, 0x3F8
            bytes += [0xEE]                       // out dx, al
        }
        mutating func print(_ c: Character) { bytes += [0xB0, c.asciiValue!, 0x66, 0xBA, 0xF8, 0x03, 0xEE] }
        mutating func resetAndHalt() { bytes += [0xB0, 0xFE, 0xE6, 0x64, 0xF4, 0xEB, 0xFD] }
    }

    /// A 64 MiB machine running `code` natively from its first instruction.
    static func run(_ code: Code, timeout: Double = 10) throws -> (exit: MachineExit, console: String) {
        let console = BoundedCapture(limit: 1 << 16)
        var config = MachineConfig()
        config.memoryBytes = 64 << 20
        config.console = console
        let m = try Machine(config)
        try m.loadPayload(code.bytes, at: entry)
        try #require(try m.enterNativeModeForPayload(), "the host refused the VIF page")
        let exit = try m.run(timeout: timeout)
        #expect(exit.guestMode == .pvmNative)
        return (exit, console.text)
    }

    @Test func garbageInTheVIFPageAndUnknownHypercalls() throws {
        var c = Code()
        c.print("N")                                   // native from here on
        c.movRDI(Layout.pvBootVIFAddress.raw)          // the page the host reads the virtual IF from
        c.bytes += [0xB0, 0xFF]                        // mov al, 0xff
        c.fillRDIWithAL(count: 4096)
        for n: UInt32 in [0, 1, 0xFFF, 0x100F, 0x1FFF, 0x2000, 0xFFFF_FFFF] {
            c.movEAX(n)
            c.hypercall()
            c.printENOSYS()
        }
        c.resetAndHalt()
        let (exit, console) = try Self.run(c)
        #expect(console == "N1111111", "\(console)")
        #expect(exit.event?.cause == .i8042Reset, "\(String(describing: exit.event))")
    }

    @Test func returnFramesAndPageTablesTheHostRefusesEndOnlyTheGuest() throws {
        // Each ends in a triple fault (the payload has no IDT for the #GP the host raises).
        var nonCanonical = Code()
        nonCanonical.movRBX(0xDEAD_0000_0000_0000); nonCanonical.movEAX(0x100D); nonCanonical.hypercall()
        var notPresent = Code()
        notPresent.movRBX(0x7_0000_0000); notPresent.movEAX(0x100D); notPresent.hypercall()  // beyond the identity map
        var cr3BeyondRAM = Code()
        cr3BeyondRAM.movRBX(0x0DEA_D000); cr3BeyondRAM.movEAX(0x1001); cr3BeyondRAM.hypercall()
        var vifBeyondRAM = Code()
        vifBeyondRAM.wrmsr(PVInterface.vifMSR, 0x1000_0000)
        for (name, code) in [("0x100d, non-canonical frame", nonCanonical), ("0x100d, frame not mapped", notPresent),
                             ("SET_CR3 beyond RAM", cr3BeyondRAM), ("a VIF page beyond RAM", vifBeyondRAM)] {
            var c = code
            c.print("X")  // reached only if the host went on
            c.resetAndHalt()
            let (exit, console) = try Self.run(c)
            #expect(exit.event?.kind == .reset && console.isEmpty, "\(name): \(String(describing: exit.event)), console \(console)")
            if case .tripleFault? = exit.event?.cause {} else { Issue.record("\(name): expected a triple fault, got \(String(describing: exit.event))") }
        }
    }

    @Test func aLivelockedGuestIsStillStoppedAtTheTimeout() throws {
        // A read of a present page without the user bit: the host's shadow MMU refaults for
        // ever (probed: kernel-mode accesses as user-mode ones). The VMM's timeout must still
        // end the run.
        var c = Code()
        c.movRAX(0x80_0000 | 0x83)     // the 2 MiB page at 8 MiB, not touched before: supervisor-only
        c.storeRAX(at: UInt32(Layout.pageDirectoryAddress.raw) + 4 * 8)
        c.bytes += [0x48, 0x8B, 0x04, 0x25] + Code.le(UInt32(0x80_0000))   // mov rax, [0x800000]
        c.print("X")
        c.resetAndHalt()
        let start = ContinuousClock.now
        let (exit, console) = try Self.run(c, timeout: 2)
        let took = ContinuousClock.now - start
        #expect(exit.timedOut && exit.event == nil && console.isEmpty, "\(String(describing: exit.event)) \(console)")
        #expect(took < .seconds(15), "\(took)")
    }
}

import KVM
import Synchronization
import Testing
import CAirlockShim
import Virtio
import VirtioDevices
@testable import VMM

private final class LevelLine: InterruptLine {
    let levels = Mutex<[Bool]>([])
    func setLevel(_ high: Bool) { levels.withLock { $0.append(high) } }
    var last: Bool? { levels.withLock { $0.last } }
}

private final class NullSink: ConsoleOutput {
    func write(_ bytes: UnsafeRawBufferPointer) {}
}

/// The legacy devices' saved states: what goes out comes back, and what a
/// chip cannot hold does not get in.
struct LegacyDeviceStateTests {
    @Test func theUARTsRegistersAndPendingInputRoundTripAndTheLineFollows() throws {
        let uart = Serial16550(interrupt: LevelLine(), output: NullSink())
        uart.write(offset: 3, size: 1, value: 0x83)   // LCR with DLAB
        uart.write(offset: 0, size: 1, value: 0x01)   // DLL: 115200 baud
        uart.write(offset: 3, size: 1, value: 0x03)   // 8N1
        uart.write(offset: 4, size: 1, value: 0x0B)   // DTR, RTS, OUT2
        uart.write(offset: 1, size: 1, value: 0x01)   // receive interrupts
        uart.write(offset: 7, size: 1, value: 0x5A)
        uart.receive(Array("typed".utf8))
        let saved = uart.captureState()
        #expect(saved.divisorLow == 1 && saved.lcr == 3 && saved.mcr == 0x0B && saved.scratch == 0x5A)
        #expect(saved.receive == Array("typed".utf8))

        let line = LevelLine()
        let fresh = Serial16550(interrupt: line, output: NullSink())
        try fresh.restoreState(saved)
        #expect(fresh.captureState() == saved)
        #expect(line.last == true, "data waits and receive interrupts are on: the line is driven high on restore")
        #expect(fresh.read(offset: 0, size: 1) == UInt64(UInt8(ascii: "t")))
    }

    @Test func aUARTStateWithBitsTheChipLacksOrTooMuchInputIsRefused() {
        let base = Serial16550(interrupt: LevelLine(), output: NullSink()).captureState()
        var ier = base
        ier.ier = 0xF0
        #expect(throws: VMMError.self) { try Serial16550(interrupt: LevelLine(), output: NullSink()).restoreState(ier) }
        var mcr = base
        mcr.mcr = 0xE0
        #expect(throws: VMMError.self) { try Serial16550(interrupt: LevelLine(), output: NullSink()).restoreState(mcr) }
        var flood = base
        flood.receive = [UInt8](repeating: 0, count: Serial16550.inputCapacity + 1)
        #expect(throws: VMMError.self) { try Serial16550(interrupt: LevelLine(), output: NullSink()).restoreState(flood) }
    }

    @Test func theI8042RoundTripsAndRefusesAPendingParameterForACommandWithout() throws {
        let a = I8042(onReset: {})
        a.write(offset: 4, size: 1, value: 0x60)
        a.write(offset: 0, size: 1, value: 0x47)
        a.write(offset: 4, size: 1, value: 0x20)
        let saved = a.captureState()
        #expect(saved.commandByte == 0x47 && saved.output == 0x47)
        let b = I8042(onReset: {})
        try b.restoreState(saved)
        #expect(b.read(offset: 0, size: 1) == 0x47)
        var bad = saved
        bad.awaitingParameterFor = 0xD1
        #expect(throws: VMMError.self) { try I8042(onReset: {}).restoreState(bad) }
    }
}

/// What snapshots know of the host's backend, with no KVM.
struct SnapshotHostProfileTests {
    let vif = HostProfile.pvmVIFMSR

    @Test func theModesASnapshotMayComeFromFollowTheProfile() {
        let pvm = HostProfile(backend: .pvm)
        #expect(pvm.snapshotMSRs == [vif])
        #expect(pvm.restorableGuestModes() == [.pvmEmulated, .pvmNative])
        // The emulated path asked for, by the profile or on the command line: no native snapshot.
        #expect(HostProfile(backend: .pvm, pv: .off).restorableGuestModes() == [.pvmEmulated])
        #expect(pvm.restorableGuestModes(extraCommandLine: "loglevel=8 \(HostProfile.pvOffParameter)") == [.pvmEmulated])
        let hw = HostProfile(backend: .hardware)
        #expect(hw.snapshotMSRs.isEmpty && hw.restorableGuestModes() == [.hardware])
    }

    /// Each guest mode boots with its own parameters: a snapshot's command line is checked
    /// against the one for the mode it was made in.
    @Test func eachModeHasItsOwnCommandLine() {
        let lines = HostProfile.GuestMode.allCases.map { Machine.kernelCommandLine(guestMode: $0, virtioDeviceCount: 2, extra: "x=1") }
        #expect(lines.allSatisfy { $0?.hasSuffix(" x=1") == true && $0?.contains("virtio_mmio.device=4K@") == true })
        #expect(lines[1]?.contains(HostProfile.pvOffParameter) == true && lines[2]?.contains(HostProfile.pvOffParameter) == false)
        #expect(Machine.kernelCommandLine(guestMode: .hardware, virtioDeviceCount: Layout.virtioIRQs.count + 1, extra: "") == nil)
    }

    /// A PV-mode vCPU saved in the kernel's idle loop, which the host reports with the
    /// user-mode selectors, is saved in kernel mode; one in user code keeps its own.
    @Test func aPVGuestSavedInItsKernelIsSavedInKernelMode() {
        func state(rip: UInt64) -> VCPUState {
            var regs = [UInt8](repeating: 0, count: MemoryLayout<kvm_regs>.size)
            for i in 0..<8 { regs[128 + i] = UInt8(truncatingIfNeeded: rip >> (8 * UInt64(i))) }
            var sregs = [UInt8](repeating: 0, count: MemoryLayout<kvm_sregs>.size)
            for (offset, selector) in [(0, 0x33), (120, 0x2B)] {
                sregs[offset + 12] = UInt8(selector); sregs[offset + 15] = 1; sregs[offset + 16] = 3
            }
            return VCPUState(cpuid: CPUIDTable(entries: []), regs: regs, sregs: sregs, xsave: [], xcrs: [], lapic: [], events: [],
                             mpState: 3, debugRegisters: [], msrs: [], tscKHz: 0)
        }
        var idle = state(rip: 0xFFFF_FFFF_8120_D0B1)
        let before = idle.sregs
        PVInterface.settleKernelMode(&idle)
        #expect(idle.sregs[12] == 0x10 && idle.sregs[16] == 0 && idle.sregs[120 + 12] == 0x18 && idle.sregs[120 + 16] == 0)
        #expect(idle.sregs[15] == 1, "the other attributes stay")
        #expect(zip(idle.sregs, before).enumerated().filter { $0.element.0 != $0.element.1 }.map(\.offset) == [12, 16, 132, 136])
        var user = state(rip: 0x40_1000)
        let saved = user.sregs
        PVInterface.settleKernelMode(&user)
        #expect(user.sregs == saved)
    }

    @Test func anUnregisteredVIFIsNotWrittenBack() {
        let msrs = [MSREntry(index: 0x10, value: 5), MSREntry(index: vif, value: 0x400)]
        #expect(HostProfile(backend: .pvm).restorableMSRs(msrs) == [MSREntry(index: 0x10, value: 5)])
        let registered = [MSREntry(index: vif, value: 0x5401)]
        #expect(HostProfile(backend: .pvm).restorableMSRs(registered) == registered)
    }

    @Test func theTSCGoesFirstAndItsDeadlineLast() {
        let msrs = [MSREntry(index: 0x6E0, value: 9), MSREntry(index: 0xC000_0081, value: 1), MSREntry(index: 0x10, value: 7)]
        #expect(VCPU.restoreOrder(msrs).map(\.index) == [0x10, 0xC000_0081, 0x6E0])
    }

    @Test func aSavedVCPUOfTheWrongShapeIsRefused() {
        let ok = VCPUState(cpuid: CPUIDTable(entries: []), regs: [UInt8](repeating: 0, count: VCPUState.regsSize),
                           sregs: [UInt8](repeating: 0, count: VCPUState.sregsSize), xsave: [UInt8](repeating: 0, count: 4096),
                           xcrs: [UInt8](repeating: 0, count: VCPUState.xcrsSize), lapic: [UInt8](repeating: 0, count: VCPUState.lapicSize),
                           events: [UInt8](repeating: 0, count: VCPUState.eventsSize), mpState: 0,
                           debugRegisters: [UInt8](repeating: 0, count: VCPUState.debugRegistersSize), msrs: [], tscKHz: 0)
        #expect(throws: Never.self) { try ok.validate(xsaveSize: 4096) }
        #expect(throws: KVMError.self) { try ok.validate(xsaveSize: 8192) }
        var short = ok
        short.regs.removeLast()
        #expect(throws: KVMError.self) { try short.validate(xsaveSize: 4096) }
        var many = ok
        many.msrs = [MSREntry](repeating: MSREntry(index: 1, value: 1), count: VCPUState.maxMSRs + 1)
        #expect(throws: KVMError.self) { try many.validate(xsaveSize: 4096) }
    }
}

import KVM
import Synchronization
import Testing
@testable import VMM

/// A vCPU without KVM: registers and events in memory, calls recorded.
final class FakeVCPU: VCPUControl {
    let id: UInt32 = 0
    var regs = Registers()
    var sregs = SpecialRegisters()
    /// KVM's XSAVE buffer for this vCPU (standard layout).
    var xsave = [UInt8](repeating: 0, count: 4096)
    var xcr0Value: UInt64 = 0x7
    var injected: [UInt8] = []
    var errorCodes: [UInt32?] = []
    var pending = false
    /// Makes setXSAVEArea fail, as KVM does for a buffer it refuses.
    var refuseXSAVE = false
    func registers() throws(KVMError) -> Registers { regs }
    func setRegisters(_ r: Registers) throws(KVMError) { regs = r }
    func injectException(vector: UInt8) throws(KVMError) { injected.append(vector); errorCodes.append(nil) }
    func injectException(vector: UInt8, errorCode: UInt32) throws(KVMError) { injected.append(vector); errorCodes.append(errorCode) }
    func hasPendingEvent() throws(KVMError) -> Bool { pending }
    func specialRegisters() throws(KVMError) -> SpecialRegisters { sregs }
    func injectPageFault(address: UInt64, errorCode: UInt32) throws(KVMError) {
        sregs.cr2 = address  // what KVM does with the payload as it delivers the fault
        injected.append(14); errorCodes.append(errorCode)
    }
    func xsaveArea() throws(KVMError) -> [UInt8] { xsave }
    func setXSAVEArea(_ area: [UInt8]) throws(KVMError) {
        if refuseXSAVE { throw .missingCapability("a valid XSAVE buffer") }
        xsave = area
    }
    func xcr0() throws(KVMError) -> UInt64 { xcr0Value }
}

/// A bus device that records accesses and answers reads with a fixed value.
final class Recorder: BusDevice {
    let log = Mutex<[String]>([])
    let answer: UInt64
    init(answer: UInt64 = 0x1122_3344_5566_7788) { self.answer = answer }
    func read(offset: UInt64, size: Int) -> UInt64 { log.withLock { $0.append("r \(offset) \(size)") }; return answer }
    func write(offset: UInt64, size: Int, value: UInt64) {
        log.withLock { $0.append("w \(offset) \(size) \(String(value, radix: 16))") }
    }
    var entries: [String] { log.withLock { $0 } }
}

@Suite struct ExitHandlerTests {
    func handler(assists: Bool = true, port: Recorder = Recorder(), mmio: Recorder = Recorder()) throws -> ExitHandler {
        var p = Bus(name: "ports")
        try p.insert(port, name: "rec", base: 0x3F8, length: 8)
        var m = Bus(name: "mmio")
        try m.insert(mmio, name: "rec", base: 0xD000_0000, length: 0x1000)
        return ExitHandler(portBus: p, mmioBus: m, emulationAssists: assists)
    }

    @Test func portWritesReachTheDeviceWithRelativeOffsets() throws {
        let dev = Recorder()
        let h = try handler(port: dev)
        var data: [UInt8] = [0x41, 0x42, 0x43]
        let action = try data.withUnsafeMutableBytes { try h.handle(.io(port: 0x3F9, size: 1, count: 3, direction: .write), data: $0, vcpu: FakeVCPU()) }
        #expect(action == .resume)
        #expect(dev.entries == ["w 1 1 41", "w 1 1 42", "w 1 1 43"])
    }

    @Test func portReadsFillTheDataAreaLittleEndian() throws {
        let h = try handler(port: Recorder(answer: 0xAABB_CCDD))
        var data = [UInt8](repeating: 0, count: 4)
        _ = try data.withUnsafeMutableBytes { try h.handle(.io(port: 0x3F8, size: 4, count: 1, direction: .read), data: $0, vcpu: FakeVCPU()) }
        #expect(data == [0xDD, 0xCC, 0xBB, 0xAA])
    }

    @Test func unclaimedPortsReadAllOnes() throws {
        let h = try handler()
        var data = [UInt8](repeating: 0, count: 2)
        _ = try data.withUnsafeMutableBytes { try h.handle(.io(port: 0x80, size: 2, count: 1, direction: .read), data: $0, vcpu: FakeVCPU()) }
        #expect(data == [0xFF, 0xFF])
    }

    @Test func malformedIOExitsTouchNothing() throws {
        let dev = Recorder()
        let h = try handler(port: dev)
        var data = [UInt8](repeating: 7, count: 4)
        for (size, count) in [(3, 1), (8, 1), (1, 5), (4, 2), (1, 0), (0, 1)] {
            _ = try data.withUnsafeMutableBytes { try h.handle(.io(port: 0x3F8, size: size, count: count, direction: .read), data: $0, vcpu: FakeVCPU()) }
        }
        #expect(dev.entries.isEmpty && data == [7, 7, 7, 7])
    }

    @Test func mmioGoesToTheMMIOBus() throws {
        let dev = Recorder()
        let h = try handler(mmio: dev)
        var data: [UInt8] = [1, 2, 3, 4, 0, 0, 0, 0]
        _ = try data.withUnsafeMutableBytes { try h.handle(.mmio(address: 0xD000_0070, length: 4, direction: .write), data: $0, vcpu: FakeVCPU()) }
        _ = try data.withUnsafeMutableBytes { try h.handle(.mmio(address: 0xD000_0000, length: 8, direction: .read), data: $0, vcpu: FakeVCPU()) }
        #expect(dev.entries == ["w 112 4 4030201", "r 0 8"])
        #expect(data == [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11])
    }

    @Test func haltWithInterruptsOffAndNothingPendingEndsTheRun() throws {
        let h = try handler()
        let vcpu = FakeVCPU()
        vcpu.regs.rip = 0x1234
        vcpu.regs.rflags = 0x2
        let action = try h.handle(.hlt, data: .init(start: nil, count: 0), vcpu: vcpu)
        #expect(action == .stop(SystemEvent(kind: .crash, cause: .haltedForever(rip: 0x1234), vcpu: 0)))
        vcpu.regs.rflags = 0x202
        #expect(try h.handle(.hlt, data: .init(start: nil, count: 0), vcpu: vcpu) == .resume)
        vcpu.regs.rflags = 0x2
        vcpu.pending = true
        #expect(try h.handle(.hlt, data: .init(start: nil, count: 0), vcpu: vcpu) == .resume)
    }

    @Test func everyGuestEndBecomesASystemEvent() throws {
        let h = try handler()
        let vcpu = FakeVCPU()
        vcpu.regs.rip = 0xFFFF_FFFF_8100_0000
        let none = UnsafeMutableRawBufferPointer(start: nil, count: 0)
        #expect(try h.handle(.shutdown, data: none, vcpu: vcpu) == .stop(SystemEvent(kind: .reset, cause: .tripleFault(rip: 0xFFFF_FFFF_8100_0000), vcpu: 0)))
        #expect(try h.handle(.systemEvent(type: 1, data: [0]), data: none, vcpu: vcpu) == .stop(SystemEvent(kind: .shutdown, cause: .kvmSystemEvent(type: 1, data: [0]), vcpu: 0)))
        #expect(try h.handle(.systemEvent(type: 2, data: []), data: none, vcpu: vcpu) == .stop(SystemEvent(kind: .reset, cause: .kvmSystemEvent(type: 2, data: []), vcpu: 0)))
        if case let .stop(e) = try h.handle(.systemEvent(type: 3, data: [7]), data: none, vcpu: vcpu) {
            #expect(e.kind == .crash)
            #expect(e.description == "crash on vCPU 0: KVM_SYSTEM_EVENT_CRASH data 0x7")
        } else { Issue.record("crash event not stopped") }
    }

    /// data[0] flags, data[1] = length byte then instruction bytes.
    static func emulationFailure(_ bytes: [UInt8]) -> VCPUExit {
        var raw = [UInt8(bytes.count)] + bytes
        raw += [UInt8](repeating: 0, count: 16 - raw.count)
        let w1 = raw[0..<8].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << UInt64(8 * $1.offset) }
        let w2 = raw[8..<16].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << UInt64(8 * $1.offset) }
        return .internalError(suberror: 1, data: [1, w1, w2])
    }

    @Test func failedInstructionBytesAreDecoded() {
        guard case let .internalError(_, data) = Self.emulationFailure([0x0F, 0x01, 0xCA]) else { return }
        #expect(ExitHandler.failedInstruction(data) == [0x0F, 0x01, 0xCA])
        #expect(ExitHandler.failedInstruction([1]) == [])
        #expect(ExitHandler.failedInstruction([1, 0xFF]).count == 7)  // a lying length is clamped to what is there
    }

    @Test func int3AssistAdvancesRIPAndInjectsBreakpoint() throws {
        let h = try handler(assists: true)
        let vcpu = FakeVCPU()
        vcpu.regs.rip = 0x1000
        #expect(try h.handle(Self.emulationFailure([0xCC]), data: .init(start: nil, count: 0), vcpu: vcpu) == .resume)
        #expect(vcpu.regs.rip == 0x1001 && vcpu.injected == [3])
    }

    @Test func fwaitAssistOnlyAdvancesRIP() throws {
        let h = try handler(assists: true)
        let vcpu = FakeVCPU()
        vcpu.regs.rip = 0x2000
        #expect(try h.handle(Self.emulationFailure([0x9B]), data: .init(start: nil, count: 0), vcpu: vcpu) == .resume)
        #expect(vcpu.regs.rip == 0x2001 && vcpu.injected.isEmpty)
    }

    @Test func otherEmulationFailuresEndWithTheBytesAndRIP() throws {
        let h = try handler(assists: true)
        let vcpu = FakeVCPU()
        vcpu.regs.rip = 0xFFFF_FFFF_8123_4567
        #expect(throws: VMMError.self) { try h.handle(Self.emulationFailure([0x0F, 0xC7, 0x0E]), data: .init(start: nil, count: 0), vcpu: vcpu) }
        do {
            _ = try h.handle(Self.emulationFailure([0x0F, 0xC7, 0x0E]), data: .init(start: nil, count: 0), vcpu: vcpu)
        } catch {
            #expect(error.description.contains("0xffffffff81234567") && error.description.contains("0f c7 0e"))
        }
    }

    @Test func assistsAreOffOnHardwareHosts() throws {
        let h = try handler(assists: false)
        let vcpu = FakeVCPU()
        #expect(throws: VMMError.self) { try h.handle(Self.emulationFailure([0xCC]), data: .init(start: nil, count: 0), vcpu: vcpu) }
        #expect(vcpu.injected.isEmpty && vcpu.regs.rip == 0)
    }

    @Test func unknownExitsNameTheExitAndRIP() throws {
        let h = try handler()
        let vcpu = FakeVCPU()
        vcpu.regs.rip = 0xABC
        do {
            _ = try h.handle(.unhandled(reason: 42), data: .init(start: nil, count: 0), vcpu: vcpu)
            Issue.record("expected an error")
        } catch {
            #expect(error.description.contains("exit reason 42") && error.description.contains("0xabc"))
        }
    }

    @Test func hostProfileAppliesOnlyOnPVM() {
        #expect(HostProfile(backend: .hardware).commandLineParameters.isEmpty)
        #expect(!HostProfile(backend: .hardware).emulationAssists)
        let pvm = HostProfile(backend: .pvm)
        // XSAVE stays on (the VMM completes it); only the compacted/optimised forms are masked.
        #expect(!pvm.commandLineParameters.contains("noxsave") && pvm.emulationAssists && pvm.extendedStateAssist)
        #expect(pvm.commandLineParameters.contains { $0.hasPrefix("clearcpuid=") && $0.contains("xsaves") && $0.contains("xsavec") && $0.contains("xsaveopt") })
        #expect(HostProfile.detect(sysModule: "/nonexistent").backend == .hardware)
    }
}

/// Which mode a guest gets (hardware, PVM emulated, PVM native) and what each mode passes.
@Suite struct GuestModeTests {
    @Test func nativeOnlyWithTheInterfaceAndAKernelThatSaysItCanStartThere() {
        let pvm = HostProfile(backend: .pvm)
        #expect(pvm.guestMode(interfacePresent: true, kernelStartsInPVMode: true) == .pvmNative)
        #expect(pvm.guestMode(interfacePresent: false, kernelStartsInPVMode: true) == .pvmEmulated)
        // An older kernel would livelock the host in native mode: its early page tables lack the user bit.
        #expect(pvm.guestMode(interfacePresent: true, kernelStartsInPVMode: false) == .pvmEmulated)
        let hardware = HostProfile(backend: .hardware)
        #expect(hardware.guestMode(interfacePresent: true, kernelStartsInPVMode: true) == .hardware)
    }

    @Test func nativeModeNeedsFSGSBASE() {
        // The guest kernel's PV mode moves GS bases with rdgsbase/wrgsbase at hardware ring 3,
        // which needs the host kernel's CR4.FSGSBASE: AT_HWCAP2 bit 1.
        #expect(PVInterface.cpuSuitsGuestKernel(hwcap2: 0b10))
        #expect(PVInterface.cpuSuitsGuestKernel(hwcap2: 0b11))
        #expect(!PVInterface.cpuSuitsGuestKernel(hwcap2: 0))
        #expect(!PVInterface.cpuSuitsGuestKernel(hwcap2: 0b01))
    }

    @Test func theEmulatedPathCanBeForced() {
        #expect(HostProfile(backend: .pvm, pv: .off).guestMode(interfacePresent: true, kernelStartsInPVMode: true) == .pvmEmulated)
        let auto = HostProfile(backend: .pvm)
        #expect(auto.guestMode(interfacePresent: true, kernelStartsInPVMode: true, extraCommandLine: "quiet airlock.pv=off") == .pvmEmulated)
        // Only the whole word counts.
        #expect(auto.guestMode(interfacePresent: true, kernelStartsInPVMode: true, extraCommandLine: "xairlock.pv=offx") == .pvmNative)
        #expect(HostProfile.detect(sysModule: "/nonexistent", environment: ["AIRLOCK_PV": "off"]).pv == .off)
        #expect(HostProfile.detect(sysModule: "/nonexistent", environment: [:]).pv == .auto)
        #expect(HostProfile.detect(sysModule: "/nonexistent", environment: ["AIRLOCK_PV": "bogus"]).pv == .auto)
        // Left to the kernel: native, but the VMM registers nothing and the first instructions are emulated.
        let kernel = HostProfile(backend: .pvm, pv: .kernel)
        #expect(kernel.guestMode(interfacePresent: true, kernelStartsInPVMode: true) == .pvmNative)
        #expect(!kernel.vmmRegistersVIF(in: .pvmNative) && kernel.startsEmulated(in: .pvmNative))
        #expect(auto.vmmRegistersVIF(in: .pvmNative) && !auto.startsEmulated(in: .pvmNative) && auto.startsEmulated(in: .pvmEmulated))
    }

    /// The supervisor detects the profile and the PV preference (the jailed VMM has neither /sys
    /// nor the caller's environment): both cross the session in the wire name.
    @Test func theWireNameCarriesTheBackendAndThePVPreference() {
        for backend in [HostProfile.Backend.hardware, .pvm] {
            for pv in [HostProfile.PVPreference.auto, .off, .kernel] {
                let profile = HostProfile(backend: backend, pv: pv)
                #expect(HostProfile(wireName: profile.wireName) == profile, "\(profile.wireName)")
            }
        }
        #expect(HostProfile(backend: .pvm).wireName == "pvm")
        #expect(HostProfile(backend: .pvm, pv: .off).wireName == "pvm pv=off")
        for bad in ["", "pvm ", "pvm pv=", "pvm pv=auto", "pvm pv=bogus", "pvm pv=off x", "kvm", "PVM"] {
            #expect(HostProfile(wireName: bad) == nil, "'\(bad)'")
        }
    }

    @Test func eachModeGetsItsOwnCommandLineAndAssists() {
        // Native: XSAVE, rodata protection and the CPU features the kernel clears itself need nothing.
        #expect(HostProfile.commandLineParameters(for: .pvmNative).isEmpty)
        #expect(HostProfile.commandLineParameters(for: .hardware).isEmpty)
        // Emulated: the emulator's masks, and the kernel must not register a VIF page on its own.
        let emulated = HostProfile.commandLineParameters(for: .pvmEmulated)
        #expect(emulated.contains("airlock.pv=off") && emulated.contains("rodata=off") && emulated.contains { $0.hasPrefix("clearcpuid=") })
        #expect(HostProfile(backend: .pvm).commandLineParameters == emulated)
        #expect(HostProfile.emulationAssists(for: .pvmEmulated) && HostProfile.extendedStateAssist(for: .pvmEmulated))
        for mode in [HostProfile.GuestMode.pvmNative, .hardware] {
            #expect(!HostProfile.emulationAssists(for: mode) && !HostProfile.extendedStateAssist(for: mode))
        }
        #expect(HostProfile.GuestMode.allCases.map(\.rawValue) == ["hardware", "pvm-emulated", "pvm-native"])
    }
}

@Suite struct KVMDeviceErrorTests {
    @Test func missingDevKVMSaysWhatToDo() {
        do {
            _ = try KVMSystem(path: "/nonexistent/kvm")
            Issue.record("opened a device that does not exist")
        } catch {
            #expect(error.description.contains("/nonexistent/kvm does not exist"))
            #expect(error.description.contains("kvm module"))
        }
    }

    @Test func inaccessibleDevKVMSaysWhatToDo() {
        // /proc/version is not a KVM device: opening it O_RDWR fails with EACCES.
        do {
            _ = try KVMSystem(path: "/proc/version")
            Issue.record("opened /proc/version as KVM")
        } catch {
            #expect(error.description.contains("not accessible") || error.description.contains("KVM"))
        }
    }
}

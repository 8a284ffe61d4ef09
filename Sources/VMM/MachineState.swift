import GuestMemory
import KVM
import Virtio
import VirtioDevices

/// A whole machine as plain values: what a snapshot holds besides guest RAM.
/// Taken from a paused machine (`Machine.captureState`) and given to one built
/// from the RAM image with the same devices (`Machine.restore`).
public struct MachineState: Equatable, Sendable {
    public var memoryBytes: UInt64
    public var vcpus: [VCPUState]
    public var vm: VMState
    public var serial: SerialState
    public var i8042: I8042State
    /// The virtio devices in the order they were added (and the guest numbered them).
    public var virtio: [VirtioState]

    public init(memoryBytes: UInt64, vcpus: [VCPUState], vm: VMState, serial: SerialState, i8042: I8042State, virtio: [VirtioState]) {
        self.memoryBytes = memoryBytes; self.vcpus = vcpus; self.vm = vm
        self.serial = serial; self.i8042 = i8042; self.virtio = virtio
    }
}

/// One virtio device behind its transport.
public struct VirtioState: Equatable, Sendable {
    public var transport: TransportState
    public var device: VirtioDeviceState
    public init(transport: TransportState, device: VirtioDeviceState) {
        self.transport = transport
        self.device = device
    }
}

/// The device models a snapshot knows how to save.
public enum VirtioDeviceState: Equatable, Sendable {
    case block(BlockDeviceState)
    case console(ConsoleDeviceState)

    public var deviceID: UInt32 {
        switch self {
        case .block: return VirtioDeviceID.block
        case .console: return VirtioDeviceID.console
        }
    }

    public var kind: String {
        switch self {
        case .block: return "block"
        case .console: return "console"
        }
    }
}

extension Machine {
    static func firstDifference(_ a: CPUIDTable, _ b: CPUIDTable) -> String {
        if a.entries.count != b.entries.count { return "\(a.entries.count) leaves against \(b.entries.count)" }
        for (x, y) in zip(a.entries, b.entries) where x != y {
            return "leaf 0x\(String(x.function, radix: 16)).\(x.index)"
        }
        return "none"
    }

    /// The MSRs a snapshot saves for each vCPU: every one KVM lists, and the
    /// host profile's own (PVM's VIF registration, which KVM does not list).
    public func snapshotMSRIndices() throws(VMMError) -> [UInt32] {
        do { return try snapshotSupport.get() } catch { throw .kvm(error) }
    }

    /// Saves the whole machine. Only while no vCPU runs: after `pause` made
    /// `run` return (each vCPU then completed its last exit), or before the first `run`.
    public func captureState() throws(VMMError) -> MachineState {
        guard !isRunning else {
            throw .invalidState("the machine is running: pause it (and wait for run to return) before saving it")
        }
        let indices = try snapshotMSRIndices()
        var vcpuStates: [VCPUState] = []
        let vmState: VMState
        do {
            for (v, cpuid) in zip(vcpus, guestCPUIDs) {
                var state = try v.captureState(cpuid: cpuid, msrIndices: indices, xsaveSize: xsaveSize)
                if guestMode == .pvmNative { PVInterface.settleKernelMode(&state) }
                vcpuStates.append(state)
            }
            vmState = try vm.captureState()
        } catch { throw .kvm(error) }
        var devices: [VirtioState] = []
        for (i, entry) in virtioEntries.enumerated() {
            let device: VirtioDeviceState
            let transport: TransportState
            switch entry.device {
            case let block as BlockDevice:
                (transport, device) = entry.transport.captureState { .block(block.captureState()) }
            case let console as ConsoleDevice:
                (transport, device) = entry.transport.captureState { .console(console.captureState()) }
            default:
                throw .invalidState("virtio device #\(i) (device ID \(entry.device.deviceID)) cannot be saved: snapshots know block and console devices")
            }
            devices.append(VirtioState(transport: transport, device: device))
        }
        return MachineState(memoryBytes: config.memoryBytes, vcpus: vcpuStates, vm: vmState,
                            serial: serial.captureState(), i8042: i8042.captureState(), virtio: devices)
    }

    /// Gives a machine built from a RAM image (`MachineConfig.memoryImage`),
    /// with the same devices added in the same order, the rest of its saved
    /// state. Everything is checked against this machine before KVM is told
    /// anything: the memory size, the vCPU count, each device's kind and
    /// geometry, and each saved record's own rules; a state that does not fit
    /// throws and the machine must not be run. `guestMode` is the mode the saved guest
    /// kernel ran in (its manifest's): a native one must be one this host and profile
    /// allow, and its VIF registration comes back with the MSRs.
    public func restore(_ s: MachineState, guestMode mode: HostProfile.GuestMode) throws(VMMError) {
        guard config.memoryImage != nil else {
            throw .invalidState("a machine booted from zeroed RAM cannot take a saved state: build it with the snapshot's memory image")
        }
        guard !isRunning else { throw .invalidState("the machine is already running") }
        guard s.memoryBytes == config.memoryBytes else {
            throw .invalidState("the snapshot's guest has \(s.memoryBytes >> 20) MiB of RAM, this machine \(config.memoryBytes >> 20) MiB")
        }
        switch (config.hostProfile.backend, mode) {
        case (.hardware, .hardware), (.pvm, .pvmEmulated): break
        case (.pvm, .pvmNative):
            guard pvInterfacePresent, config.hostProfile.pv != .off else {
                throw .invalidState(config.hostProfile.pv == .off
                    ? "the snapshot's guest kernel ran natively (PV mode), and this sandbox asks for the emulated path (pv=off)"
                    : "the snapshot's guest kernel ran natively (PV mode), which this host's paravirtual interface does not offer here")
            }
        default:
            throw .invalidState("the snapshot's guest ran in mode \(mode.rawValue), which a \(config.hostProfile.backend.rawValue) host does not run")
        }
        guard s.vcpus.count == vcpus.count else {
            throw .invalidState("the snapshot has \(s.vcpus.count) vCPUs, this machine \(vcpus.count)")
        }
        guard s.virtio.count == virtioEntries.count else {
            throw .invalidState("the snapshot has \(s.virtio.count) virtio devices, this machine \(virtioEntries.count)")
        }
        for (i, (saved, entry)) in zip(s.virtio, virtioEntries).enumerated() where saved.device.deviceID != entry.device.deviceID {
            throw .invalidState("virtio device #\(i) is a \(saved.device.kind) device in the snapshot, device ID \(entry.device.deviceID) here")
        }
        do throws(KVMError) {
            for v in s.vcpus { try v.validate(xsaveSize: xsaveSize) }
            try s.vm.validate()
            _ = try snapshotSupport.get()
            // The CPU the guest saw must be the one this host gives: the guest kernel chose
            // its code paths (and the XSAVE layout) by it. And its clock runs at one TSC rate.
            let supported = try kvm.supportedCPUID()
            for (i, (v, saved)) in zip(vcpus, s.vcpus).enumerated() {
                let here = CPUSetup.guestCPUID(supported, vcpuID: UInt32(i), vcpuCount: UInt32(vcpus.count))
                guard here == saved.cpuid else {
                    throw KVMError.invalidState("the snapshot's guest saw other CPU features than this host gives (CPUID \(Self.firstDifference(saved.cpuid, here))): it was made on another kind of CPU or KVM")
                }
                let khz = v.tscKHz()
                guard saved.tscKHz == 0 || khz == 0 || saved.tscKHz == khz else {
                    throw KVMError.invalidState("the snapshot's vCPU ran its TSC at \(saved.tscKHz) kHz, this host's at \(khz) kHz: the guest's clock would run wrong")
                }
            }
            for (v, saved) in zip(vcpus, s.vcpus) {
                var state = saved
                state.msrs = config.hostProfile.restorableMSRs(state.msrs)
                try v.restoreState(state, xsaveSize: xsaveSize)
            }
            try vm.restoreState(s.vm)
        } catch { throw .kvm(error) }
        guestCPUIDs = s.vcpus.map(\.cpuid)
        guestMode = mode
        // Devices after the irqchip: each drives its interrupt line to its saved level,
        // which a later KVM_SET_IRQCHIP would undo.
        try serial.restoreState(s.serial)
        try i8042.restoreState(s.i8042)
        for (i, (saved, entry)) in zip(s.virtio, virtioEntries).enumerated() {
            let name = "virtio device #\(i)"
            do throws(StateError) {
                switch (saved.device, entry.device) {
                case let (.block(b), device as BlockDevice):
                    try entry.transport.restoreState(saved.transport, name: name) { () throws(StateError) in try device.restoreState(b, name: name) }
                case let (.console(c), device as ConsoleDevice):
                    try entry.transport.restoreState(saved.transport, name: name) { () throws(StateError) in try device.restoreState(c, name: name) }
                default:
                    throw StateError("\(name): the snapshot's \(saved.device.kind) device does not match the device added here")
                }
            } catch { throw .invalidState(error.description) }
        }
        markLoaded()
    }
}

import KVM
import Virtio
import VirtioDevices
import VMM

/// The byte layout of a snapshot's manifest and machine-state sections
/// (format version 1). Fields go in a fixed order, integers little-endian,
/// byte strings and lists with a u32 count first. Decoding checks every count
/// against a limit before reading, and `finish` checks nothing is left over;
/// what the values mean is checked where they are used (`Machine.restore`
/// and the devices' `restoreState`), as a driver's writes are.
enum StateCodec {
    enum Limit {
        static let vcpus = 256
        static let cpuidEntries = 256
        static let msrs = VCPUState.maxMSRs
        static let blob = VCPUState.maxXSAVESize
        static let virtioDevices = 64
        static let queues = 1024
        static let ports = 64
        static let text = 64 << 10
        static let controlMessages = 4096
    }

    // MARK: Manifest

    static func encode(_ m: SnapshotManifest) -> [UInt8] {
        var w = ByteWriter()
        w.u64(m.createdAt)
        w.string(m.kernelSHA256)
        w.string(m.rootfsSHA256)
        w.string(m.commandLine)
        w.string(m.hostBackend)
        w.string(m.guestMode)
        w.u64(m.memoryBytes)
        w.count(m.vcpuCount)
        w.u32(m.tscKHz)
        w.count(m.xsaveSize)
        encode(m.cpuid, &w)
        w.count(m.dataPages)
        return w.bytes
    }

    static func decodeManifest(_ bytes: [UInt8]) throws(DecodeError) -> SnapshotManifest {
        var r = ByteReader(bytes)
        let m = SnapshotManifest(
            createdAt: try r.u64("creation time"),
            kernelSHA256: try r.string("kernel SHA-256", limit: 128),
            rootfsSHA256: try r.string("root filesystem SHA-256", limit: 128),
            commandLine: try r.string("command line", limit: Limit.text),
            hostBackend: try r.string("host backend", limit: 64),
            guestMode: try r.string("guest mode", limit: 64),
            memoryBytes: try r.u64("memory size"),
            vcpuCount: try r.count("vCPU count", limit: Limit.vcpus),
            tscKHz: try r.u32("TSC kHz"),
            xsaveSize: try r.count("XSAVE size", limit: Limit.blob),
            cpuid: try decodeCPUID(&r),
            dataPages: try r.count("data pages"))
        try r.finish("the manifest")
        return m
    }

    static func encode(_ t: CPUIDTable, _ w: inout ByteWriter) {
        w.u32(UInt32(t.entries.count))
        for e in t.entries {
            for v in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] { w.u32(v) }
        }
    }

    static func decodeCPUID(_ r: inout ByteReader) throws(DecodeError) -> CPUIDTable {
        let n = try r.elements("CPUID leaves", limit: Limit.cpuidEntries)
        var entries: [CPUIDEntry] = []
        for _ in 0..<n {
            entries.append(CPUIDEntry(function: try r.u32("CPUID function"), index: try r.u32("CPUID index"),
                                      flags: try r.u32("CPUID flags"), eax: try r.u32("CPUID eax"), ebx: try r.u32("CPUID ebx"),
                                      ecx: try r.u32("CPUID ecx"), edx: try r.u32("CPUID edx")))
        }
        return CPUIDTable(entries: entries)
    }

    // MARK: Machine state

    static func encode(_ s: MachineState) -> [UInt8] {
        var w = ByteWriter()
        w.u64(s.memoryBytes)
        w.u32(UInt32(s.vcpus.count))
        for v in s.vcpus {
            encode(v.cpuid, &w)
            for blob in [v.regs, v.sregs, v.xsave, v.xcrs, v.lapic, v.events, v.debugRegisters] { w.data(blob) }
            w.u32(v.mpState)
            w.u32(UInt32(v.msrs.count))
            for m in v.msrs { w.u32(m.index); w.u64(m.value) }
            w.u32(v.tscKHz)
        }
        w.u32(UInt32(s.vm.irqChips.count))
        for c in s.vm.irqChips { w.data(c) }
        w.data(s.vm.pit)
        w.u64(s.vm.clock)
        let u = s.serial
        for b in [u.divisorLow, u.divisorHigh, u.ier, u.lcr, u.mcr, u.scratch] { w.u8(b) }
        w.bool(u.fifosEnabled)
        w.bool(u.transmitEmptyPending)
        w.data(u.receive)
        w.count(u.droppedInput)
        w.u8(s.i8042.commandByte)
        w.optionalU8(s.i8042.awaitingParameterFor)
        w.optionalU8(s.i8042.output)
        w.bool(s.i8042.resetReported)
        w.u32(UInt32(s.virtio.count))
        for d in s.virtio {
            encode(d.transport, &w)
            switch d.device {
            case let .block(b):
                w.u8(1)
                w.u64(b.sectors)
                w.bool(b.readOnly)
                w.count(b.requests)
                w.count(b.errors)
            case let .console(c):
                w.u8(2)
                w.u32(UInt32(c.ports.count))
                for p in c.ports {
                    w.string(p.name)
                    w.data(p.input)
                    w.count(p.droppedInput)
                    w.bool(p.guestReady)
                    w.bool(p.guestOpen)
                }
                w.u32(UInt32(c.control.count))
                for m in c.control { w.data(m) }
                w.count(c.droppedControl)
                w.bool(c.driverReady)
                w.count(c.malformedControl)
                w.u64(c.oversizedTransmitBytes)
            }
        }
        return w.bytes
    }

    static func encode(_ t: TransportState, _ w: inout ByteWriter) {
        w.u32(t.status)
        w.u32(t.deviceFeaturesSel)
        w.u32(t.driverFeaturesSel)
        w.u64(t.driverFeatures)
        w.u32(t.queueSel)
        w.u32(t.interruptStatus)
        w.u32(t.configGeneration)
        w.count(t.queueErrors)
        w.u32(UInt32(t.queues.count))
        for q in t.queues {
            w.u16(q.maxSize)
            w.u16(q.size)
            w.bool(q.ready)
            w.u64(q.descriptorTable)
            w.u64(q.availableRing)
            w.u64(q.usedRing)
            w.bool(q.indirectAllowed)
            w.u16(q.nextAvailable)
            w.u16(q.nextUsed)
        }
    }

    static func decodeState(_ bytes: [UInt8]) throws(DecodeError) -> MachineState {
        var r = ByteReader(bytes)
        let memoryBytes = try r.u64("memory size")
        var vcpus: [VCPUState] = []
        for i in 0..<(try r.elements("vCPUs", limit: Limit.vcpus)) {
            let cpuid = try decodeCPUID(&r)
            var blobs: [[UInt8]] = []
            for name in ["regs", "sregs", "xsave", "xcrs", "lapic", "events", "debug registers"] {
                blobs.append(try r.data("vCPU \(i) \(name)", limit: Limit.blob))
            }
            let mp = try r.u32("vCPU \(i) MP state")
            var msrs: [MSREntry] = []
            for _ in 0..<(try r.elements("vCPU \(i) MSRs", limit: Limit.msrs)) {
                msrs.append(MSREntry(index: try r.u32("MSR index"), value: try r.u64("MSR value")))
            }
            let khz = try r.u32("vCPU \(i) TSC kHz")
            vcpus.append(VCPUState(cpuid: cpuid, regs: blobs[0], sregs: blobs[1], xsave: blobs[2], xcrs: blobs[3], lapic: blobs[4],
                                   events: blobs[5], mpState: mp, debugRegisters: blobs[6], msrs: msrs, tscKHz: khz))
        }
        var chips: [[UInt8]] = []
        for i in 0..<(try r.elements("interrupt controllers", limit: 8)) {
            chips.append(try r.data("interrupt controller \(i)", limit: Limit.blob))
        }
        let vm = VMState(irqChips: chips, pit: try r.data("PIT", limit: Limit.blob), clock: try r.u64("kvmclock"))
        let serial = SerialState(
            divisorLow: try r.u8("UART DLL"), divisorHigh: try r.u8("UART DLM"), ier: try r.u8("UART IER"), lcr: try r.u8("UART LCR"),
            mcr: try r.u8("UART MCR"), scratch: try r.u8("UART scratch"), fifosEnabled: try r.bool("UART FIFOs"),
            transmitEmptyPending: try r.bool("UART THRE pending"), receive: try r.data("UART input", limit: Limit.blob),
            droppedInput: try r.count("UART dropped input"))
        let i8042 = I8042State(commandByte: try r.u8("i8042 command byte"), awaitingParameterFor: try r.optionalU8("i8042 pending command"),
                               output: try r.optionalU8("i8042 output"), resetReported: try r.bool("i8042 reset reported"))
        var virtio: [VirtioState] = []
        for i in 0..<(try r.elements("virtio devices", limit: Limit.virtioDevices)) {
            let transport = try decodeTransport(&r, device: i)
            let device: VirtioDeviceState
            switch try r.u8("virtio device \(i) kind") {
            case 1:
                device = .block(BlockDeviceState(sectors: try r.u64("disk sectors"), readOnly: try r.bool("disk read-only"),
                                                 requests: try r.count("disk requests"), errors: try r.count("disk errors")))
            case 2:
                var ports: [ConsoleDeviceState.Port] = []
                for _ in 0..<(try r.elements("console ports", limit: Limit.ports)) {
                    ports.append(ConsoleDeviceState.Port(
                        name: try r.string("port name", limit: 4096), input: try r.data("port input", limit: ConsoleDevice.inputCapacity),
                        droppedInput: try r.count("port dropped input"), guestReady: try r.bool("port ready"), guestOpen: try r.bool("port open")))
                }
                var control: [[UInt8]] = []
                for _ in 0..<(try r.elements("control messages", limit: Limit.controlMessages)) {
                    control.append(try r.data("control message", limit: ConsoleDevice.maxControlMessage))
                }
                device = .console(ConsoleDeviceState(ports: ports, control: control, droppedControl: try r.count("dropped control messages"),
                                                     driverReady: try r.bool("console driver ready"),
                                                     malformedControl: try r.count("malformed control messages"),
                                                     oversizedTransmitBytes: try r.u64("oversized transmit bytes")))
            case let kind:
                throw DecodeError("virtio device \(i) is of kind \(kind), which this Airlock does not know")
            }
            virtio.append(VirtioState(transport: transport, device: device))
        }
        try r.finish("the machine state")
        return MachineState(memoryBytes: memoryBytes, vcpus: vcpus, vm: vm, serial: serial, i8042: i8042, virtio: virtio)
    }

    static func decodeTransport(_ r: inout ByteReader, device i: Int) throws(DecodeError) -> TransportState {
        let status = try r.u32("virtio device \(i) status")
        let dfs = try r.u32("device features select")
        let drfs = try r.u32("driver features select")
        let features = try r.u64("driver features")
        let queueSel = try r.u32("queue select")
        let interruptStatus = try r.u32("interrupt status")
        let generation = try r.u32("config generation")
        let errors = try r.count("queue errors")
        var queues: [QueueState] = []
        for _ in 0..<(try r.elements("queues of virtio device \(i)", limit: Limit.queues)) {
            queues.append(QueueState(maxSize: try r.u16("queue max size"), size: try r.u16("queue size"), ready: try r.bool("queue ready"),
                                     descriptorTable: try r.u64("descriptor table"), availableRing: try r.u64("available ring"),
                                     usedRing: try r.u64("used ring"), indirectAllowed: try r.bool("indirect allowed"),
                                     nextAvailable: try r.u16("next available"), nextUsed: try r.u16("next used")))
        }
        return TransportState(status: status, deviceFeaturesSel: dfs, driverFeaturesSel: drfs, driverFeatures: features, queueSel: queueSel,
                              queues: queues, interruptStatus: interruptStatus, configGeneration: generation, queueErrors: errors)
    }
}

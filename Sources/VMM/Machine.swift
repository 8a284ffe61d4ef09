import AirlockOS
import CAirlockShim
import Dispatch
import GuestMemory
import KVM
import LinuxBoot
import Logging
import Synchronization
import Virtio
import VirtioDevices
#if canImport(Glibc)
import Glibc
#endif

/// Interrupt line of the in-kernel irqchip, driven with KVM_IRQ_LINE.
struct KVMInterruptLine: InterruptLine {
    let vm: VirtualMachine
    let irq: UInt32
    let logger: Logger
    func setLevel(_ high: Bool) {
        do { try vm.setIRQLine(irq, high: high) } catch {
            logger.error("raising IRQ \(irq) failed: \(error)")
        }
    }
}

/// Puts a virtio-mmio transport on the MMIO bus.
final class VirtioMMIODevice: BusDevice {
    let transport: MMIOTransport
    init(_ transport: MMIOTransport) { self.transport = transport }
    func read(offset: UInt64, size: Int) -> UInt64 { transport.read(offset: offset, size: size) }
    func write(offset: UInt64, size: Int, value: UInt64) { transport.write(offset: offset, size: size, value: value) }
}

/// What a machine run ended with.
public struct MachineExit: Sendable {
    /// The guest's own end, or nil when the host stopped it (timeout).
    public let event: SystemEvent?
    public let timedOut: Bool
    public let timings: MachineTimings
    /// The vCPUs stopped because `pause` asked: the machine is whole and `run` goes on with it.
    public var paused: Bool = false
    /// How the guest kernel ran (the mode the VMM set it up in).
    public var guestMode: HostProfile.GuestMode = .hardware
}

/// Monotonic timestamps (ns) of a machine's life, for `--json` and benchmarks.
public struct MachineTimings: Sendable {
    public var created: UInt64 = 0
    public var loaded: UInt64 = 0
    public var firstRun: UInt64 = 0
    public var stopped: UInt64 = 0
}

/// The options a machine is built from.
public struct MachineConfig: Sendable {
    public var memoryBytes: UInt64 = 256 << 20
    public var vcpuCount: Int = 1
    public var hostProfile: HostProfile = .detect()
    public var console: any ConsoleOutput = FileDescriptorSink(fd: 1)
    public var kvmPath: String = KVMSystem.defaultPath
    /// An open /dev/kvm to use instead of opening `kvmPath` (a jailed VMM has no /dev).
    public var kvm: KVMSystem?
    public var logger = Logger(label: "airlock.vmm")
    /// Runs first on each vCPU thread, before its first KVM_RUN (the jailer
    /// installs the vCPU seccomp filter here); an error fails that vCPU.
    public var vcpuThreadSetup: (@Sendable (_ vcpu: UInt32) throws -> Void)?
    /// Guest RAM from a saved image instead of zeros (a snapshot's): the
    /// machine is then built without boot-time CPU state, and `restore` gives
    /// it the saved one.
    public var memoryImage: MemoryImage?
    public init() {}
}

/// A file that holds a saved guest RAM image: the regions back to back from `offset`.
public struct MemoryImage: Sendable {
    public let file: OwnedFileDescriptor
    public let offset: UInt64
    public init(file: OwnedFileDescriptor, offset: UInt64) {
        self.file = file
        self.offset = offset
    }
}

/// One virtual machine: KVM objects, guest memory, devices and vCPU threads.
///
/// Built in two steps, so the same machine can run a Linux kernel or (in tests
/// and benchmarks) a raw 64-bit payload: `Machine(config)` creates the VM, RAM,
/// devices and CPU state; `loadLinux` or `loadPayload` sets the entry; `run` runs it.
public final class Machine: @unchecked Sendable {
    // @unchecked: set-up happens on one thread before `run`; during `run` the
    // vCPU threads touch only their own runner and the Sendable devices.
    public let config: MachineConfig
    public let memory: GuestMemory
    public let vm: VirtualMachine
    public let kvm: KVMSystem
    let vcpus: [VCPU]
    /// The CPUID table each vCPU was given (snapshots record it; a restore sets the saved one).
    var guestCPUIDs: [CPUIDTable]
    /// What a snapshot of this machine needs from KVM, asked at set-up so that
    /// saving makes no system-wide KVM requests once the jail's filters are on:
    /// the MSRs to save (or why KVM cannot save a VM) and the XSAVE size.
    let snapshotSupport: Result<[UInt32], KVMError>
    public let xsaveSize: Int
    public private(set) var portBus = Bus(name: "port I/O")
    public private(set) var mmioBus = Bus(name: "MMIO")
    public let serial: Serial16550
    private var timings = MachineTimings()
    private let logger: Logger
    /// Where KVM keeps each extended-state component (from its CPUID leaf 0xD), for the XSAVE assist.
    private let xsaveLayout: XSaveLayout

    /// virtio-mmio devices added so far, announced on the kernel command line.
    private var virtioDevices: [(base: UInt64, irq: UInt32)] = []
    /// Their transports and device models, in the same order (snapshots save and restore them).
    private(set) var virtioEntries: [(transport: MMIOTransport, device: any VirtioDevice)] = []
    let i8042: I8042
    /// The block devices, in the order the guest sees them (/dev/vda, /dev/vdb, ...).
    public private(set) var blockDevices: [BlockDevice] = []
    /// How the guest kernel runs; decided when the kernel is loaded (`loadLinux`).
    public internal(set) var guestMode: HostProfile.GuestMode
    /// Whether the host answered the paravirtual interface's signature MSR, on a CPU
    /// the guest kernel's PV mode runs on (`PVInterface.cpuSuitsGuestKernel`).
    public let pvInterfacePresent: Bool

    /// First event reported by a device (the i8042 reset) before any vCPU reports one.
    private let deviceEvent = Mutex<SystemEvent?>(nil)
    private let runners = Mutex<[VCPURunner]>([])
    private let stopRequested = Atomic<Bool>(false)
    /// `pause` was asked for and the current (or next) `run` has not yet returned for it.
    private let pauseRequested = Atomic<Bool>(false)
    /// Inside `run`: vCPU threads may be in the guest.
    private let running = Atomic<Bool>(false)
    /// The first KVM_RUN of the machine's first `run` (monotonic ns), kept across pauses.
    private let firstEntry = Atomic<UInt64>(0)

    public init(_ config: MachineConfig) throws(VMMError) {
        self.config = config
        self.logger = config.logger
        timings.created = monotonicNanoseconds()
        guard config.vcpuCount == 1 else {
            throw .invalidConfiguration("\(config.vcpuCount) vCPUs were asked for, but Airlock runs 1 vCPU until SMP support lands: use --cpus 1")
        }
        guard config.memoryBytes >= Layout.minimumMemory else {
            throw .invalidConfiguration("--memory \(config.memoryBytes >> 20) MiB is too small: give at least \(Layout.minimumMemory >> 20) MiB")
        }
        guard config.memoryBytes % (2 << 20) == 0 else {
            throw .invalidConfiguration("memory must be a whole number of 2 MiB pages")
        }
        do throws(KVMError) {
            if let given = config.kvm { kvm = given } else { kvm = try KVMSystem(path: config.kvmPath) }
            try kvm.checkRequiredCapabilities()
            vm = try kvm.createVM()
            // The XSAVE assist queues page faults with their CR2 (see ExtendedStateAssist).
            if config.hostProfile.extendedStateAssist { try vm.enableExceptionPayload() }
            try vm.setTSSAddress(Layout.tssAddress)
            try vm.setIdentityMapAddress(Layout.identityMapAddress)
        } catch { throw .kvm(error) }

        do {
            if let image = config.memoryImage {
                memory = try GuestMemory(layout: Layout.ramRegions(memory: config.memoryBytes),
                                         imageFD: image.file.rawValue, imageOffset: image.offset)
            } else {
                memory = try GuestMemory(layout: Layout.ramRegions(memory: config.memoryBytes))
            }
        } catch let e as GuestMemoryError { throw .memory(e) } catch {
            throw .invalidConfiguration("cannot allocate \(config.memoryBytes >> 20) MiB of guest memory: \(error)")
        }
        // Memory slots go in before the irqchip: once the in-kernel irqchip
        // exists, each KVM_SET_USER_MEMORY_REGION waits out an SRCU grace period
        // (measured 6-10 ms on this host, against 0.2 ms before it).
        do {
            for (slot, region) in memory.regions.enumerated() {
                try vm.setUserMemoryRegion(slot: UInt32(slot), guestAddress: region.start.raw,
                                           size: region.size, hostAddress: region.hostAddressForKVM)
            }
            try vm.createIRQChip()
            try vm.createPIT2()
        } catch { throw .kvm(error) }

        serial = Serial16550(interrupt: KVMInterruptLine(vm: vm, irq: LegacyPorts.com1IRQ, logger: logger),
                             output: config.console)
        var vcpus: [VCPU] = []
        var cpuids: [CPUIDTable] = []
        let restoring = config.memoryImage != nil
        let supported: CPUIDTable
        do { supported = try kvm.supportedCPUID() } catch { throw .kvm(error) }
        xsaveLayout = XSaveLayout(cpuid: supported)
        do {
            for id in 0..<UInt32(config.vcpuCount) {
                let vcpu = try vm.createVCPU(id: id)
                // A restored vCPU gets its whole state (CPUID included) from `restore`.
                if restoring { vcpus.append(vcpu); continue }
                let cpuid = CPUSetup.guestCPUID(supported, vcpuID: id, vcpuCount: UInt32(config.vcpuCount))
                try vcpu.setCPUID(cpuid)
                cpuids.append(cpuid)
                let msrs = CPUSetup.bootMSRs()
                let set = try vcpu.setMSRs(msrs)
                if set < msrs.count { logger.debug("KVM accepted \(set) of \(msrs.count) boot MSRs") }
                try vcpu.setSpecialRegisters(CPUSetup.longModeSpecialRegisters(try vcpu.specialRegisters()))
                try vcpu.resetFPU()
                try vcpu.setLAPICRegisters(CPUSetup.virtualWireLAPIC(try vcpu.lapicRegisters()))
                vcpus.append(vcpu)
            }
        } catch { throw .kvm(error) }
        self.vcpus = vcpus
        self.guestCPUIDs = cpuids
        let kvm = self.kvm, profile = config.hostProfile
        snapshotSupport = Result { () throws(KVMError) -> [UInt32] in
            try kvm.checkSnapshotCapabilities()
            var indices = try kvm.msrIndexList()
            for extra in profile.snapshotMSRs where !indices.contains(extra) { indices.append(extra) }
            return indices
        }
        xsaveSize = kvm.xsaveSize
        // One KVM_GET_MSRS on the machine's own vCPU: costs microseconds, no extra VM.
        pvInterfacePresent = config.hostProfile.backend == .pvm && PVInterface.probe(vcpus[0])
            && PVInterface.cpuSuitsGuestKernel()
        guestMode = config.hostProfile.guestMode(interfacePresent: false, kernelStartsInPVMode: false)

        if !restoring {
            do {
                try CPUSetup.writeDescriptorTables(memory)
                try CPUSetup.writeIdentityPageTables(memory)
            } catch { throw .memory(error) }
        }

        let stopBox = WeakMachine()
        i8042 = I8042(onReset: {
            stopBox.machine?.stop(with: SystemEvent(kind: .reset, cause: .i8042Reset, vcpu: 0))
        })
        do {
            try portBus.insert(serial, name: "16550A UART (COM1)", base: LegacyPorts.com1, length: LegacyPorts.com1Length)
            try portBus.insert(i8042, name: "i8042", base: LegacyPorts.i8042, length: LegacyPorts.i8042Length)
        } catch { throw .bus(error) }
        stopBox.machine = self
    }

    /// The kernel command line every Airlock guest gets, before the host profile's and the user's.
    public static let baseCommandLine = "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1"

    /// The whole command line `loadLinux` gave the kernel ("" before it ran): a snapshot records it.
    public private(set) var commandLine = ""

    /// The command line a machine whose guest runs in `guestMode` gives its kernel with
    /// these virtio devices: Airlock's base, the mode's, one virtio_mmio.device= per
    /// device, then `extra`.
    static func kernelCommandLine(guestMode: HostProfile.GuestMode, virtioDevices: [(base: UInt64, irq: UInt32)],
                                  extra: String) throws(LinuxBootError) -> KernelCommandLine {
        var cmdline = try KernelCommandLine(baseCommandLine, capacity: Layout.commandLineCapacity)
        for p in HostProfile.commandLineParameters(for: guestMode) { try cmdline.append(p) }
        for d in virtioDevices {
            try cmdline.append("virtio_mmio.device=4K@0x\(String(d.base, radix: 16)):\(d.irq)")
        }
        if !extra.isEmpty { try cmdline.append(extra) }
        return cmdline
    }

    /// The command line `loadLinux` would use in `guestMode` on a machine with
    /// `virtioDeviceCount` devices added, computed without building one (to key and
    /// check a snapshot against the boot it stands for); nil when it would not fit.
    public static func kernelCommandLine(guestMode: HostProfile.GuestMode, virtioDeviceCount: Int, extra: String) -> String? {
        guard virtioDeviceCount <= Layout.virtioIRQs.count else { return nil }
        let devices = (0..<virtioDeviceCount).map {
            (base: Layout.virtioMMIOBase + UInt64($0) * MMIOTransport.windowSize, irq: Layout.virtioIRQs[$0])
        }
        return try? kernelCommandLine(guestMode: guestMode, virtioDevices: devices, extra: extra).string
    }

    /// What boots a root filesystem on /dev/vda (the first disk), read-only, with `init` as
    /// PID 1 when given: one place for the rule, for `airlock boot` and the agent's sessions.
    public static func rootFilesystemCommandLine(init: String? = nil) -> String {
        "root=/dev/vda ro rootfstype=ext4" + (`init`.map { " init=\($0)" } ?? "")
    }

    /// Loads a vmlinux or bzImage, an optional initrd and the command line, and points vCPU 0 at the entry.
    public func loadLinux(kernelPath: String, initrdPath: String?, extraCommandLine: String) throws(VMMError) {
        let image: MappedFile
        do { image = try MappedFile(path: kernelPath, role: "kernel") } catch {
            throw .invalidConfiguration(error.description)
        }
        var initrd: MappedFile?
        if let initrdPath {
            do { initrd = try MappedFile(path: initrdPath, role: "initrd") } catch {
                throw VMMError.invalidConfiguration(error.description)
            }
        }
        try loadLinux(kernel: image, initrd: initrd, extraCommandLine: extraCommandLine)
    }

    /// `loadLinux` with the kernel (and initrd) already open: messages name their `path`s.
    public func loadLinux(kernel image: MappedFile, initrd: MappedFile?, extraCommandLine: String) throws(VMMError) {
        guard config.memoryImage == nil else {
            throw .invalidConfiguration("a machine built from a snapshot's memory image is restored, not booted: use restore")
        }
        let kernelPath = image.path
        do {
            let kernel = try KernelLoader.load(image, into: memory)
            try selectGuestMode(kernelStartsInPVMode: kernel.startsInPVMode, extraCommandLine: extraCommandLine)
            let cmdline = try Self.kernelCommandLine(guestMode: guestMode, virtioDevices: virtioDevices, extra: extraCommandLine)
            commandLine = cmdline.string

            var params = BootParams(kernel: kernel)
            // The guest's random pool is seeded from the host before any driver runs: without
            // it crng init waits for interrupt entropy (30 s on an emulated kernel) and every
            // getrandom() until then blocks. The guest kernel credits it with
            // CONFIG_RANDOM_TRUST_BOOTLOADER (guest-kernel/airlock.config).
            let seed = try Self.hostRandomBytes(32)
            do { try memory.write(SetupData.node(type: SetupData.rngSeedType, payload: seed), at: Layout.setupDataAddress) } catch {
                throw VMMError.memory(error)
            }
            params.setSetupData(address: Layout.setupDataAddress)
            let cmdBytes = cmdline.bytesWithNUL
            do { try memory.write(cmdBytes, at: Layout.commandLineAddress) } catch { throw VMMError.memory(error) }
            params.setCommandLine(address: Layout.commandLineAddress, size: UInt32(cmdBytes.count - 1))
            if let initrd {
                let at = try InitrdPlacer.place(size: UInt64(initrd.size), kernel: kernel, memory: memory, path: initrd.path)
                // Copied straight from the file's pages: no intermediate buffer.
                do { try withExtendedLifetime(initrd) { () throws(GuestMemoryError) in try memory.write(at: at, from: initrd.bytes) } } catch {
                    throw VMMError.memory(error)
                }
                params.setInitrd(address: at, size: UInt64(initrd.size))
            }
            try params.setE820(E820Entry.map(for: memory))
            try params.write(to: memory, at: Layout.zeroPageAddress)
            try setEntry(CPUSetup.entryRegisters(entry: kernel.entry))
            logger.info("kernel \(kernelPath) (\(kernel.format)) entry \(kernel.entry), guest mode \(guestMode.rawValue), command line: \(cmdline.string)")
        } catch let e as LinuxBootError { throw .boot(e) } catch let e as VMMError { throw e } catch {
            throw .invalidConfiguration("\(error)")
        }
        timings.loaded = monotonicNanoseconds()
    }

    /// Marks the machine as ready to run (the load time in its timings).
    func markLoaded() { timings.loaded = monotonicNanoseconds() }

    /// Native mode on a PVM host: the boot page tables get the user bit and the VMM
    /// registers the first VIF page, so the kernel's first instruction already runs
    /// natively. A host that refuses the registration leaves the guest emulated.
    private func selectGuestMode(kernelStartsInPVMode: Bool, extraCommandLine: String) throws(VMMError) {
        let wanted = config.hostProfile.guestMode(interfacePresent: pvInterfacePresent,
                                                  kernelStartsInPVMode: kernelStartsInPVMode,
                                                  extraCommandLine: extraCommandLine)
        guestMode = wanted
        guard config.hostProfile.vmmRegistersVIF(in: wanted) else { return }
        do { try CPUSetup.writeIdentityPageTables(memory, userAccessible: true) } catch { throw .memory(error) }
        let registered: Bool
        do { registered = try PVInterface.register(vcpus[0], page: Layout.pvBootVIFAddress.raw) } catch { throw .kvm(error) }
        if !registered {
            logger.warning("the host refused the VIF page (KVM_SET_MSRS on MSR 0x4b564d10): the guest kernel runs emulated")
            do { try CPUSetup.writeIdentityPageTables(memory) } catch { throw .memory(error) }
            guestMode = .pvmEmulated
        }
    }

    /// Bytes from the host's kernel CSPRNG (getrandom blocks only before the host's own pool is ready).
    public static func hostRandomBytes(_ count: Int) throws(VMMError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var filled = 0
        while filled < count {
            let n = bytes.withUnsafeMutableBytes { getrandom($0.baseAddress! + filled, count - filled, 0) }
            if n < 0 {
                if errno == EINTR { continue }
                throw .invalidConfiguration("getrandom failed (\(String(cString: strerror(errno)))): the host cannot seed the guest's random pool")
            }
            filled += n
        }
        return bytes
    }

    /// Copies raw 64-bit code to `address` and points vCPU 0 at it (tests, benchmarks).
    public func loadPayload(_ code: [UInt8], at address: GuestAddress) throws(VMMError) {
        guard config.memoryImage == nil else {
            throw .invalidConfiguration("a machine built from a snapshot's memory image is restored, not booted: use restore")
        }
        do { try memory.write(code, at: address) } catch { throw .memory(error) }
        try setEntry(CPUSetup.entryRegisters(entry: address))
        timings.loaded = monotonicNanoseconds()
    }

    /// Starts a payload (tests, benchmarks) the way native mode starts a kernel: boot page
    /// tables with the user bit and the VMM's VIF page registered, so that its first
    /// instruction runs natively, in hardware ring 3. False, with nothing changed, where the
    /// host has no paravirtual interface or refuses the page.
    public func enterNativeModeForPayload() throws(VMMError) -> Bool {
        guard pvInterfacePresent else { return false }
        do { try CPUSetup.writeIdentityPageTables(memory, userAccessible: true) } catch { throw .memory(error) }
        let registered: Bool
        do { registered = try PVInterface.register(vcpus[0], page: Layout.pvBootVIFAddress.raw) } catch { throw .kvm(error) }
        guard registered else {
            do { try CPUSetup.writeIdentityPageTables(memory) } catch { throw .memory(error) }
            return false
        }
        guestMode = .pvmNative
        return true
    }

    private func setEntry(_ regs: Registers) throws(VMMError) {
        do { try vcpus[0].setRegisters(regs) } catch { throw .kvm(error) }
    }

    /// Adds a virtio-blk disk backed by `path` (before `loadLinux`): the first is
    /// /dev/vda, the next /dev/vdb, and so on.
    @discardableResult
    public func addBlockDevice(path: String, readOnly: Bool) throws(VMMError) -> BlockDevice {
        let device: BlockDevice
        do { device = try BlockDevice(path: path, readOnly: readOnly) } catch {
            throw .invalidConfiguration(error.description)
        }
        try addBlockDevice(device)
        return device
    }

    /// Adds an already opened virtio-blk disk (before `loadLinux`), the next /dev/vdX.
    public func addBlockDevice(_ device: BlockDevice) throws(VMMError) {
        try addVirtioDevice(device)
        blockDevices.append(device)
    }

    /// Adds a multiport virtio-console (before `loadLinux`). Port n of the k-th
    /// virtio device appears in the guest as /dev/vport{k}p{n}, named by its spec.
    /// Feed host input with `console.queueInput` and then `transport.serviceQueue`.
    @discardableResult
    public func addConsoleDevice(ports: [ConsoleDevice.PortSpec]) throws(VMMError) -> (console: ConsoleDevice, transport: MMIOTransport) {
        let console = ConsoleDevice(ports: ports)
        return (console, try addVirtioDevice(console))
    }

    /// How many virtio devices have been added: the next one is virtio<N> in the guest
    /// (Linux numbers them in the order of the virtio_mmio.device= parameters).
    public var virtioDeviceCount: Int { virtioDevices.count }

    /// Puts a virtio device behind an MMIO transport in the next free slot, with its own IRQ.
    @discardableResult
    func addVirtioDevice(_ device: any VirtioDevice) throws(VMMError) -> MMIOTransport {
        let index = UInt64(virtioDevices.count)
        guard index < UInt64(Layout.virtioIRQs.count) else {
            throw .invalidConfiguration("too many virtio devices: at most \(Layout.virtioIRQs.count)")
        }
        let base = Layout.virtioMMIOBase + index * MMIOTransport.windowSize
        let irq = Layout.virtioIRQs[Int(index)]
        let transport = MMIOTransport(device: device, memory: memory,
                                      interrupt: KVMInterruptLine(vm: vm, irq: irq, logger: logger))
        try addMMIODevice(VirtioMMIODevice(transport), name: "virtio-mmio \(device.deviceID) #\(index)",
                          base: base, length: MMIOTransport.windowSize)
        virtioDevices.append((base, irq))
        virtioEntries.append((transport, device))
        return transport
    }

    /// Adds a device to the MMIO bus (before `run`).
    public func addMMIODevice(_ device: any BusDevice, name: String, base: UInt64, length: UInt64) throws(VMMError) {
        do { try mmioBus.insert(device, name: name, base: base, length: length) } catch { throw .bus(error) }
    }

    /// Ends the run with `event` (first caller wins) and stops every vCPU.
    /// Safe from any thread, also before `run` has started its vCPUs.
    public func stop(with event: SystemEvent?) {
        if let event { deviceEvent.withLock { if $0 == nil { $0 = event } } }
        stopRequested.store(true, ordering: .sequentiallyConsistent)
        for r in runners.withLock({ $0 }) { r.requestStop() }
    }

    /// When the first vCPU first entered KVM_RUN (monotonic ns), 0 before it has;
    /// the first `run`'s, when a pause made the machine run again with new threads.
    public var firstRunNanoseconds: UInt64 {
        let kept = firstEntry.load(ordering: .relaxed)
        if kept != 0 { return kept }
        let now: UInt64 = runners.withLock { r -> UInt64 in r.map { $0.firstRunAt.load(ordering: .relaxed) }.filter { $0 > 0 }.min() ?? 0 }
        if now != 0 { _ = firstEntry.compareExchange(expected: 0, desired: now, ordering: .relaxed) }
        return firstEntry.load(ordering: .relaxed)
    }

    /// Stops every vCPU at its next exit without ending the machine: `run`
    /// returns with `paused`, the state can be saved (`captureState`), and a
    /// later `run` goes on from there. Safe from any thread.
    public func pause() {
        pauseRequested.store(true, ordering: .sequentiallyConsistent)
        for r in runners.withLock({ $0 }) { r.requestStop() }
    }

    /// Whether vCPU threads may be running the guest now.
    public var isRunning: Bool { running.load(ordering: .sequentiallyConsistent) }

    /// Runs the vCPUs until the guest ends, a vCPU fails, `pause` is asked for,
    /// or `timeout` seconds pass. After a pause it may be called again.
    public func run(timeout: Double? = nil) throws(VMMError) -> MachineExit {
        running.store(true, ordering: .sequentiallyConsistent)
        defer { running.store(false, ordering: .sequentiallyConsistent) }
        installKickHandler()
        let finished = DispatchSemaphore(value: 0)
        let emulated = config.hostProfile.startsEmulated(in: guestMode)
        let handler = ExitHandler(portBus: portBus, mmioBus: mmioBus, emulationAssists: emulated,
                                  extendedState: emulated
                                      ? ExtendedStateAssist(memory: memory, layout: xsaveLayout) : nil)
        let built = vcpus.map {
            VCPURunner(vcpu: $0, handler: handler, threadSetup: config.vcpuThreadSetup, onFinish: { _ in finished.signal() })
        }
        runners.withLock { $0 = built }
        var started: [VCPURunner] = []
        for r in built {
            do { try r.start() } catch {
                for s in started { s.requestStop(); s.join() }
                throw error
            }
            started.append(r)
        }
        // A stop or pause that came before the runners were published would have found none to stop.
        if stopRequested.load(ordering: .sequentiallyConsistent) || pauseRequested.load(ordering: .sequentiallyConsistent) {
            for r in built { r.requestStop() }
        }

        var timedOut = false
        if let timeout {
            let deadline = DispatchTime.now() + .nanoseconds(Int(timeout * 1e9))
            timedOut = finished.wait(timeout: deadline) == .timedOut
        } else {
            finished.wait()
        }
        // The first vCPU has finished (or time ran out): stop the rest, then collect.
        for r in built { r.requestStop() }
        for r in built { r.join() }
        timings.stopped = monotonicNanoseconds()
        timings.firstRun = firstRunNanoseconds

        var event = deviceEvent.withLock { $0 }
        for r in built {
            switch r.finalOutcome {
            case let .failed(error)?:
                if event == nil { throw error }
            case let .event(e)?:
                if event == nil { event = e }
            case .stopped?, nil:
                break
            }
        }
        var exit = MachineExit(event: event, timedOut: timedOut && event == nil, timings: timings)
        // A pause is taken (and cleared) only when nothing else ended the run.
        if event == nil, !stopRequested.load(ordering: .sequentiallyConsistent),
           pauseRequested.exchange(false, ordering: .sequentiallyConsistent) {
            exit.paused = true
        }
        exit.guestMode = guestMode
        return exit
    }

    private func installKickHandler() {
        _ = airlock_install_kick_handler(kickSignal)
    }
}

/// The i8042's way back to its machine, set once the machine exists (the
/// device is built inside `Machine.init`, before `self` may be captured).
private final class WeakMachine: @unchecked Sendable {
    // @unchecked: written once in Machine.init before any vCPU runs, read after.
    weak var machine: Machine?
}

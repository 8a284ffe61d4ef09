import GuestMemory
import Synchronization

/// The virtio-mmio transport, version 2 (virtio 1.2 section 4.2.2): one switch
/// over the register offsets, in front of one `VirtioDevice`.
///
/// Rules it enforces on the driver: registers outside the configuration space
/// take 4-byte accesses only (others are ignored, reads give 0); features are
/// written only before FEATURES_OK; FEATURES_OK sticks only if the driver
/// accepted VIRTIO_F_VERSION_1 and nothing the device did not offer; queues are
/// configured only between FEATURES_OK and DRIVER_OK, and a queue whose size or
/// rings are invalid is not made ready but sets DEVICE_NEEDS_RESET.
public final class MMIOTransport: @unchecked Sendable {
    // @unchecked: all mutable state is inside `state` (a Mutex); `device` is
    // called only with that lock held.
    public static let magic: UInt32 = 0x7472_6976  // "virt"
    public static let version: UInt32 = 2
    public static let vendorID: UInt32 = 0x4C52_4941  // "AIRL"
    public static let windowSize: UInt64 = 0x1000
    static let configOffset: UInt64 = 0x100

    // Register offsets.
    enum Register {
        static let magic: UInt64 = 0x000, version: UInt64 = 0x004, deviceID: UInt64 = 0x008, vendorID: UInt64 = 0x00C
        static let deviceFeatures: UInt64 = 0x010, deviceFeaturesSel: UInt64 = 0x014
        static let driverFeatures: UInt64 = 0x020, driverFeaturesSel: UInt64 = 0x024
        static let queueSel: UInt64 = 0x030, queueNumMax: UInt64 = 0x034, queueNum: UInt64 = 0x038
        static let queueReady: UInt64 = 0x044, queueNotify: UInt64 = 0x050
        static let interruptStatus: UInt64 = 0x060, interruptACK: UInt64 = 0x064, status: UInt64 = 0x070
        static let queueDescLow: UInt64 = 0x080, queueDescHigh: UInt64 = 0x084
        static let queueDriverLow: UInt64 = 0x090, queueDriverHigh: UInt64 = 0x094
        static let queueDeviceLow: UInt64 = 0x0A0, queueDeviceHigh: UInt64 = 0x0A4
        static let configGeneration: UInt64 = 0x0FC
    }

    struct State {
        var status: UInt32 = 0
        var deviceFeaturesSel: UInt32 = 0
        var driverFeaturesSel: UInt32 = 0
        var driverFeatures: UInt64 = 0
        var queueSel: UInt32 = 0
        var queues: [SplitQueue]
        var interruptStatus: UInt32 = 0
        var configGeneration: UInt32 = 0
        var lineHigh = false
        /// Queue errors seen (a broken driver or a hostile guest); the device stays up.
        var queueErrors = 0
    }

    public let device: any VirtioDevice
    let memory: GuestMemory
    let interrupt: any InterruptLine
    private let state: Mutex<State>

    public init(device: any VirtioDevice, memory: GuestMemory, interrupt: any InterruptLine) {
        self.device = device
        self.memory = memory
        self.interrupt = interrupt
        state = Mutex(State(queues: device.queueMaxSizes.map { SplitQueue(maxSize: $0) }))
    }

    /// Status as the driver last saw it (tests, diagnostics).
    public var status: UInt32 { state.withLock { $0.status } }
    public var queueErrors: Int { state.withLock { $0.queueErrors } }

    public func read(offset: UInt64, size: Int) -> UInt64 {
        if offset >= Self.configOffset {
            guard size == 1 || size == 2 || size == 4 || size == 8 else { return 0 }
            return state.withLock { _ in device.readConfig(offset: Int(offset - Self.configOffset), size: size) }
        }
        guard size == 4 else { return 0 }
        return state.withLock { s -> UInt64 in
            let value: UInt32
            switch offset {
            case Register.magic: value = Self.magic
            case Register.version: value = Self.version
            case Register.deviceID: value = device.deviceID
            case Register.vendorID: value = Self.vendorID
            case Register.deviceFeatures:
                let f = device.offeredFeatures
                value = s.deviceFeaturesSel == 0 ? UInt32(truncatingIfNeeded: f) : s.deviceFeaturesSel == 1 ? UInt32(truncatingIfNeeded: f >> 32) : 0
            case Register.queueNumMax: value = UInt32(Self.selectedQueue(s)?.maxSize ?? 0)
            case Register.queueReady: value = (Self.selectedQueue(s)?.ready ?? false) ? 1 : 0
            case Register.interruptStatus: value = s.interruptStatus
            case Register.status: value = s.status
            case Register.configGeneration: value = s.configGeneration
            default: value = 0
            }
            return UInt64(value)
        }
    }

    public func write(offset: UInt64, size: Int, value: UInt64) {
        if offset >= Self.configOffset {
            guard size == 1 || size == 2 || size == 4 || size == 8 else { return }
            state.withLock { _ in device.writeConfig(offset: Int(offset - Self.configOffset), size: size, value: value) }
            return
        }
        guard size == 4 else { return }
        let v = UInt32(truncatingIfNeeded: value)
        state.withLock { s in
            switch offset {
            case Register.deviceFeaturesSel: s.deviceFeaturesSel = v
            case Register.driverFeaturesSel: s.driverFeaturesSel = v
            case Register.driverFeatures:
                // Only while negotiating: after FEATURES_OK the features are fixed.
                guard s.status & VirtioStatus.driver != 0, s.status & VirtioStatus.featuresOK == 0 else { return }
                if s.driverFeaturesSel == 0 {
                    s.driverFeatures = (s.driverFeatures & ~0xFFFF_FFFF) | UInt64(v)
                } else if s.driverFeaturesSel == 1 {
                    s.driverFeatures = (s.driverFeatures & 0xFFFF_FFFF) | (UInt64(v) << 32)
                }
            case Register.queueSel: s.queueSel = v
            case Register.queueNum:
                guard Self.configuringQueues(s), let q = Self.selectedIndex(s), !s.queues[q].ready else { return }
                s.queues[q].size = UInt16(truncatingIfNeeded: v)
            case Register.queueDescLow, Register.queueDescHigh, Register.queueDriverLow, Register.queueDriverHigh,
                 Register.queueDeviceLow, Register.queueDeviceHigh:
                guard Self.configuringQueues(s), let q = Self.selectedIndex(s), !s.queues[q].ready else { return }
                Self.setQueueAddress(&s.queues[q], register: offset, value: v)
            case Register.queueReady:
                guard Self.configuringQueues(s), let q = Self.selectedIndex(s) else { return }
                if v == 1 {
                    if s.queues[q].isValid(memory: memory) {
                        s.queues[q].ready = true
                        s.queues[q].indirectAllowed = s.driverFeatures & VirtioFeature.ringIndirectDescriptors != 0
                    } else {
                        s.status |= VirtioStatus.deviceNeedsReset
                    }
                } else {
                    s.queues[q].ready = false
                }
            case Register.queueNotify:
                guard s.status & VirtioStatus.driverOK != 0, s.status & VirtioStatus.deviceNeedsReset == 0,
                      Int(v) < s.queues.count, s.queues[Int(v)].ready else { return }
                service(&s, queue: Int(v))
            case Register.interruptACK:
                s.interruptStatus &= ~v
            case Register.status:
                setStatus(&s, v)
            default:
                break  // read-only or unknown registers
            }
            updateLine(&s)
        }
    }

    /// Has the device serve `queue` now, on the host's initiative (input arrived
    /// for the guest): the same as a driver notification, but ignored until the
    /// driver has set DRIVER_OK and made the queue ready.
    public func serviceQueue(_ queue: Int) {
        state.withLock { s in
            guard s.status & VirtioStatus.driverOK != 0, s.status & VirtioStatus.deviceNeedsReset == 0,
                  queue >= 0, queue < s.queues.count, s.queues[queue].ready else { return }
            service(&s, queue: queue)
            updateLine(&s)
        }
    }

    private func service(_ s: inout State, queue: Int) {
        let result = device.process(queue: queue, queues: &s.queues, memory: memory)
        if result.returnedBuffers { s.interruptStatus |= 1 }  // used buffer notification
        s.queueErrors += result.malformedChains
        if result.ringError != nil { noteQueueError(&s) }
    }

    /// Marks a queue error: the driver must reset the device to use it again.
    func noteQueueError(_ s: inout State) {
        s.queueErrors += 1
        s.status |= VirtioStatus.deviceNeedsReset
    }

    private func setStatus(_ s: inout State, _ v: UInt32) {
        if v == 0 {
            // Reset: forget everything the driver set up.
            device.reset()
            let queues = s.queues.map { q -> SplitQueue in var q = q; q.reset(); return q }
            let errors = s.queueErrors  // a diagnostic count, kept across resets
            s = State(queues: queues)
            s.queueErrors = errors
            return
        }
        var new = v
        // FEATURES_OK only if the driver accepted VERSION_1 and nothing not offered.
        if new & VirtioStatus.featuresOK != 0, s.status & VirtioStatus.featuresOK == 0 {
            let ok = s.driverFeatures & ~device.offeredFeatures == 0 && s.driverFeatures & VirtioFeature.version1 != 0
                && s.status & VirtioStatus.driver != 0
            if !ok { new &= ~VirtioStatus.featuresOK }
        }
        // DRIVER_OK needs FEATURES_OK first.
        if new & VirtioStatus.driverOK != 0, new & VirtioStatus.featuresOK == 0 { new &= ~VirtioStatus.driverOK }
        // Bits the device owns stay as they are; the driver cannot clear bits without a reset.
        new = (new | s.status) & ~VirtioStatus.deviceNeedsReset | (s.status & VirtioStatus.deviceNeedsReset)
        let activating = new & VirtioStatus.driverOK != 0 && s.status & VirtioStatus.driverOK == 0
        s.status = new
        if activating { device.activate(features: s.driverFeatures) }
    }

    private func updateLine(_ s: inout State) {
        let want = s.interruptStatus != 0
        guard want != s.lineHigh else { return }
        s.lineHigh = want
        interrupt.setLevel(want)
    }

    static func configuringQueues(_ s: State) -> Bool {
        s.status & VirtioStatus.featuresOK != 0 && s.status & VirtioStatus.driverOK == 0
    }

    static func selectedIndex(_ s: State) -> Int? {
        Int(s.queueSel) < s.queues.count ? Int(s.queueSel) : nil
    }

    static func selectedQueue(_ s: State) -> SplitQueue? {
        selectedIndex(s).map { s.queues[$0] }
    }

    static func setQueueAddress(_ q: inout SplitQueue, register: UInt64, value: UInt32) {
        func low(_ a: GuestAddress) -> GuestAddress { GuestAddress((a.raw & ~0xFFFF_FFFF) | UInt64(value)) }
        func high(_ a: GuestAddress) -> GuestAddress { GuestAddress((a.raw & 0xFFFF_FFFF) | (UInt64(value) << 32)) }
        switch register {
        case Register.queueDescLow: q.descriptorTable = low(q.descriptorTable)
        case Register.queueDescHigh: q.descriptorTable = high(q.descriptorTable)
        case Register.queueDriverLow: q.availableRing = low(q.availableRing)
        case Register.queueDriverHigh: q.availableRing = high(q.availableRing)
        case Register.queueDeviceLow: q.usedRing = low(q.usedRing)
        case Register.queueDeviceHigh: q.usedRing = high(q.usedRing)
        default: break
        }
    }
}


/// A transport and its queues as a plain value, for snapshots.
public struct TransportState: Equatable, Sendable {
    public var status: UInt32
    public var deviceFeaturesSel: UInt32
    public var driverFeaturesSel: UInt32
    public var driverFeatures: UInt64
    public var queueSel: UInt32
    public var queues: [QueueState]
    public var interruptStatus: UInt32
    public var configGeneration: UInt32
    public var queueErrors: Int

    public init(status: UInt32, deviceFeaturesSel: UInt32, driverFeaturesSel: UInt32, driverFeatures: UInt64, queueSel: UInt32,
                queues: [QueueState], interruptStatus: UInt32, configGeneration: UInt32, queueErrors: Int) {
        self.status = status; self.deviceFeaturesSel = deviceFeaturesSel; self.driverFeaturesSel = driverFeaturesSel
        self.driverFeatures = driverFeatures; self.queueSel = queueSel; self.queues = queues
        self.interruptStatus = interruptStatus; self.configGeneration = configGeneration
        self.queueErrors = queueErrors
    }
}

extension MMIOTransport {
    /// Every status bit a driver or the device can set (virtio 1.2 section 2.1).
    static let knownStatusBits = VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.driverOK
        | VirtioStatus.featuresOK | VirtioStatus.deviceNeedsReset | VirtioStatus.failed
    /// InterruptStatus: used buffer (bit 0) and configuration change (bit 1).
    static let knownInterruptBits: UInt32 = 0x3

    /// Saves the transport and, under the same lock (so no queue moves in
    /// between), whatever `device` returns: the device's own state.
    public func captureState<D>(device capture: () -> D) -> (transport: TransportState, device: D) {
        state.withLock { s in
            let t = TransportState(status: s.status, deviceFeaturesSel: s.deviceFeaturesSel, driverFeaturesSel: s.driverFeaturesSel,
                                   driverFeatures: s.driverFeatures, queueSel: s.queueSel, queues: s.queues.map(\.state),
                                   interruptStatus: s.interruptStatus, configGeneration: s.configGeneration,
                                   queueErrors: s.queueErrors)
            return (t, capture())
        }
    }

    /// Replaces the transport's state with a saved one after checking it
    /// against this device the way the transport checks a driver: known status
    /// bits only, DRIVER_OK only after FEATURES_OK, accepted features only
    /// ones offered (with VERSION_1), one queue per device queue, each ready
    /// queue valid in this guest's RAM. `device` restores the device's own
    /// state under the same lock, after the checks; if it throws, nothing of
    /// the transport changes. The interrupt line is then driven to the saved level.
    public func restoreState(_ saved: TransportState, name: String, device restore: () throws(StateError) -> Void) throws(StateError) {
        let offered = device.offeredFeatures
        guard saved.status & ~Self.knownStatusBits == 0 else {
            throw StateError("\(name): saved status 0x\(String(saved.status, radix: 16)) has bits virtio does not define")
        }
        if saved.status & VirtioStatus.driverOK != 0, saved.status & VirtioStatus.featuresOK == 0 {
            throw StateError("\(name): saved status 0x\(String(saved.status, radix: 16)) has DRIVER_OK without FEATURES_OK")
        }
        if saved.status & VirtioStatus.featuresOK != 0 {
            guard saved.driverFeatures & ~offered == 0, saved.driverFeatures & VirtioFeature.version1 != 0 else {
                throw StateError("\(name): saved features 0x\(String(saved.driverFeatures, radix: 16)) are not ones this device offers (0x\(String(offered, radix: 16)), VERSION_1 required)")
            }
        }
        guard saved.interruptStatus & ~Self.knownInterruptBits == 0 else {
            throw StateError("\(name): saved interrupt status 0x\(String(saved.interruptStatus, radix: 16)) has undefined bits")
        }
        let maxSizes = device.queueMaxSizes
        guard saved.queues.count == maxSizes.count else {
            throw StateError("\(name): the snapshot has \(saved.queues.count) queues, this device \(maxSizes.count)")
        }
        var queues: [SplitQueue] = []
        for (i, q) in saved.queues.enumerated() {
            if q.indirectAllowed, saved.driverFeatures & VirtioFeature.ringIndirectDescriptors == 0 {
                throw StateError("\(name) queue \(i): indirect descriptors allowed without VIRTIO_F_INDIRECT_DESC")
            }
            queues.append(try SplitQueue(restoring: q, maxSize: maxSizes[i], memory: memory, name: "\(name) queue \(i)"))
        }
        guard saved.queueErrors >= 0 else { throw StateError("\(name): saved queue error count \(saved.queueErrors) is negative") }
        let result: Result<Void, StateError> = state.withLock { s in
            do throws(StateError) { try restore() } catch { return .failure(error) }
            s = State(queues: queues)
            s.status = saved.status
            s.deviceFeaturesSel = saved.deviceFeaturesSel
            s.driverFeaturesSel = saved.driverFeaturesSel
            s.driverFeatures = saved.driverFeatures
            s.queueSel = saved.queueSel
            s.interruptStatus = saved.interruptStatus
            s.configGeneration = saved.configGeneration
            s.queueErrors = saved.queueErrors
            // The line's level follows InterruptStatus. The irqchip was restored with the
            // level in it, KVM's per-source line state was not: drive it once more from here.
            s.lineHigh = s.interruptStatus != 0
            interrupt.setLevel(s.lineHigh)
            return .success(())
        }
        try result.get()
    }
}

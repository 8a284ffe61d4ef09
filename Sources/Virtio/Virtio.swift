import GuestMemory

/// Constants from the virtio 1.2 specification that both the transport and the
/// devices use.
public enum VirtioFeature {
    public static let version1: UInt64 = 1 << 32
    public static let ringIndirectDescriptors: UInt64 = 1 << 28
}

public enum VirtioDeviceID {
    public static let block: UInt32 = 2
    public static let console: UInt32 = 3
}

/// Device status bits (virtio 1.2 section 2.1).
public enum VirtioStatus {
    public static let acknowledge: UInt32 = 1
    public static let driver: UInt32 = 2
    public static let driverOK: UInt32 = 4
    public static let featuresOK: UInt32 = 8
    public static let deviceNeedsReset: UInt32 = 64
    public static let failed: UInt32 = 128
}

/// A virtio device model behind a transport. The transport owns feature
/// negotiation, the status state machine and the queues; the device owns its
/// configuration space and what requests mean.
///
/// All calls come from the transport with its lock held, one at a time.
public protocol VirtioDevice: AnyObject, Sendable {
    var deviceID: UInt32 { get }
    /// Every feature the device offers, VIRTIO_F_VERSION_1 included.
    var offeredFeatures: UInt64 { get }
    /// The maximum size of each queue; the count is the number of queues.
    var queueMaxSizes: [UInt16] { get }
    /// Reads `size` bytes (1, 2, 4 or 8) of configuration space at `offset`, little-endian.
    func readConfig(offset: Int, size: Int) -> UInt64
    func writeConfig(offset: Int, size: Int, value: UInt64)
    /// The driver set DRIVER_OK with these features.
    func activate(features: UInt64)
    /// Serves what the driver made available on queue `index`. All queues are
    /// passed because some devices answer on another queue (virtio-console's
    /// control messages); only ready queues may be used.
    func process(queue index: Int, queues: inout [SplitQueue], memory: GuestMemory) -> QueueProcessing
    /// The driver reset the device: forget negotiated state.
    func reset()
}

/// What one round of queue processing did.
public struct QueueProcessing: Equatable, Sendable {
    public mutating func merge(_ other: QueueProcessing) {
        returnedBuffers = returnedBuffers || other.returnedBuffers
        malformedChains += other.malformedChains
        ringError = ringError ?? other.ringError
    }

    /// Buffers went back to the driver: raise the used-buffer interrupt.
    public var returnedBuffers = false
    /// Chains that failed validation; each was returned unused (0 bytes written).
    public var malformedChains = 0
    /// The rings themselves are broken (index jump, ring outside RAM): the device
    /// stops using the queue until the driver resets it.
    public var ringError: QueueError?
    public init() {}
}

/// One interrupt input of the guest's interrupt controller, as a device sees it.
///
/// Devices model level-triggered lines: they raise the line while an interrupt
/// is pending and lower it when it is not. How that reaches the guest (KVM_IRQ_LINE
/// on the in-kernel irqchip, a test recorder) is the implementation's business.
public protocol InterruptLine: Sendable {
    func setLevel(_ high: Bool)
}

extension SplitQueue {
    /// Drains the available ring: validates each chain and hands it to `serve`,
    /// which returns the bytes it wrote; malformed chains go back unused. The
    /// loop handles the bookkeeping every device shares.
    /// `more` is asked before each chain: a device whose consumer is behind
    /// stops there and leaves the rest in the ring for a later service.
    public mutating func drain(memory: GuestMemory, while more: () -> Bool = { true },
                               _ serve: (DescriptorChain) -> UInt32) -> QueueProcessing {
        var result = QueueProcessing()
        do {
            while more(), let head = try popAvailable(memory: memory) {
                let written: UInt32
                do {
                    written = serve(try chain(head: head, memory: memory))
                } catch {
                    result.malformedChains += 1
                    written = 0
                }
                // A head beyond the queue cannot be returned: the driver would index past its ring.
                if head < size {
                    try addUsed(head: head, written: written, memory: memory)
                    result.returnedBuffers = true
                }
            }
        } catch {
            result.ringError = error
        }
        return result
    }
}

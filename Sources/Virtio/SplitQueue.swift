import GuestMemory
import Synchronization

/// One buffer of a descriptor chain, already checked to lie inside guest RAM.
public struct Descriptor: Equatable, Sendable {
    public let address: GuestAddress
    public let length: UInt32
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    public let isWritable: Bool

    public init(address: GuestAddress, length: UInt32, isWritable: Bool) {
        self.address = address
        self.length = length
        self.isWritable = isWritable
    }
}

/// A validated chain: device-readable buffers first, then device-writable ones.
public struct DescriptorChain: Equatable, Sendable {
    public let head: UInt16
    public let readable: [Descriptor]
    public let writable: [Descriptor]

    public var readableLength: UInt64 { readable.reduce(0) { $0 + UInt64($1.length) } }
    public var writableLength: UInt64 { writable.reduce(0) { $0 + UInt64($1.length) } }
}

/// Every way a driver's queue can be wrong; one case per violation.
public enum QueueError: Error, Equatable, Sendable, CustomStringConvertible {
    case notReady
    case headOutOfRange(UInt16)
    case nextOutOfRange(UInt16)
    case chainTooLong(limit: Int)
    case bufferOutsideMemory(address: UInt64, length: UInt32)
    case readableAfterWritable
    case indirectNotNegotiated
    case indirectInsideIndirect
    case indirectWithNext
    case indirectTableSize(UInt32)
    case availableIndexJump(from: UInt16, to: UInt16, size: UInt16)
    case ringOutsideMemory

    public var description: String {
        switch self {
        case .notReady: return "queue used before it was made ready"
        case let .headOutOfRange(i): return "descriptor head \(i) is outside the queue"
        case let .nextOutOfRange(i): return "descriptor next \(i) is outside the table"
        case let .chainTooLong(limit): return "descriptor chain longer than \(limit) (a loop?)"
        case let .bufferOutsideMemory(a, l): return "buffer 0x\(String(a, radix: 16))+\(l) is outside guest RAM"
        case .readableAfterWritable: return "a device-readable buffer follows a device-writable one"
        case .indirectNotNegotiated: return "indirect descriptor without VIRTIO_F_INDIRECT_DESC"
        case .indirectInsideIndirect: return "indirect descriptor inside an indirect table"
        case .indirectWithNext: return "indirect descriptor with the NEXT flag"
        case let .indirectTableSize(n): return "indirect table of \(n) bytes is not a whole number of descriptors"
        case let .availableIndexJump(from, to, size): return "available index moved from \(from) to \(to), more than the queue size \(size)"
        case .ringOutsideMemory: return "a ring lies outside guest RAM"
        }
    }
}

/// A split virtqueue (virtio 1.2 section 2.7) as the device sees it.
///
/// Everything it reads from the rings is guest-controlled: every index is
/// checked against the queue size, every buffer against guest RAM (with
/// overflow-checked arithmetic), and a chain is validated whole before the
/// device touches any of its buffers.
public struct SplitQueue: Sendable {
    public let maxSize: UInt16
    public var size: UInt16
    public var ready = false
    public var descriptorTable = GuestAddress(0)
    public var availableRing = GuestAddress(0)
    public var usedRing = GuestAddress(0)
    /// Negotiated VIRTIO_F_INDIRECT_DESC.
    public var indirectAllowed = false

    /// The next available-ring slot the device will read (free-running, wraps at 2^16).
    public private(set) var nextAvailable: UInt16 = 0
    /// The next used-ring slot the device will write.
    public private(set) var nextUsed: UInt16 = 0

    static let descriptorSize: UInt64 = 16
    static let flagNext: UInt16 = 1
    static let flagWrite: UInt16 = 2
    static let flagIndirect: UInt16 = 4

    public init(maxSize: UInt16) {
        self.maxSize = maxSize
        self.size = maxSize
    }

    /// Back to the reset state (sizes and addresses forgotten).
    public mutating func reset() {
        self = SplitQueue(maxSize: maxSize)
    }

    /// Whether the configured size and ring addresses are usable: a power of two
    /// no larger than the maximum, each ring aligned as the spec requires and
    /// wholly inside guest RAM.
    public func isValid(memory: GuestMemory) -> Bool {
        guard size > 0, size <= maxSize, size & (size - 1) == 0 else { return false }
        let n = UInt64(size)
        return descriptorTable.raw % 16 == 0 && availableRing.raw % 2 == 0 && usedRing.raw % 4 == 0
            && memory.contains(descriptorTable, length: 16 * n)
            && memory.contains(availableRing, length: 6 + 2 * n)
            && memory.contains(usedRing, length: 6 + 8 * n)
    }

    /// The head of the next available chain, or nil when the driver has made nothing new available.
    public mutating func popAvailable(memory: GuestMemory) throws(QueueError) -> UInt16? {
        guard ready else { throw .notReady }
        let availIndex: UInt16
        do { availIndex = try memory.read(UInt16.self, at: GuestAddress(availableRing.raw + 2)) } catch { throw .ringOutsideMemory }
        // Read the ring entries only after the index that covers them (pairs with the driver's write barrier).
        atomicMemoryFence(ordering: .acquiring)
        let pending = availIndex &- nextAvailable
        guard pending != 0 else { return nil }
        guard pending <= size else { throw .availableIndexJump(from: nextAvailable, to: availIndex, size: size) }
        let slot = UInt64(nextAvailable % size)
        let head: UInt16
        do { head = try memory.read(UInt16.self, at: GuestAddress(availableRing.raw + 4 + 2 * slot)) } catch { throw .ringOutsideMemory }
        nextAvailable &+= 1
        return head
    }

    /// Walks and validates the chain starting at `head`; touches no buffer.
    public func chain(head: UInt16, memory: GuestMemory) throws(QueueError) -> DescriptorChain {
        guard head < size else { throw .headOutOfRange(head) }
        var readable: [Descriptor] = []
        var writable: [Descriptor] = []
        var table = descriptorTable
        var tableSize = UInt64(size)
        var index = UInt64(head)
        var inIndirect = false
        // A chain can hold at most one visit per descriptor; more means a loop.
        var budget = Int(size)
        while true {
            budget -= 1
            guard budget >= 0 else { throw .chainTooLong(limit: Int(size)) }
            let at = table.raw + index * Self.descriptorSize  // table is inside RAM: checked on ready / below
            let address: UInt64, length: UInt32, flags: UInt16, next: UInt16
            do {
                address = try memory.read(UInt64.self, at: GuestAddress(at))
                length = try memory.read(UInt32.self, at: GuestAddress(at + 8))
                flags = try memory.read(UInt16.self, at: GuestAddress(at + 12))
                next = try memory.read(UInt16.self, at: GuestAddress(at + 14))
            } catch { throw .ringOutsideMemory }

            if flags & Self.flagIndirect != 0 {
                guard indirectAllowed else { throw .indirectNotNegotiated }
                guard !inIndirect else { throw .indirectInsideIndirect }
                guard flags & Self.flagNext == 0 else { throw .indirectWithNext }
                guard length > 0, UInt64(length) % Self.descriptorSize == 0,
                      UInt64(length) / Self.descriptorSize <= 0xFFFF else { throw .indirectTableSize(length) }
                guard memory.contains(GuestAddress(address), length: UInt64(length)) else {
                    throw .bufferOutsideMemory(address: address, length: length)
                }
                table = GuestAddress(address)
                tableSize = UInt64(length) / Self.descriptorSize
                index = 0
                inIndirect = true
                budget = Int(tableSize)
                continue
            }
            guard memory.contains(GuestAddress(address), length: UInt64(length)) else {
                throw .bufferOutsideMemory(address: address, length: length)
            }
            let d = Descriptor(address: GuestAddress(address), length: length, isWritable: flags & Self.flagWrite != 0)
            if d.isWritable {
                writable.append(d)
            } else {
                guard writable.isEmpty else { throw .readableAfterWritable }
                readable.append(d)
            }
            guard flags & Self.flagNext != 0 else { break }
            guard UInt64(next) < tableSize else { throw .nextOutOfRange(next) }
            index = UInt64(next)
        }
        return DescriptorChain(head: head, readable: readable, writable: writable)
    }

    /// Returns chain `head` to the driver with `written` bytes written into it.
    public mutating func addUsed(head: UInt16, written: UInt32, memory: GuestMemory) throws(QueueError) {
        let slot = UInt64(nextUsed % size)
        do {
            try memory.write(UInt32(head), at: GuestAddress(usedRing.raw + 4 + 8 * slot))
            try memory.write(written, at: GuestAddress(usedRing.raw + 4 + 8 * slot + 4))
            nextUsed &+= 1
            // The element must be visible before the index that publishes it
            // (virtio 1.2 2.7.8.2): the driver reads idx, then the ring.
            atomicMemoryFence(ordering: .releasing)
            try memory.write(nextUsed, at: GuestAddress(usedRing.raw + 2))
        } catch { throw .ringOutsideMemory }
    }
}

/// A split virtqueue as a plain value, for snapshots: what the device side
/// knows of the queue (the rings themselves are in guest RAM).
public struct QueueState: Equatable, Sendable {
    public var maxSize: UInt16
    public var size: UInt16
    public var ready: Bool
    public var descriptorTable: UInt64
    public var availableRing: UInt64
    public var usedRing: UInt64
    public var indirectAllowed: Bool
    public var nextAvailable: UInt16
    public var nextUsed: UInt16

    public init(maxSize: UInt16, size: UInt16, ready: Bool, descriptorTable: UInt64, availableRing: UInt64, usedRing: UInt64,
                indirectAllowed: Bool, nextAvailable: UInt16, nextUsed: UInt16) {
        self.maxSize = maxSize; self.size = size; self.ready = ready
        self.descriptorTable = descriptorTable; self.availableRing = availableRing; self.usedRing = usedRing
        self.indirectAllowed = indirectAllowed; self.nextAvailable = nextAvailable; self.nextUsed = nextUsed
    }
}

/// A saved device state that cannot be taken back: which field, which value,
/// why. State read from a snapshot file is untrusted input, checked like a
/// descriptor chain before any of it is used.
public struct StateError: Error, Equatable, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

extension SplitQueue {
    public var state: QueueState {
        QueueState(maxSize: maxSize, size: size, ready: ready, descriptorTable: descriptorTable.raw,
                   availableRing: availableRing.raw, usedRing: usedRing.raw, indirectAllowed: indirectAllowed,
                   nextAvailable: nextAvailable, nextUsed: nextUsed)
    }

    /// Rebuilds a queue from `state`, for a device whose queue holds at most
    /// `maxSize` entries: the same rules the transport applies to a driver
    /// (a ready queue has a power-of-two size within the maximum and aligned
    /// rings wholly inside `memory`), so a restored queue is one the driver
    /// could have set up.
    public init(restoring state: QueueState, maxSize: UInt16, memory: GuestMemory, name: String) throws(StateError) {
        guard state.maxSize == maxSize else {
            throw StateError("\(name): the saved queue holds at most \(state.maxSize) entries, this device's \(maxSize)")
        }
        self.init(maxSize: maxSize)
        size = state.size
        descriptorTable = GuestAddress(state.descriptorTable)
        availableRing = GuestAddress(state.availableRing)
        usedRing = GuestAddress(state.usedRing)
        if state.ready {
            guard isValid(memory: memory) else {
                throw StateError("\(name): the saved ready queue (size \(state.size), rings at 0x\(String(state.descriptorTable, radix: 16)), 0x\(String(state.availableRing, radix: 16)), 0x\(String(state.usedRing, radix: 16))) is not one a driver could set up in this guest's RAM")
            }
        }
        ready = state.ready
        indirectAllowed = state.indirectAllowed
        nextAvailable = state.nextAvailable
        nextUsed = state.nextUsed
    }
}

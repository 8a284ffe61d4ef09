import GuestMemory
import Synchronization
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// Where a guest's console output goes: a virtio-console port, or the UART.
/// Called on a vCPU thread with the device's lock held: it must not call back
/// into the device, and should not block (buffer, or drop and count).
public protocol ConsoleOutput: Sendable {
    func write(_ bytes: UnsafeRawBufferPointer)
    /// False while the consumer is behind: a virtio-console port then leaves
    /// the guest's buffers in its transmit queue (so the guest's writes block,
    /// as on a full pipe) until the consumer calls
    /// `MMIOTransport.serviceQueue` for that queue. Checked before each chain.
    var acceptsMore: Bool { get }
}

extension ConsoleOutput {
    public var acceptsMore: Bool { true }
}

/// Port output kept in memory up to a limit; the rest is counted, not kept.
public final class BoundedCapture: ConsoleOutput {
    private let state = Mutex<(bytes: [UInt8], dropped: Int)>(([], 0))
    public let limit: Int
    public init(limit: Int) { self.limit = limit }
    public func write(_ bytes: UnsafeRawBufferPointer) {
        state.withLock { s in
            let room = max(0, limit - s.bytes.count)
            s.bytes.append(contentsOf: bytes.prefix(room))
            s.dropped += max(0, bytes.count - room)
        }
    }
    public var bytes: [UInt8] { state.withLock { $0.bytes } }
    public var droppedBytes: Int { state.withLock { $0.dropped } }
    public var text: String { String(decoding: bytes, as: UTF8.self) }
}

/// virtio-console with VIRTIO_CONSOLE_F_MULTIPORT (virtio 1.2 section 5.3):
/// named ports (control, stdin, stdout, stderr for the agent) announced over
/// the control queues.
///
/// Queue layout: port 0 receive/transmit (0, 1), control receive/transmit
/// (2, 3), then port n receive/transmit at (2n+2, 2n+3). Nothing here blocks:
/// guest output goes to each port's `ConsoleOutput`; host input and control
/// messages wait in bounded queues until the driver posts receive buffers.
public final class ConsoleDevice: VirtioDevice, @unchecked Sendable {
    // @unchecked: mutable state is in `state` (a Mutex); `process` is serialised by the transport.
    public static let queueSize: UInt16 = 64
    public static let multiportFeature: UInt64 = 1 << 1
    /// Host input waiting for a port's receive buffers, per port.
    public static let inputCapacity = 64 << 10
    /// Control messages waiting for control receive buffers.
    static let controlBacklogLimit = 256
    /// The most guest output one transmit chain may carry. Linux sends at most
    /// 32 KiB per write (a spliced pipe, 16 pages); without a cap a chain of 64
    /// descriptors that all point at the whole of RAM would hand the host's
    /// output buffers gigabytes at once. Bytes past it are dropped and counted.
    public static let transmitChainLimit = 1 << 20

    enum Control {
        static let deviceReady: UInt16 = 0, deviceAdd: UInt16 = 1, deviceRemove: UInt16 = 2
        static let portReady: UInt16 = 3, consolePort: UInt16 = 4, resize: UInt16 = 5
        static let portOpen: UInt16 = 6, portName: UInt16 = 7
    }

    public struct PortSpec: Sendable {
        public let name: String
        public let output: (any ConsoleOutput)?
        /// Called (with the device's lock held: signal, don't call back) when
        /// queued host input for this port has moved into guest buffers, so a
        /// producer waiting for room in `queueInput` can go on.
        public let inputConsumed: (@Sendable () -> Void)?
        public init(name: String, output: (any ConsoleOutput)?, inputConsumed: (@Sendable () -> Void)? = nil) {
            self.name = name
            self.output = output
            self.inputConsumed = inputConsumed
        }
    }

    struct PortState {
        var input = [UInt8]()
        var droppedInput = 0
        var guestReady = false
        var guestOpen = false
    }

    struct State {
        var ports: [PortState]
        var control: [[UInt8]] = []
        var droppedControl = 0
        var driverReady = false
        var malformedControl = 0
        /// Guest output past `transmitChainLimit` in a chain, dropped.
        var oversizedTransmitBytes: UInt64 = 0
    }

    public let ports: [PortSpec]
    private let state: Mutex<State>

    public init(ports: [PortSpec]) {
        precondition(!ports.isEmpty, "a console needs at least one port")
        self.ports = ports
        state = Mutex(State(ports: ports.map { _ in PortState() }))
    }

    public var deviceID: UInt32 { VirtioDeviceID.console }
    public var offeredFeatures: UInt64 { VirtioFeature.version1 | Self.multiportFeature }
    public var queueMaxSizes: [UInt16] { [UInt16](repeating: Self.queueSize, count: 2 * ports.count + 2) }

    /// The receive queue of `port` (host to guest).
    public static func receiveQueue(port: Int) -> Int { port == 0 ? 0 : 2 * port + 2 }
    /// The transmit queue of `port` (guest to host).
    public static func transmitQueue(port: Int) -> Int { port == 0 ? 1 : 2 * port + 3 }
    static let controlReceive = 2, controlTransmit = 3

    /// Whether the guest has opened `port` (PORT_OPEN 1 from the driver).
    public func isOpenInGuest(port: Int) -> Bool { state.withLock { $0.ports[port].guestOpen } }

    /// Queues host input for `port`; returns how many bytes fit. Call
    /// `MMIOTransport.serviceQueue(ConsoleDevice.receiveQueue(port:))` after it.
    @discardableResult
    public func queueInput(port: Int, _ bytes: [UInt8]) -> Int {
        state.withLock { s in
            let room = max(0, Self.inputCapacity - s.ports[port].input.count)
            s.ports[port].input.append(contentsOf: bytes.prefix(room))
            s.ports[port].droppedInput += bytes.count - min(room, bytes.count)
            return min(room, bytes.count)
        }
    }

    public func readConfig(offset: Int, size: Int) -> UInt64 {
        // struct virtio_console_config: cols (le16) at 0, rows (le16) at 2, max_nr_ports (le32) at 4, emerg_wr at 8.
        let config: [UInt8] = [0, 0, 0, 0] + withUnsafeBytes(of: UInt32(ports.count).littleEndian, Array.init) + [0, 0, 0, 0]
        guard offset >= 0, offset < config.count else { return 0 }
        var v: UInt64 = 0
        for i in 0..<size where offset + i < config.count { v |= UInt64(config[offset + i]) << UInt64(8 * i) }
        return v
    }

    public func writeConfig(offset: Int, size: Int, value: UInt64) {}  // emerg_wr is not offered

    public func activate(features: UInt64) {}

    public func reset() {
        state.withLock { s in s = State(ports: ports.map { _ in PortState() }) }
    }

    public func process(queue index: Int, queues: inout [SplitQueue], memory: GuestMemory) -> QueueProcessing {
        var result = QueueProcessing()
        switch index {
        case Self.controlTransmit:
            result = queues[index].drain(memory: memory) { chain in
                handleControl(Self.gather(chain.readable, memory: memory))
                return 0
            }
            result.merge(deliverControl(&queues, memory: memory))
            // Opening a port may let pending input through.
            for p in ports.indices { result.merge(deliverInput(port: p, &queues, memory: memory)) }
        case Self.controlReceive:
            result = deliverControl(&queues, memory: memory)
        default:
            guard let (port, transmit) = portOf(queue: index) else { return result }
            if transmit {
                let output = ports[port].output
                result = queues[index].drain(memory: memory, while: { output?.acceptsMore ?? true }) { chain in
                    // Guest output: copied out buffer by buffer, never held back, at most
                    // transmitChainLimit bytes of it per chain.
                    var room = Self.transmitChainLimit
                    var dropped: UInt64 = 0
                    for d in chain.readable where d.length > 0 {
                        let take = min(Int(d.length), room)
                        dropped += UInt64(Int(d.length) - take)
                        guard take > 0 else { continue }
                        room -= take
                        _ = try? memory.withMutableBytes(at: d.address, length: UInt64(take)) { b in
                            output?.write(UnsafeRawBufferPointer(b))
                        }
                    }
                    if dropped > 0 { state.withLock { $0.oversizedTransmitBytes &+= dropped } }
                    return 0
                }
            } else {
                result = deliverInput(port: port, &queues, memory: memory)
            }
        }
        return result
    }

    func portOf(queue: Int) -> (port: Int, transmit: Bool)? {
        switch queue {
        case 0: return (0, false)
        case 1: return (0, true)
        case 4...:
            let port = (queue - 2) / 2
            return port < ports.count ? (port, queue % 2 == 1) : nil
        default: return nil
        }
    }

    /// Guest output dropped because a transmit chain carried more than `transmitChainLimit`.
    public var oversizedTransmitBytes: UInt64 { state.withLock { $0.oversizedTransmitBytes } }

    /// Acts on one control message from the driver (struct virtio_console_control: id le32, event le16, value le16).
    func handleControl(_ message: [UInt8]) {
        guard message.count >= 8 else { state.withLock { $0.malformedControl += 1 }; return }
        let id = Int(UInt32(message[0]) | UInt32(message[1]) << 8 | UInt32(message[2]) << 16 | UInt32(message[3]) << 24)
        let event = UInt16(message[4]) | UInt16(message[5]) << 8
        let value = UInt16(message[6]) | UInt16(message[7]) << 8
        state.withLock { s in
            switch event {
            case Control.deviceReady:
                guard value == 1, !s.driverReady else { return }
                s.driverReady = true
                for p in ports.indices { enqueue(&s, Self.message(id: p, event: Control.deviceAdd, value: 0)) }
            case Control.portReady:
                guard id < ports.count, value == 1, !s.ports[id].guestReady else { return }
                s.ports[id].guestReady = true
                enqueue(&s, Self.message(id: id, event: Control.portName, value: 0) + Array(ports[id].name.utf8))
                enqueue(&s, Self.message(id: id, event: Control.portOpen, value: 1))
            case Control.portOpen:
                guard id < ports.count else { return }
                s.ports[id].guestOpen = value == 1
            default:
                break  // resize and the rest: nothing to do for a headless console
            }
        }
    }

    private func enqueue(_ s: inout State, _ message: [UInt8]) {
        guard s.control.count < Self.controlBacklogLimit else { s.droppedControl += 1; return }
        s.control.append(message)
    }

    static func message(id: Int, event: UInt16, value: UInt16) -> [UInt8] {
        withUnsafeBytes(of: UInt32(id).littleEndian, Array.init) + withUnsafeBytes(of: event.littleEndian, Array.init)
            + withUnsafeBytes(of: value.littleEndian, Array.init)
    }

    /// Sends pending control messages into control receive buffers, one per buffer.
    func deliverControl(_ queues: inout [SplitQueue], memory: GuestMemory) -> QueueProcessing {
        guard queues[Self.controlReceive].ready else { return QueueProcessing() }
        return fill(&queues[Self.controlReceive], memory: memory) {
            state.withLock { s in s.control.isEmpty ? nil : s.control.removeFirst() }
        } putBack: { rest, unsent in
            // A message with no buffer waits; the tail of one cut short by a small buffer is dropped
            // (messages are never split across buffers).
            if unsent { state.withLock { s in s.control.insert(rest, at: 0) } }
        }
    }

    /// Moves queued host input for `port` into its receive buffers.
    func deliverInput(port: Int, _ queues: inout [SplitQueue], memory: GuestMemory) -> QueueProcessing {
        let q = Self.receiveQueue(port: port)
        guard q < queues.count, queues[q].ready else { return QueueProcessing() }
        let result = fill(&queues[q], memory: memory) {
            state.withLock { s in
                guard s.ports[port].guestOpen, !s.ports[port].input.isEmpty else { return nil }
                let chunk = s.ports[port].input
                s.ports[port].input.removeAll(keepingCapacity: true)
                return chunk
            }
        } putBack: { rest, _ in
            state.withLock { s in s.ports[port].input.insert(contentsOf: rest, at: 0) }
        }
        if result.returnedBuffers { ports[port].inputConsumed?() }
        return result
    }

    /// Pops receive buffers while `next` has bytes, writes them in, returns what did not fit.
    private func fill(_ queue: inout SplitQueue, memory: GuestMemory, next: () -> [UInt8]?,
                      putBack: (_ rest: [UInt8], _ unsent: Bool) -> Void) -> QueueProcessing {
        var result = QueueProcessing()
        do {
            while let data = next() {
                guard let head = try queue.popAvailable(memory: memory) else {
                    putBack(data, true)
                    break
                }
                var written: UInt32 = 0
                if let chain = try? queue.chain(head: head, memory: memory) {
                    written = Self.scatter(data, into: chain.writable, memory: memory)
                    if Int(written) < data.count { putBack(Array(data[Int(written)...]), false) }
                } else {
                    result.malformedChains += 1
                    putBack(data, true)
                }
                try queue.addUsed(head: head, written: written, memory: memory)
                result.returnedBuffers = true
            }
        } catch {
            result.ringError = error
        }
        return result
    }

    /// Copies `data` across writable buffers; returns how many bytes went in.
    static func scatter(_ data: [UInt8], into buffers: [Descriptor], memory: GuestMemory) -> UInt32 {
        var done = 0
        for d in buffers where done < data.count {
            let n = min(Int(d.length), data.count - done)
            guard (try? memory.write(Array(data[done..<(done + n)]), at: d.address)) != nil else { break }
            done += n
        }
        return UInt32(done)
    }

    /// The bytes of readable buffers, up to a small limit (control messages are 8 bytes plus a name).
    static func gather(_ buffers: [Descriptor], memory: GuestMemory, limit: Int = 4096) -> [UInt8] {
        var out: [UInt8] = []
        for d in buffers where out.count < limit {
            let n = min(Int(d.length), limit - out.count)
            guard let bytes = try? memory.readBytes(at: d.address, count: n) else { break }
            out += bytes
        }
        return out
    }
}

/// A console device's state as a plain value, for snapshots: what each port
/// knows of the guest's side, host input not yet delivered, control messages
/// waiting for the driver's buffers.
public struct ConsoleDeviceState: Equatable, Sendable {
    public struct Port: Equatable, Sendable {
        public var name: String
        public var input: [UInt8]
        public var droppedInput: Int
        public var guestReady: Bool
        public var guestOpen: Bool
        public init(name: String, input: [UInt8], droppedInput: Int, guestReady: Bool, guestOpen: Bool) {
            self.name = name; self.input = input; self.droppedInput = droppedInput
            self.guestReady = guestReady; self.guestOpen = guestOpen
        }
    }
    public var ports: [Port]
    public var control: [[UInt8]]
    public var droppedControl: Int
    public var driverReady: Bool
    public var malformedControl: Int
    public var oversizedTransmitBytes: UInt64

    public init(ports: [Port], control: [[UInt8]], droppedControl: Int, driverReady: Bool, malformedControl: Int,
                oversizedTransmitBytes: UInt64) {
        self.ports = ports; self.control = control; self.droppedControl = droppedControl
        self.driverReady = driverReady; self.malformedControl = malformedControl; self.oversizedTransmitBytes = oversizedTransmitBytes
    }
}

extension ConsoleDevice {
    /// The longest control message the device itself sends: PORT_NAME with a name.
    public static let maxControlMessage = 8 + 4096

    public func captureState() -> ConsoleDeviceState {
        state.withLock { s in
            ConsoleDeviceState(
                ports: zip(ports, s.ports).map { spec, p in
                    ConsoleDeviceState.Port(name: spec.name, input: p.input, droppedInput: p.droppedInput,
                                            guestReady: p.guestReady, guestOpen: p.guestOpen)
                },
                control: s.control, droppedControl: s.droppedControl, driverReady: s.driverReady,
                malformedControl: s.malformedControl, oversizedTransmitBytes: s.oversizedTransmitBytes)
        }
    }

    /// Takes over a saved state. The ports must be the same, by name and in
    /// order (the guest has opened them by number); what waits in them is held
    /// to the limits the device keeps while it runs.
    public func restoreState(_ saved: ConsoleDeviceState, name: String) throws(StateError) {
        guard saved.ports.map(\.name) == ports.map(\.name) else {
            throw StateError("\(name): the snapshot's console ports are \(saved.ports.map(\.name)), this device's \(ports.map(\.name))")
        }
        for p in saved.ports {
            guard p.input.count <= Self.inputCapacity else {
                throw StateError("\(name) port \(p.name): \(p.input.count) bytes of saved input, more than the \(Self.inputCapacity) a port holds")
            }
            guard p.droppedInput >= 0 else { throw StateError("\(name) port \(p.name): negative dropped-input count") }
        }
        guard saved.control.count <= Self.controlBacklogLimit else {
            throw StateError("\(name): \(saved.control.count) saved control messages, more than the \(Self.controlBacklogLimit) the device queues")
        }
        for m in saved.control where m.count < 8 || m.count > Self.maxControlMessage {
            throw StateError("\(name): a saved control message of \(m.count) bytes (they are 8 to \(Self.maxControlMessage))")
        }
        guard saved.droppedControl >= 0, saved.malformedControl >= 0 else { throw StateError("\(name): negative counters") }
        state.withLock { s in
            s.ports = saved.ports.map { p in
                var st = PortState()
                st.input = p.input
                st.droppedInput = p.droppedInput
                st.guestReady = p.guestReady
                st.guestOpen = p.guestOpen
                return st
            }
            s.control = saved.control
            s.droppedControl = saved.droppedControl
            s.driverReady = saved.driverReady
            s.malformedControl = saved.malformedControl
            s.oversizedTransmitBytes = saved.oversizedTransmitBytes
        }
    }
}

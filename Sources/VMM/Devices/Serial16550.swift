import Synchronization
import Virtio

/// Where a UART's transmitted bytes go (stdout, a capture buffer).
public protocol SerialSink: Sendable {
    func write(_ bytes: UnsafeRawBufferPointer)
}

/// A 16550A UART as Linux's 8250 driver expects to find it: it probes as a
/// 16550A (FIFO bits in IIR, a 4-bit IER, working scratch and loopback), and it
/// raises transmit-empty interrupts, without which user-space writes to
/// /dev/console stall.
///
/// Transmission is instantaneous: a THR write goes straight to the sink, so
/// LSR always reports the transmitter empty. Input from the host waits in a
/// bounded queue; what does not fit is refused and counted.
public final class Serial16550: BusDevice {
    // Register offsets (DLAB = 0 unless noted).
    static let rbrTHR: UInt64 = 0, ier: UInt64 = 1, iirFCR: UInt64 = 2, lcr: UInt64 = 3
    static let mcr: UInt64 = 4, lsr: UInt64 = 5, msr: UInt64 = 6, scr: UInt64 = 7

    // IER bits.
    static let ierReceivedData: UInt8 = 0x01
    static let ierTransmitEmpty: UInt8 = 0x02
    // IIR values.
    static let iirNone: UInt8 = 0x01
    static let iirTransmitEmpty: UInt8 = 0x02
    static let iirReceivedData: UInt8 = 0x04
    static let iirFIFOEnabled: UInt8 = 0xC0
    // LCR, MCR, LSR bits.
    static let lcrDLAB: UInt8 = 0x80
    static let mcrOUT2: UInt8 = 0x08
    static let mcrLoop: UInt8 = 0x10
    static let lsrDataReady: UInt8 = 0x01
    static let lsrTransmitterEmpty: UInt8 = 0x60  // THRE | TEMT
    // FCR bits.
    static let fcrEnable: UInt8 = 0x01
    static let fcrClearReceive: UInt8 = 0x02

    /// Host input waiting for the guest; bounded so a flood of input cannot grow the VMM.
    public static let inputCapacity = 4096

    private struct State {
        var divisorLow: UInt8 = 0x0C  // 9600 baud, what firmware leaves
        var divisorHigh: UInt8 = 0
        var ier: UInt8 = 0
        var lcr: UInt8 = 0x03         // 8N1
        var mcr: UInt8 = 0x08         // OUT2
        var scratch: UInt8 = 0
        var fifoEnabled = false
        /// A transmit-empty interrupt is pending (cleared by reading IIR or writing THR).
        var transmitEmptyPending = false
        var input = ByteRing(capacity: Serial16550.inputCapacity)
        var droppedInput = 0
        var lineHigh = false

        var dlab: Bool { lcr & Serial16550.lcrDLAB != 0 }
        var loopback: Bool { mcr & Serial16550.mcrLoop != 0 }

        var iir: UInt8 {
            let fifo = fifoEnabled ? Serial16550.iirFIFOEnabled : 0
            if ier & Serial16550.ierReceivedData != 0, !input.isEmpty { return Serial16550.iirReceivedData | fifo }
            if ier & Serial16550.ierTransmitEmpty != 0, transmitEmptyPending { return Serial16550.iirTransmitEmpty | fifo }
            return Serial16550.iirNone | fifo
        }

        /// The PC wiring: the UART drives its IRQ only with OUT2 set, and not in loopback.
        var wantsLine: Bool { iir & Serial16550.iirNone == 0 && mcr & Serial16550.mcrOUT2 != 0 && !loopback }

        var msr: UInt8 {
            guard loopback else { return 0xB0 }  // DCD | DSR | CTS: a connected line
            // Loopback wires DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
            let m = mcr
            return ((m & 0x01) << 5) | ((m & 0x02) << 3) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
        }
    }

    private let state = Mutex(State())
    private let interrupt: any InterruptLine
    private let output: any SerialSink

    public init(interrupt: any InterruptLine, output: any SerialSink) {
        self.interrupt = interrupt
        self.output = output
    }

    /// Queues host bytes for the guest to read; returns how many fit.
    @discardableResult
    public func receive(_ bytes: [UInt8]) -> Int {
        state.withLock { s in
            var accepted = 0
            for b in bytes where s.input.push(b) { accepted += 1 }
            s.droppedInput += bytes.count - accepted
            updateLine(&s)
            return accepted
        }
    }

    /// Host input refused because the queue was full.
    public var droppedInputBytes: Int { state.withLock { $0.droppedInput } }

    public func read(offset: UInt64, size: Int) -> UInt64 {
        state.withLock { s in
            let value: UInt8
            switch offset {
            case Self.rbrTHR where s.dlab: value = s.divisorLow
            case Self.ier where s.dlab: value = s.divisorHigh
            case Self.rbrTHR: value = s.input.pop() ?? 0
            case Self.ier: value = s.ier
            case Self.iirFCR:
                value = s.iir
                // Reading IIR while it reports transmit-empty acknowledges it, as on the chip.
                if value & 0x0F == Self.iirTransmitEmpty { s.transmitEmptyPending = false }
            case Self.lcr: value = s.lcr
            case Self.mcr: value = s.mcr
            case Self.lsr: value = Self.lsrTransmitterEmpty | (s.input.isEmpty ? 0 : Self.lsrDataReady)
            case Self.msr: value = s.msr
            case Self.scr: value = s.scratch
            default: value = 0xFF
            }
            updateLine(&s)
            return UInt64(value)
        }
    }

    public func write(offset: UInt64, size: Int, value: UInt64) {
        // Wider accesses are not meaningful on byte registers: use the low byte.
        let byte = UInt8(truncatingIfNeeded: value)
        state.withLock { s in
            switch offset {
            case Self.rbrTHR where s.dlab: s.divisorLow = byte
            case Self.ier where s.dlab: s.divisorHigh = byte
            case Self.rbrTHR:
                if s.loopback {
                    _ = s.input.push(byte) || { s.droppedInput += 1; return false }()
                } else {
                    // The sink never calls back into the UART, so holding the lock keeps bytes in order.
                    withUnsafeBytes(of: byte) { output.write($0) }
                }
                // The byte left at once, so THR is empty again: re-arm the interrupt.
                s.transmitEmptyPending = true
            case Self.ier:
                let enabledNow = byte & Self.ierTransmitEmpty != 0 && s.ier & Self.ierTransmitEmpty == 0
                s.ier = byte & 0x0F
                // Enabling THRI while THR is empty raises the interrupt (Linux starts transmission this way).
                if enabledNow { s.transmitEmptyPending = true }
            case Self.iirFCR:
                s.fifoEnabled = byte & Self.fcrEnable != 0
                if byte & Self.fcrClearReceive != 0 { s.input.removeAll() }
            case Self.lcr: s.lcr = byte
            case Self.mcr: s.mcr = byte & 0x1F
            case Self.scr: s.scratch = byte
            default: break  // LSR and MSR are read-only
            }
            updateLine(&s)
        }
    }

    /// Drives the interrupt line to match the state; KVM is asked only on a change.
    private func updateLine(_ s: inout State) {
        let want = s.wantsLine
        guard want != s.lineHigh else { return }
        s.lineHigh = want
        interrupt.setLevel(want)
    }
}

/// A fixed-capacity byte FIFO (no allocation after init).
struct ByteRing {
    private var storage: [UInt8]
    private var head = 0
    private(set) var count = 0

    init(capacity: Int) { storage = [UInt8](repeating: 0, count: capacity) }

    var isEmpty: Bool { count == 0 }

    mutating func push(_ b: UInt8) -> Bool {
        guard count < storage.count else { return false }
        storage[(head + count) % storage.count] = b
        count += 1
        return true
    }

    mutating func pop() -> UInt8? {
        guard count > 0 else { return nil }
        let b = storage[head]
        head = (head + 1) % storage.count
        count -= 1
        return b
    }

    mutating func removeAll() {
        head = 0
        count = 0
    }
}

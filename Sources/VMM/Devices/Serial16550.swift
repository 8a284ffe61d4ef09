import Synchronization
import Virtio
import VirtioDevices

/// A 16550A UART as Linux's 8250 driver expects to find it (COM1: 8 ports at
/// 0x3F8, IRQ 4).
///
/// The driver must identify it as a 16550A (FIFO bits in IIR, a 4-bit IER, a
/// scratch register, modem lines looped back in loopback mode), and it must
/// raise transmit-empty interrupts: without them, user-space writes to
/// /dev/console stall, while kernel printk (which polls LSR) still works.
///
/// Transmission is instantaneous: a THR write reaches the sink before the
/// write returns, so LSR always reports the transmitter empty and the
/// transmit-empty interrupt re-arms after every byte. Input from the host
/// waits in a bounded queue that plays the receive FIFO; what does not fit is
/// refused and counted, so a flood of input cannot grow the VMM.
///
/// Not modelled, because nothing here produces them: line errors and breaks
/// (LSR bits 1-4 and 7 stay 0, so the line-status interrupt never fires) and
/// modem-line changes (MSR delta bits stay 0, so the modem-status interrupt
/// never fires). FIFO trigger levels are ignored: received data interrupts as
/// soon as one byte is waiting, which Linux handles like the timeout interrupt.
///
/// Concurrency: all state is behind one lock. The sink and the interrupt line
/// are called with the lock held. For the sink this keeps bytes from several
/// vCPUs in the order their THR writes were ordered; for the line it keeps
/// the level KVM sees in step with the state: if the level were set after
/// unlocking, a vCPU lowering it and a host thread raising it could reach
/// KVM in the opposite order and leave the line stuck at the wrong level.
/// Neither calls back into the UART (the sinks write to a descriptor or a
/// buffer; the KVM line issues one ioctl), so holding the lock cannot
/// deadlock; a slow sink only delays other accesses to this UART.
public final class Serial16550: BusDevice {
    /// Register offsets from the base port. With LCR.DLAB set, offsets 0 and 1
    /// are the divisor latch instead; IIR is read and FCR written at offset 2.
    enum Offset {
        static let data: UInt64 = 0        // RBR (read), THR (write); DLL with DLAB
        static let ier: UInt64 = 1         // DLM with DLAB
        static let iirFCR: UInt64 = 2
        static let lcr: UInt64 = 3
        static let mcr: UInt64 = 4
        static let lsr: UInt64 = 5
        static let msr: UInt64 = 6
        static let scratch: UInt64 = 7
    }

    enum IER {
        static let receivedData: UInt8 = 0x01
        static let transmitEmpty: UInt8 = 0x02
        /// A 16550A has four interrupt enables; the upper bits read back as 0.
        /// (Linux takes a writable bit 6 for an XScale UART's UUE bit.)
        static let implemented: UInt8 = 0x0F
    }

    enum IIR {
        static let nonePending: UInt8 = 0x01
        static let transmitEmpty: UInt8 = 0x02
        static let receivedData: UInt8 = 0x04
        /// Bits 7:6 both set while the FIFOs are on: what tells Linux's
        /// autoconfig a 16550A from an 8250, 16450 or the broken 16550.
        static let fifosEnabled: UInt8 = 0xC0
    }

    enum FCR {
        static let enable: UInt8 = 0x01
        static let clearReceive: UInt8 = 0x02
    }

    enum LCR {
        static let divisorLatchAccess: UInt8 = 0x80
    }

    enum MCR {
        static let dtr: UInt8 = 0x01
        static let rts: UInt8 = 0x02
        static let out1: UInt8 = 0x04
        static let out2: UInt8 = 0x08
        static let loopback: UInt8 = 0x10
        /// Bits 7:5 of a 16550A's MCR do not exist and read back as 0.
        static let implemented: UInt8 = 0x1F
    }

    enum LSR {
        static let dataReady: UInt8 = 0x01
        /// THRE | TEMT: transmission is instantaneous, so both are always set.
        static let transmitterEmpty: UInt8 = 0x60
    }

    enum MSR {
        static let cts: UInt8 = 0x10
        static let dsr: UInt8 = 0x20
        static let ri: UInt8 = 0x40
        static let dcd: UInt8 = 0x80
    }

    /// Host input that may wait for the guest, in bytes.
    public static let inputCapacity = 4096

    private struct State {
        /// The divisor latch has no reset value on the chip; 12 is 9600 baud.
        var divisorLow: UInt8 = 0x0C
        var divisorHigh: UInt8 = 0
        var ier: UInt8 = 0
        var lcr: UInt8 = 0
        /// Reset value 0: OUT2 clear, so the port drives no interrupt until the
        /// driver sets OUT2 (Linux does in its startup, once its handler is in).
        var mcr: UInt8 = 0
        var scratch: UInt8 = 0
        var fifosEnabled = false
        /// The transmit-empty interrupt condition. Set whenever THR becomes
        /// empty (after every write) and when IER.THRI goes from 0 to 1;
        /// cleared by writing THR or by reading IIR while IIR reports it.
        var transmitEmptyPending = false
        var receive = ByteRing(capacity: Serial16550.inputCapacity)
        var droppedInput = 0
        /// The level last given to the interrupt line.
        var lineHigh = false

        var divisorLatchSelected: Bool { lcr & LCR.divisorLatchAccess != 0 }
        var loopback: Bool { mcr & MCR.loopback != 0 }

        /// IIR bits 3:0: the highest-priority enabled condition, or "none".
        var pendingInterrupt: UInt8 {
            if ier & IER.receivedData != 0, !receive.isEmpty { return IIR.receivedData }
            if ier & IER.transmitEmpty != 0, transmitEmptyPending { return IIR.transmitEmpty }
            return IIR.nonePending
        }

        var iir: UInt8 { pendingInterrupt | (fifosEnabled ? IIR.fifosEnabled : 0) }

        /// On a PC the UART's interrupt output reaches the bus through a gate
        /// driven by the OUT2 pin. In loopback mode the chip holds its modem
        /// outputs, OUT2 included, inactive, so the gate is closed then too.
        var lineShouldBeHigh: Bool {
            pendingInterrupt != IIR.nonePending && mcr & MCR.out2 != 0 && !loopback
        }

        var msr: UInt8 {
            // Not looped back: report a connected line (carrier, DSR, CTS), so
            // opening the tty does not wait for carrier and CTS flow control
            // never holds output back.
            guard loopback else { return MSR.dcd | MSR.dsr | MSR.cts }
            // Loopback wires each modem output to an input (Linux's
            // autoconfig checks RTS|OUT2 comes back as CTS|DCD).
            var m: UInt8 = 0
            if mcr & MCR.dtr != 0 { m |= MSR.dsr }
            if mcr & MCR.rts != 0 { m |= MSR.cts }
            if mcr & MCR.out1 != 0 { m |= MSR.ri }
            if mcr & MCR.out2 != 0 { m |= MSR.dcd }
            return m
        }
    }

    private let state = Mutex(State())
    private let interrupt: any InterruptLine
    private let output: any ConsoleOutput

    public init(interrupt: any InterruptLine, output: any ConsoleOutput) {
        self.interrupt = interrupt
        self.output = output
    }

    /// Queues host bytes for the guest to read and returns how many were
    /// accepted: bytes beyond `inputCapacity` waiting are refused (and
    /// counted in `droppedInputBytes`), as is everything while the guest has
    /// the UART in loopback mode, where the chip ignores its serial input.
    @discardableResult
    public func receive(_ bytes: [UInt8]) -> Int {
        state.withLock { s in
            var accepted = 0
            if !s.loopback {
                for b in bytes {
                    guard s.receive.push(b) else { break }
                    accepted += 1
                }
            }
            s.droppedInput += bytes.count - accepted
            updateLine(&s)
            return accepted
        }
    }

    /// Host input refused so far (queue full, or the UART in loopback mode).
    public var droppedInputBytes: Int { state.withLock { $0.droppedInput } }

    /// Accesses wider than a byte are not something a driver for this chip
    /// makes; such a read returns the addressed register in the low byte and
    /// zeros above it, and such a write uses the low byte of the value.
    public func read(offset: UInt64, size: Int) -> UInt64 {
        state.withLock { s in
            let value: UInt8
            switch offset {
            case Offset.data where s.divisorLatchSelected: value = s.divisorLow
            case Offset.ier where s.divisorLatchSelected: value = s.divisorHigh
            case Offset.data: value = s.receive.pop() ?? 0
            case Offset.ier: value = s.ier
            case Offset.iirFCR:
                value = s.iir
                // Reading IIR while it names transmit-empty acknowledges that
                // interrupt, as on the chip; Linux's THRE test depends on it.
                if s.pendingInterrupt == IIR.transmitEmpty { s.transmitEmptyPending = false }
            case Offset.lcr: value = s.lcr
            case Offset.mcr: value = s.mcr
            case Offset.lsr: value = LSR.transmitterEmpty | (s.receive.isEmpty ? 0 : LSR.dataReady)
            case Offset.msr: value = s.msr
            case Offset.scratch: value = s.scratch
            default: value = 0xFF  // past the 8 registers: nothing answers
            }
            updateLine(&s)
            return UInt64(value)
        }
    }

    public func write(offset: UInt64, size: Int, value: UInt64) {
        let byte = UInt8(truncatingIfNeeded: value)
        state.withLock { s in
            switch offset {
            case Offset.data where s.divisorLatchSelected: s.divisorLow = byte
            case Offset.ier where s.divisorLatchSelected: s.divisorHigh = byte
            case Offset.data:
                if s.loopback {
                    // Transmitter wired to receiver. If the queue is full the
                    // byte is lost, as an overrun would lose it.
                    _ = s.receive.push(byte)
                } else {
                    withUnsafeBytes(of: byte) { output.write($0) }
                }
                // The byte left at once and THR is empty again: the write
                // cleared the condition and its completion sets it anew.
                s.transmitEmptyPending = true
            case Offset.ier:
                let newIER = byte & IER.implemented
                // The chip signals an empty THR as soon as THRI is enabled;
                // Linux starts interrupt-driven output this way, and rewrites
                // IER after each polled console write to get the interrupt back.
                if newIER & IER.transmitEmpty != 0, s.ier & IER.transmitEmpty == 0 {
                    s.transmitEmptyPending = true
                }
                s.ier = newIER
            case Offset.iirFCR:
                let enable = byte & FCR.enable != 0
                // Switching between FIFO and non-FIFO mode empties the FIFOs.
                if enable != s.fifosEnabled || byte & FCR.clearReceive != 0 { s.receive.removeAll() }
                s.fifosEnabled = enable
                // Clearing the transmit FIFO (bit 2) has nothing to do: it is always empty.
            case Offset.lcr: s.lcr = byte
            case Offset.mcr: s.mcr = byte & MCR.implemented
            case Offset.scratch: s.scratch = byte
            default: break  // LSR and MSR are read-only; past the registers nothing answers
            }
            updateLine(&s)
        }
    }

    /// Drives the interrupt line to match the state, calling the line only on
    /// a change (each call is an ioctl).
    private func updateLine(_ s: inout State) {
        let high = s.lineShouldBeHigh
        guard high != s.lineHigh else { return }
        s.lineHigh = high
        interrupt.setLevel(high)
    }
}

/// A fixed-capacity byte FIFO that allocates only in `init`.
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

/// The UART's registers and receive queue as a plain value, for snapshots.
public struct SerialState: Equatable, Sendable {
    public var divisorLow: UInt8
    public var divisorHigh: UInt8
    public var ier: UInt8
    public var lcr: UInt8
    public var mcr: UInt8
    public var scratch: UInt8
    public var fifosEnabled: Bool
    public var transmitEmptyPending: Bool
    /// Host input the guest has not read yet, oldest first.
    public var receive: [UInt8]
    public var droppedInput: Int

    public init(divisorLow: UInt8, divisorHigh: UInt8, ier: UInt8, lcr: UInt8, mcr: UInt8, scratch: UInt8,
                fifosEnabled: Bool, transmitEmptyPending: Bool, receive: [UInt8], droppedInput: Int) {
        self.divisorLow = divisorLow; self.divisorHigh = divisorHigh; self.ier = ier; self.lcr = lcr; self.mcr = mcr
        self.scratch = scratch; self.fifosEnabled = fifosEnabled; self.transmitEmptyPending = transmitEmptyPending
        self.receive = receive; self.droppedInput = droppedInput
    }
}

extension Serial16550 {
    public func captureState() -> SerialState {
        state.withLock { s in
            var ring = s.receive
            var bytes: [UInt8] = []
            while let b = ring.pop() { bytes.append(b) }
            return SerialState(divisorLow: s.divisorLow, divisorHigh: s.divisorHigh, ier: s.ier, lcr: s.lcr, mcr: s.mcr,
                               scratch: s.scratch, fifosEnabled: s.fifosEnabled, transmitEmptyPending: s.transmitEmptyPending,
                               receive: bytes, droppedInput: s.droppedInput)
        }
    }

    /// Takes over a saved state: registers as the chip can hold them (IER's
    /// four bits, MCR's five), at most `inputCapacity` bytes of input; the
    /// interrupt line is then driven to what that state asks.
    public func restoreState(_ saved: SerialState) throws(VMMError) {
        guard saved.ier & ~IER.implemented == 0, saved.mcr & ~MCR.implemented == 0 else {
            throw .invalidState("UART: saved IER 0x\(String(saved.ier, radix: 16)) or MCR 0x\(String(saved.mcr, radix: 16)) has bits a 16550A does not have")
        }
        guard saved.receive.count <= Self.inputCapacity, saved.droppedInput >= 0 else {
            throw .invalidState("UART: \(saved.receive.count) bytes of saved input, more than the \(Self.inputCapacity) it holds")
        }
        state.withLock { s in
            s.divisorLow = saved.divisorLow
            s.divisorHigh = saved.divisorHigh
            s.ier = saved.ier
            s.lcr = saved.lcr
            s.mcr = saved.mcr
            s.scratch = saved.scratch
            s.fifosEnabled = saved.fifosEnabled
            s.transmitEmptyPending = saved.transmitEmptyPending
            s.receive.removeAll()
            for b in saved.receive { _ = s.receive.push(b) }
            s.droppedInput = saved.droppedInput
            // KVM's line state is not in the irqchip's saved state: drive it from here.
            s.lineHigh = s.lineShouldBeHigh
            interrupt.setLevel(s.lineHigh)
        }
    }
}

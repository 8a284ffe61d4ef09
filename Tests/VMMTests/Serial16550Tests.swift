import Synchronization
import Virtio
import Testing
@testable import VMM

/// Records every level the UART drives its interrupt line to.
final class LineRecorder: InterruptLine {
    let levels = Mutex<[Bool]>([])
    func setLevel(_ high: Bool) { levels.withLock { $0.append(high) } }
    var history: [Bool] { levels.withLock { $0 } }
    var high: Bool { history.last ?? false }
}

@Suite struct Serial16550Tests {
    let line = LineRecorder()
    let sink = BufferSink()
    var uart: Serial16550 { _uart }
    private let _uart: Serial16550

    init() { _uart = Serial16550(interrupt: line, output: sink) }

    func r(_ offset: UInt64) -> UInt8 { UInt8(uart.read(offset: offset, size: 1)) }
    func w(_ offset: UInt64, _ v: UInt8) { uart.write(offset: offset, size: 1, value: UInt64(v)) }

    @Test func transmitterIsAlwaysEmptyAndNoInterruptIsPendingAtReset() {
        #expect(r(5) == 0x60)
        #expect(r(2) == 0x01)
        #expect(line.history.isEmpty)
    }

    @Test func thrBytesReachTheSink() {
        for b in Array("hi\n".utf8) { w(0, b) }
        #expect(sink.text == "hi\n")
    }

    @Test func scratchRegisterRoundTrips() {
        for v: UInt8 in [0x00, 0x55, 0xAA, 0xFF] {
            w(7, v)
            #expect(r(7) == v)
        }
    }

    @Test func divisorLatchIsSeparateFromTHRAndIER() {
        w(1, 0x05)            // IER
        w(3, 0x83)            // DLAB on, 8N1
        w(0, 0x01); w(1, 0x02)
        #expect(r(0) == 0x01 && r(1) == 0x02)
        #expect(sink.bytes.isEmpty)  // a divisor write is not a transmitted byte
        w(3, 0x03)            // DLAB off
        #expect(r(1) == 0x05)
        #expect(r(3) == 0x03)
    }

    @Test func ierKeepsFourBitsAsLinuxProbesExpect() {
        w(1, 0x00); #expect(r(1) == 0x00)
        w(1, 0x0F); #expect(r(1) == 0x0F)
        w(1, 0xFF); #expect(r(1) == 0x0F)  // no UUE bit: not mistaken for an XScale UART
    }

    @Test func fifoEnableShowsInIIRAsA16550A() {
        w(2, 0x01)
        #expect(r(2) & 0xC0 == 0xC0)
        #expect(r(2) >> 5 != 7)  // not a 16750 (64-byte FIFO) either
        w(2, 0x00)
        #expect(r(2) & 0xC0 == 0)
    }

    @Test func enablingTHRIRaisesTheTransmitEmptyInterrupt() {
        w(1, 0x02)
        #expect(r(2) & 0x0F == 0x02)
        #expect(line.history == [true, false])  // raised, then acknowledged by the IIR read
        #expect(r(2) & 0x0F == 0x01)
    }

    @Test func thrWriteReArmsTheInterrupt() {
        w(1, 0x02)
        _ = r(2)            // acknowledge
        w(0, 0x41)
        #expect(line.high)
        #expect(r(2) & 0x0F == 0x02)
        #expect(!line.high)
    }

    @Test func linuxTHREProbeSeesTheInterrupt() {
        // serial8250_do_startup's UART_BUG_THRE test: IER=THRI, read IIR, IER=0, IER=THRI, read IIR.
        w(1, 0x02); _ = r(5); let iir1 = r(2); w(1, 0)
        w(1, 0x02); let iir2 = r(2); w(1, 0)
        #expect(iir1 & 0x01 == 0 && iir2 & 0x01 == 0)
    }

    @Test func receivedDataOutranksTransmitEmpty() {
        w(1, 0x03)
        _ = uart.receive([0x7A])
        #expect(r(2) & 0x0F == 0x04)
        #expect(r(5) & 0x01 == 0x01)
        #expect(r(0) == 0x7A)
        #expect(r(5) & 0x01 == 0)
        #expect(r(2) & 0x0F == 0x02)  // THRE shows once the data is read
    }

    @Test func out2GatesTheLine() {
        w(4, 0x00)        // OUT2 off
        w(1, 0x02)
        #expect(!line.high)
        #expect(r(2) & 0x0F == 0x02)  // still pending in IIR
        w(1, 0); w(4, 0x08); w(1, 0x02)
        #expect(line.high)
    }

    @Test func lineLevelIsSetOnlyOnChanges() {
        w(1, 0x01)
        _ = uart.receive([1, 2, 3])
        _ = uart.receive([4])
        #expect(line.history == [true])
        for _ in 0..<4 { _ = r(0) }
        #expect(line.history == [true, false])
    }

    @Test func loopbackEchoesAndMirrorsModemLines() {
        w(4, 0x10 | 0x0A)  // LOOP | RTS | OUT2: what Linux's autoconfig writes
        #expect(r(6) & 0xF0 == 0x90)  // CTS | DCD
        w(0, 0x42)
        #expect(sink.bytes.isEmpty)
        #expect(r(5) & 0x01 == 1 && r(0) == 0x42)
        w(4, 0x10 | 0x05)  // DTR | OUT1
        #expect(r(6) & 0xF0 == 0x60)  // DSR | RI
        w(4, 0x08)
        #expect(r(6) == 0xB0)
    }

    @Test func hostInputIsBounded() {
        let big = [UInt8](repeating: 0x61, count: Serial16550.inputCapacity + 100)
        #expect(uart.receive(big) == Serial16550.inputCapacity)
        #expect(uart.droppedInputBytes == 100)
        var n = 0
        while r(5) & 1 == 1 { _ = r(0); n += 1 }
        #expect(n == Serial16550.inputCapacity)
    }

    @Test func fcrClearsTheReceiveFIFO() {
        _ = uart.receive([1, 2])
        w(2, 0x03)
        #expect(r(5) & 1 == 0)
    }

    @Test func oddSizesAndOffsetsDoNotCrash() {
        uart.write(offset: 7, size: 4, value: 0x1234_5678)
        #expect(r(7) == 0x78)
        #expect(uart.read(offset: 5, size: 2) == 0x60)
        #expect(uart.read(offset: 9, size: 1) == 0xFF)
        uart.write(offset: 9, size: 8, value: .max)
    }
}

@Suite struct I8042Tests {
    final class Counter: Sendable {
        let n = Mutex(0)
        var value: Int { n.withLock { $0 } }
    }

    @Test func resetCommandReportsOnce() {
        let c = Counter()
        let dev = I8042(onReset: { c.n.withLock { $0 += 1 } })
        dev.write(offset: 4, size: 1, value: 0xFE)
        dev.write(offset: 4, size: 1, value: 0xFE)
        #expect(c.value == 1)
    }

    @Test func otherWritesDoNotReset() {
        let c = Counter()
        let dev = I8042(onReset: { c.n.withLock { $0 += 1 } })
        for v: UInt64 in [0x00, 0xAA, 0xAD, 0xFF] { dev.write(offset: 4, size: 1, value: v) }
        dev.write(offset: 0, size: 1, value: 0xFE)  // the data port is not the command port
        #expect(c.value == 0)
        #expect(dev.read(offset: 4, size: 1) == 0)
    }

    @Test func commandByteRoundTrips() {
        let dev = I8042(onReset: {})
        dev.write(offset: 4, size: 1, value: 0x60)
        dev.write(offset: 0, size: 1, value: 0x45)
        dev.write(offset: 4, size: 1, value: 0x20)
        #expect(dev.read(offset: 4, size: 1) & 1 == 1)
        #expect(dev.read(offset: 0, size: 1) == 0x45)
        #expect(dev.read(offset: 4, size: 1) == 0)
    }
}

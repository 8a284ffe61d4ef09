import Synchronization
import Testing
@testable import VMM

/// Counts reset reports; the handler may also run a probe on the device.
private final class ResetCounter: Sendable {
    private let count = Mutex(0)
    func increment() { count.withLock { $0 += 1 } }
    var value: Int { count.withLock { $0 } }
}

private let dataPort: UInt64 = 0      // 0x60
private let commandPort: UInt64 = 4   // 0x64: status on read, command on write

@Suite struct I8042Tests {
    @Test func resetCommandReportsOnceHoweverOftenItIsWritten() {
        let resets = ResetCounter()
        let dev = I8042(onReset: { resets.increment() })
        dev.write(offset: commandPort, size: 1, value: 0xFE)
        #expect(resets.value == 1)
        // Linux's reboot=k path writes 0xFE up to ten times while the machine stops.
        for _ in 0..<9 { dev.write(offset: commandPort, size: 1, value: 0xFE) }
        #expect(resets.value == 1)
    }

    @Test func otherWritesDoNotReset() {
        let resets = ResetCounter()
        let dev = I8042(onReset: { resets.increment() })
        // Every command that leaves output line 0 (reset) alone: bit 0 set, or below 0xF0.
        for v in UInt8.min...UInt8.max where v < 0xF0 || v & 1 == 1 {
            dev.write(offset: commandPort, size: 1, value: UInt64(v))
        }
        for offset: UInt64 in [dataPort, 1, 2, 3] {
            dev.write(offset: offset, size: 1, value: 0xFE)  // only the command port takes commands
        }
        #expect(resets.value == 0)
    }

    @Test func everyPulseOfTheResetLineResets() {
        // 0xF0-0xFF pulse the output lines whose bits are clear; line 0 is CPU reset.
        for v: UInt64 in [0xF0, 0xF2, 0xFA, 0xFC, 0xFE] {
            let resets = ResetCounter()
            let dev = I8042(onReset: { resets.increment() })
            dev.write(offset: commandPort, size: 1, value: v)
            #expect(resets.value == 1, "command 0x\(String(v, radix: 16))")
        }
    }

    @Test func statusNeverMakesTheGuestWait() {
        let dev = I8042(onReset: {})
        #expect(dev.read(offset: commandPort, size: 1) == 0)
        for v: UInt64 in [0xAA, 0xAD, 0xA7, 0xD4, 0x60, 0x45] {
            dev.write(offset: commandPort, size: 1, value: v)
            // Bit 1 (input buffer full) is what the reboot path polls before each 0xFE.
            #expect(dev.read(offset: commandPort, size: 1) & 0x02 == 0)
        }
        #expect(dev.read(offset: dataPort, size: 1) == 0)
    }

    @Test func commandByteRoundTrips() {
        let dev = I8042(onReset: {})
        dev.write(offset: commandPort, size: 1, value: 0x60)
        dev.write(offset: dataPort, size: 1, value: 0x45)
        #expect(dev.read(offset: commandPort, size: 1) == 0)  // nothing to read yet
        dev.write(offset: commandPort, size: 1, value: 0x20)
        #expect(dev.read(offset: commandPort, size: 1) == 0x01)  // output buffer full
        #expect(dev.read(offset: dataPort, size: 1) == 0x45)
        #expect(dev.read(offset: commandPort, size: 1) == 0)
        #expect(dev.read(offset: dataPort, size: 1) == 0)
    }

    @Test func dataWritesWithoutAPendingCommandAreIgnored() {
        let dev = I8042(onReset: {})
        dev.write(offset: dataPort, size: 1, value: 0x99)
        dev.write(offset: commandPort, size: 1, value: 0x60)
        dev.write(offset: commandPort, size: 1, value: 0xAD)  // a new command abandons the 0x60
        dev.write(offset: dataPort, size: 1, value: 0x77)
        dev.write(offset: commandPort, size: 1, value: 0x20)
        #expect(dev.read(offset: dataPort, size: 1) == 0)
    }

    @Test func portsBetweenDataAndCommandAreNotTheControllers() {
        let dev = I8042(onReset: {})
        for offset: UInt64 in [1, 2, 3] {
            #expect(dev.read(offset: offset, size: 1) == 0xFF)
        }
    }

    @Test func wideAndStrayAccessesAreHarmless() {
        let resets = ResetCounter()
        let dev = I8042(onReset: { resets.increment() })
        #expect(dev.read(offset: commandPort, size: 4) == 0)
        _ = dev.read(offset: 100, size: 8)
        dev.write(offset: 100, size: 8, value: .max)
        dev.write(offset: commandPort, size: 2, value: 0x12FE)  // the low byte is the command
        #expect(resets.value == 1)
    }

    @Test func resetHandlerRunsWithoutTheDeviceLocked() {
        let resets = ResetCounter()
        let box = Mutex<I8042?>(nil)
        let dev = I8042(onReset: {
            // Would deadlock if the device held its lock while calling out.
            _ = box.withLock { $0 }?.read(offset: commandPort, size: 1)
            resets.increment()
        })
        box.withLock { $0 = dev }
        dev.write(offset: commandPort, size: 1, value: 0xFE)
        #expect(resets.value == 1)
    }
}

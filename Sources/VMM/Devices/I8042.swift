import Synchronization

/// The smallest i8042 keyboard controller Linux needs: a status register that
/// never makes it wait, and the "pulse reset line" command (0xFE on the command
/// port), which `reboot=k` uses and which ends the machine with a reset event.
///
/// Registered as one device over ports 0x60-0x64: offset 0 is the data port,
/// offset 4 the status (read) and command (write) port.
public final class I8042: BusDevice {
    static let dataOffset: UInt64 = 0
    static let commandOffset: UInt64 = 4
    static let resetCommand: UInt8 = 0xFE
    static let readCommandByte: UInt8 = 0x20
    static let writeCommandByte: UInt8 = 0x60

    private struct State {
        var commandByte: UInt8 = 0
        /// The command whose data byte the next data-port write carries.
        var pendingCommand: UInt8?
        /// What the next data-port read returns (the command byte after 0x20).
        var output: UInt8?
        var resetRequested = false
    }

    private let state = Mutex(State())
    private let onReset: @Sendable () -> Void

    public init(onReset: @escaping @Sendable () -> Void) {
        self.onReset = onReset
    }

    public func read(offset: UInt64, size: Int) -> UInt64 {
        state.withLock { s in
            switch offset {
            case Self.dataOffset:
                let v = s.output ?? 0
                s.output = nil
                return UInt64(v)
            case Self.commandOffset:
                // Bit 0: output buffer full; input buffer (bit 1) is always empty.
                return s.output == nil ? 0 : 1
            default:
                return 0
            }
        }
    }

    public func write(offset: UInt64, size: Int, value: UInt64) {
        let byte = UInt8(truncatingIfNeeded: value)
        let reset: Bool = state.withLock { s in
            switch offset {
            case Self.commandOffset:
                switch byte {
                case Self.resetCommand:
                    // Report once: the guest may write it several times while it is being stopped.
                    let first = !s.resetRequested
                    s.resetRequested = true
                    return first
                case Self.readCommandByte:
                    s.output = s.commandByte
                case Self.writeCommandByte:
                    s.pendingCommand = byte
                default:
                    break
                }
            case Self.dataOffset:
                if s.pendingCommand == Self.writeCommandByte { s.commandByte = byte }
                s.pendingCommand = nil
            default:
                break
            }
            return false
        }
        // Outside the lock: the handler stops the machine, which must not wait on this device.
        if reset { onReset() }
    }
}

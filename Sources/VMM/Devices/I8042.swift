import Synchronization

/// The smallest i8042 keyboard controller a Linux guest needs: a status
/// register that never makes it wait, and the reset line, which `reboot=k`
/// pulses (command 0xFE on port 0x64) and which ends the machine with a reset
/// event. Linux's reboot path polls the status register until the input
/// buffer is empty before each 0xFE write, so that bit must read 0; all-ones
/// (what the bus returns with no device there) would make it wait out a
/// timeout of thousands of port reads before every write.
///
/// Registered as one device over ports 0x60-0x64: offset 0 is the data port,
/// offset 4 the status (read) and command (write) port. Offsets 1-3 are not
/// the controller's (0x61 is system control port B, which KVM's in-kernel PIT
/// serves itself), so they read as all-ones, as if nothing were there.
///
/// Of the controller's commands only the command-byte pair is kept (0x20
/// reads it through the data port, 0x60 writes it), so a driver that checks
/// the controller reads back what it wrote; the rest are ignored.
public final class I8042: BusDevice {
    enum Offset {
        static let data: UInt64 = 0
        static let statusCommand: UInt64 = 4
    }

    enum Command {
        static let readCommandByte: UInt8 = 0x20
        static let writeCommandByte: UInt8 = 0x60
    }

    enum Status {
        /// A byte waits in the output buffer for the data port to read it.
        static let outputBufferFull: UInt8 = 0x01
    }

    /// Commands 0xF0-0xFF pulse output-port lines 0-3 low, one line per clear
    /// bit in the command's low nibble. Line 0 is the CPU reset: 0xFE is the
    /// usual command, and every even command in the range pulses it as well.
    static func pulsesResetLine(_ command: UInt8) -> Bool {
        command & 0xF0 == 0xF0 && command & 0x01 == 0
    }

    private struct State {
        var commandByte: UInt8 = 0
        /// The next data-port write is the parameter of this command.
        var awaitingParameterFor: UInt8?
        /// What the next data-port read returns, if anything.
        var output: UInt8?
        var resetReported = false
    }

    private let state = Mutex(State())
    private let onReset: @Sendable () -> Void

    /// `onReset` runs on the vCPU thread that pulsed the reset line, without
    /// this device's lock held, and only the first time the line is pulsed.
    public init(onReset: @escaping @Sendable () -> Void) {
        self.onReset = onReset
    }

    public func read(offset: UInt64, size: Int) -> UInt64 {
        state.withLock { s in
            switch offset {
            case Offset.data:
                defer { s.output = nil }
                return UInt64(s.output ?? 0)
            case Offset.statusCommand:
                // The input buffer (bit 1) is never full: commands take no time.
                return UInt64(s.output == nil ? 0 : Status.outputBufferFull)
            default:
                return 0xFF
            }
        }
    }

    public func write(offset: UInt64, size: Int, value: UInt64) {
        let byte = UInt8(truncatingIfNeeded: value)
        let reset: Bool = state.withLock { s in
            switch offset {
            case Offset.statusCommand:
                // A new command abandons one still waiting for its parameter.
                s.awaitingParameterFor = nil
                if Self.pulsesResetLine(byte) {
                    // Report once: the guest repeats the pulse while the machine stops.
                    defer { s.resetReported = true }
                    return !s.resetReported
                }
                switch byte {
                case Command.readCommandByte: s.output = s.commandByte
                case Command.writeCommandByte: s.awaitingParameterFor = byte
                default: break
                }
            case Offset.data:
                if s.awaitingParameterFor == Command.writeCommandByte { s.commandByte = byte }
                s.awaitingParameterFor = nil
            default:
                break
            }
            return false
        }
        // Outside the lock: the handler reaches into the machine (it stops
        // every vCPU), so it must be free to do anything, this device included.
        if reset { onReset() }
    }
}

/// The i8042's few bits as a plain value, for snapshots.
public struct I8042State: Equatable, Sendable {
    public var commandByte: UInt8
    public var awaitingParameterFor: UInt8?
    public var output: UInt8?
    public var resetReported: Bool
    public init(commandByte: UInt8, awaitingParameterFor: UInt8?, output: UInt8?, resetReported: Bool) {
        self.commandByte = commandByte; self.awaitingParameterFor = awaitingParameterFor
        self.output = output; self.resetReported = resetReported
    }
}

extension I8042 {
    public func captureState() -> I8042State {
        state.withLock { I8042State(commandByte: $0.commandByte, awaitingParameterFor: $0.awaitingParameterFor,
                                    output: $0.output, resetReported: $0.resetReported) }
    }

    /// Takes over a saved state; the only parameter-taking command it models is 0x60.
    public func restoreState(_ saved: I8042State) throws(VMMError) {
        if let c = saved.awaitingParameterFor, c != Command.writeCommandByte {
            throw .invalidState("i8042: saved as waiting for the parameter of command 0x\(String(c, radix: 16)), which takes none")
        }
        state.withLock { s in
            s.commandByte = saved.commandByte
            s.awaitingParameterFor = saved.awaitingParameterFor
            s.output = saved.output
            s.resetReported = saved.resetReported
        }
    }
}

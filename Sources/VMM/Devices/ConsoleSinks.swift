import AirlockOS
import VirtioDevices

/// Serial output straight to a host descriptor (the CLI's stdout), written in
/// full: a terminal or a pipe the user reads. Captures for tests and for
/// `airlock run` use `BoundedCapture`, which never blocks.
public final class FileDescriptorSink: ConsoleOutput {
    let fd: Int32
    public init(fd: Int32) { self.fd = fd }
    public func write(_ bytes: UnsafeRawBufferPointer) {
        // A closed stdout must not stop the guest; the bytes are dropped.
        try? AirlockOS.writeAll(fd: fd, bytes)
    }
}

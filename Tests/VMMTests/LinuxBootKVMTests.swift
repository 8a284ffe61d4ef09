import AirlockTestSupport
import Foundation
import GuestMemory
import Testing
import VirtioDevices
@testable import VMM

/// Boots the installed guest kernel (make images) with the default root
/// filesystem on virtio-blk (/dev/vda) to its first user-space output. The
/// slowest test in the suite (tens of seconds on a PVM host, where guest kernel
/// code is emulated), so there is one; it covers the kernel, the UART's
/// transmit interrupts, the virtio-mmio transport and the block device.
@Suite(.enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct LinuxBootKVMTests {
    static var imagesDirectory: String { VMTests.imagesDirectory }

    /// No boot: the initrd is copied from its file into guest RAM where the zero
    /// page says, byte for byte; a missing one is an error that names it.
    @Test func anInitrdLandsWhereTheZeroPageSays() throws {
        let kernel = Self.imagesDirectory + "/vmlinux"
        try #require(FileManager.default.fileExists(atPath: kernel), "no guest kernel at \(kernel): run 'make images' first")
        let path = NSTemporaryDirectory() + "airlock-initrd-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let content = (0..<300_001).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        try Data(content).write(to: URL(fileURLWithPath: path))
        defer { unlink(path) }

        var config = MachineConfig()
        config.memoryBytes = 128 << 20
        config.console = BoundedCapture(limit: 1 << 20)
        let machine = try Machine(config)
        try machine.loadLinux(kernelPath: kernel, initrdPath: path, extraCommandLine: "")
        let address = try machine.memory.read(UInt32.self, at: GuestAddress(Layout.zeroPageAddress.raw + 0x218))  // ramdisk_image
        let size = try machine.memory.read(UInt32.self, at: GuestAddress(Layout.zeroPageAddress.raw + 0x21C))     // ramdisk_size
        #expect(size == UInt32(content.count))
        #expect(try machine.memory.readBytes(at: GuestAddress(UInt64(address)), count: content.count) == content)

        let other = try Machine(config)
        #expect { try other.loadLinux(kernelPath: kernel, initrdPath: "/nonexistent/initrd", extraCommandLine: "") } throws: {
            "\($0)".contains("/nonexistent/initrd") && "\($0)".contains("does not exist")
        }
    }

    @Test(.timeLimit(.minutes(5)))
    func kernelBootsToUserSpaceAndRebootsCleanly() async throws {
        // Blocking work (processes, a VM) on a thread of its own: the cooperative pool has a
        // thread per core, and a test that holds one for a boot stalls every async test.
        let test = self
        try await offThread { try test.kernelBootsToUserSpaceAndRebootsCleanlyBlocking() }
    }

    func kernelBootsToUserSpaceAndRebootsCleanlyBlocking() throws {
        let kernel = Self.imagesDirectory + "/vmlinux"
        let rootfs = Self.imagesDirectory + "/rootfs.ext4"
        try #require(FileManager.default.fileExists(atPath: kernel), "no guest kernel at \(kernel): run 'make images' first")
        try #require(FileManager.default.fileExists(atPath: rootfs), "no root filesystem at \(rootfs): run 'make images' first")
        let before = try Data(contentsOf: URL(fileURLWithPath: rootfs))

        let console = BoundedCapture(limit: 4 << 20)
        var config = MachineConfig()
        config.memoryBytes = 128 << 20
        config.console = console
        let machine = try Machine(config)
        let disk = try machine.addBlockDevice(path: rootfs, readOnly: true)
        try machine.loadLinux(kernelPath: kernel, initrdPath: nil, extraCommandLine: "root=/dev/vda ro rootfstype=ext4")
        let start = ContinuousClock.now
        let exit = try machine.run(timeout: 240)
        let elapsed = ContinuousClock.now - start
        print("guest kernel boot to reset: \(elapsed)")

        let text = console.text
        // Kernel printk proves the UART works; the marker, written by /init to
        // /dev/console, proves user-space output (which needs THRE interrupts).
        #expect(text.contains("Linux version"))
        #expect(text.contains("AIRLOCK-READY"), "console did not show the ready marker:\n\(text.suffix(3000))")
        #expect(text.contains("[vda]") && text.contains("Mounted root (ext4 filesystem) readonly"))
        #expect(disk.statistics.requests > 0)
        // Read-only means the backing file is untouched, byte for byte.
        #expect(try Data(contentsOf: URL(fileURLWithPath: rootfs)) == before)
        #expect(exit.event?.cause == .i8042Reset, "ended with \(String(describing: exit.event)), timed out: \(exit.timedOut)\n\(text.suffix(3000))")
    }

    /// Data the guest writes to a read-write disk and flushes (dd conv=fsync:
    /// the driver's FLUSH becomes fsync) is in the backing file, byte for byte,
    /// once the VM has ended; and what it writes to a virtio-console port
    /// reaches that port's host output. One boot serves both checks.
    @Test(.timeLimit(.minutes(5)))
    func flushedWritesAreDurableAndConsolePortsCarryOutput() async throws {
        // Blocking work (processes, a VM) on a thread of its own: the cooperative pool has a
        // thread per core, and a test that holds one for a boot stalls every async test.
        let test = self
        try await offThread { try test.flushedWritesAreDurableAndConsolePortsCarryOutputBlocking() }
    }

    func flushedWritesAreDurableAndConsolePortsCarryOutputBlocking() throws {
        let kernel = Self.imagesDirectory + "/vmlinux"
        try #require(FileManager.default.fileExists(atPath: kernel), "no guest kernel at \(kernel): run 'make images' first")
        let image = try VMTests.rootfs(withInit: """
            #!/bin/sh
            dd if=/bin/busybox of=/dev/vdb bs=64k count=4 conv=fsync 2>/dev/console
            echo "AIRLOCK-WROTE" > /dev/console
            echo "out through virtio-console" > /dev/vport2p1
            reboot -f
            """)
        defer { try? FileManager.default.removeItem(at: image.directory) }
        let scratch = image.directory.appendingPathComponent("scratch.img")
        try Data(count: 4 << 20).write(to: scratch)

        let console = BoundedCapture(limit: 4 << 20)
        var config = MachineConfig()
        config.memoryBytes = 128 << 20
        config.console = console
        let machine = try Machine(config)
        try machine.addBlockDevice(path: image.path, readOnly: true)
        try machine.addBlockDevice(path: scratch.path, readOnly: false)
        let portOutput = BoundedCapture(limit: 4096)
        try machine.addConsoleDevice(ports: [.init(name: "airlock.control", output: nil),
                                             .init(name: "airlock.stdout", output: portOutput)])
        try machine.loadLinux(kernelPath: kernel, initrdPath: nil, extraCommandLine: "root=/dev/vda ro rootfstype=ext4")
        let exit = try machine.run(timeout: 240)
        #expect(exit.event?.cause == .i8042Reset, "\(console.text.suffix(2000))")
        #expect(console.text.contains("AIRLOCK-WROTE"))
        #expect(String(decoding: portOutput.bytes, as: UTF8.self) == "out through virtio-console\n", "\(console.text.suffix(2000))")

        let written = try Data(contentsOf: scratch)
        let expected = try Data(contentsOf: URL(fileURLWithPath: "/bin/busybox")).prefix(256 << 10)
        #expect(written.prefix(expected.count) == expected, "the disk does not hold what the guest wrote")
        #expect(written.dropFirst(expected.count).allSatisfy { $0 == 0 })
    }
}

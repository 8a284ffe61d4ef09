import GuestMemory
import Testing
@testable import Virtio
@testable import VirtioDevices

/// A guest that lies in its rings. Each case: the device survives, touches
/// nothing outside guest memory, and serves a valid request afterwards.
@Suite struct HostileGuestTests {
    let disk: TempDisk
    let device: BlockDevice
    let driver: MockDriver

    init() throws {
        disk = try TempDisk(sectors: 64)
        device = try BlockDevice(path: disk.path, readOnly: false)
        // Two RAM regions with a hole between 16 MiB and 32 MiB.
        let memory = try GuestMemory(layout: [(GuestAddress(0), 16 << 20), (GuestAddress(32 << 20), 1 << 20)])
        driver = try MockDriver(device: device, memory: memory)
        driver.start()
    }

    /// After the attack: a valid read on a fresh descriptor range still works (after a reset if the rings broke).
    func stillServes() throws {
        if driver.status & VirtioStatus.deviceNeedsReset != 0 {
            driver.start()
            driver.availIndex = 0
            driver.usedSeen = 0
        }
        _ = try driver.takeUsed()
        let head = try driver.blockRequest(type: 0, sector: 2, dataLength: 512, first: 8)
        try driver.submit(head)
        #expect(try driver.requestStatus() == 0)
        #expect(try driver.takeUsed().last?.id == 8)
    }

    @Test func descriptorLoop() throws {
        try driver.descriptor(0, addr: MockDriver.header.raw, len: 16, flags: 1, next: 1)
        try driver.descriptor(1, addr: MockDriver.data.raw, len: 512, flags: 1 | 2, next: 0)
        try driver.submit(0)
        #expect(driver.transport.queueErrors == 1)
        #expect(try driver.takeUsed().map(\.len) == [0])
        try stillServes()
    }

    @Test func nextOutOfRange() throws {
        try driver.descriptor(0, addr: MockDriver.header.raw, len: 16, flags: 1, next: 200)
        try driver.submit(0)
        #expect(driver.transport.queueErrors == 1)
        try stillServes()
    }

    @Test func headOutOfRange() throws {
        try driver.submit(99)
        #expect(driver.transport.queueErrors == 1)
        #expect(try driver.takeUsed().isEmpty)  // cannot be returned: the id is not a descriptor
        try stillServes()
    }

    @Test func buffersOutsideMemoryAcrossTheHoleAndOverflowing() throws {
        let cases: [(UInt64, UInt32)] = [
            ((33 << 20) - 8, 512),       // past the end of RAM
            ((16 << 20) - 256, 512),     // across the hole
            (20 << 20, 16),              // inside the hole
            (UInt64.max - 100, 512),     // addr + len overflows
            (0, UInt32.max),             // 4 GiB
        ]
        for (addr, len) in cases {
            _ = try driver.blockRequest(type: 0, sector: 0, dataLength: 512)
            try driver.descriptor(1, addr: addr, len: len, flags: 1 | 2, next: 2)
            try driver.submit(0)
        }
        #expect(driver.transport.queueErrors == cases.count)
        try stillServes()
    }

    @Test func zeroLengthBuffers() throws {
        _ = try driver.blockRequest(type: 0, sector: 0, dataLength: 512)
        try driver.descriptor(1, addr: MockDriver.data.raw, len: 0, flags: 1 | 2, next: 2)
        try driver.submit(0)
        #expect(try driver.requestStatus() == 0)  // nothing to read is not an error
        try driver.descriptor(0, addr: MockDriver.header.raw, len: 0, flags: 1, next: 1)
        try driver.submit(0)
        #expect(try driver.requestStatus() == 1)  // a header of 0 bytes is
        try stillServes()
    }

    @Test func readableAfterWritable() throws {
        _ = try driver.blockRequest(type: 1, sector: 0, dataLength: 512)
        try driver.descriptor(0, addr: MockDriver.statusByte.raw, len: 1, flags: 1 | 2, next: 1)
        try driver.descriptor(1, addr: MockDriver.header.raw, len: 16, flags: 1, next: 2)
        try driver.submit(0)
        #expect(driver.transport.queueErrors == 1)
        try stillServes()
    }

    @Test func duplicateHeads() throws {
        _ = try driver.blockRequest(type: 0, sector: 1, dataLength: 512)
        try driver.submit(0, notify: false)
        try driver.submit(0, notify: false)
        try driver.submit(0)
        #expect(try driver.takeUsed().count == 3)
        try stillServes()
    }

    @Test func availableIndexJumpsPastTheQueue() throws {
        try driver.memory.write(UInt16(1000), at: GuestAddress(MockDriver.avail.raw + 2))
        driver.w(0x50, 0)
        #expect(driver.status & VirtioStatus.deviceNeedsReset != 0)
        // Further notifications are ignored until the driver resets.
        driver.w(0x50, 0)
        try stillServes()
    }

    @Test func indirectDescriptorsWithoutNegotiation() throws {
        try driver.descriptor(0, addr: 0x50000, len: 48, flags: 4)
        try driver.submit(0)
        #expect(driver.transport.queueErrors == 1)
        try stillServes()
    }

    @Test func notifyingQueuesThatDoNotExist() throws {
        for q: UInt64 in [1, 2, 0xFFFF, 0xFFFF_FFFF] { driver.w(0x50, q) }
        try stillServes()
    }
}

import GuestMemory
import Testing
@testable import Virtio
@testable import VirtioDevices

@Suite struct BlockDeviceTests {
    let disk: TempDisk
    let device: BlockDevice
    let driver: MockDriver

    init() throws {
        disk = try TempDisk(sectors: 64)
        device = try BlockDevice(path: disk.path, readOnly: false)
        driver = try MockDriver(device: device)
        driver.start()
    }

    @Test func readsSectors() throws {
        let head = try driver.blockRequest(type: 0, sector: 3, dataLength: 1024)
        try driver.submit(head)
        #expect(try driver.requestStatus() == 0)
        let used = try driver.takeUsed()
        #expect(used.count == 1 && used[0].id == 0 && used[0].len == 1025)
        let data = try driver.memory.readBytes(at: MockDriver.data, count: 1024)
        #expect(data[0] == 3 && data[511] == 3 && data[512] == 4)
    }

    @Test func writesReachTheFileAndFlushSucceeds() throws {
        try driver.memory.write([UInt8](repeating: 0xA5, count: 512), at: MockDriver.data)
        try driver.submit(try driver.blockRequest(type: 1, sector: 10, dataLength: 512))
        #expect(try driver.requestStatus() == 0)
        try driver.submit(try driver.blockRequest(type: 4, sector: 0, dataLength: 0))
        #expect(try driver.requestStatus() == 0)
        let file = disk.contents
        #expect(Array(file[5120..<5632]) == [UInt8](repeating: 0xA5, count: 512))
        #expect(file[5119] == 9 && file[5632] == 11)
    }

    @Test func getIDReturnsTheSerial() throws {
        try driver.submit(try driver.blockRequest(type: 8, sector: 0, dataLength: 20))
        #expect(try driver.requestStatus() == 0)
        #expect(try driver.memory.readBytes(at: MockDriver.data, count: 8) == Array("airlock\0".utf8))
    }

    @Test func unknownRequestTypesAreUnsupported() throws {
        try driver.submit(try driver.blockRequest(type: 99, sector: 0, dataLength: 0))
        #expect(try driver.requestStatus() == 2)
    }

    @Test func outOfRangeRequestsFailAndTouchNothing() throws {
        let before = disk.contents
        try driver.memory.write([UInt8](repeating: 0x77, count: 1024), at: MockDriver.data)
        for (sector, length): (UInt64, UInt32) in [(64, 512), (63, 1024), (UInt64.max / 512, 512), (UInt64.max, 512), (0, 100)] {
            try driver.submit(try driver.blockRequest(type: 1, sector: sector, dataLength: length))
            #expect(try driver.requestStatus() == 1, "sector \(sector) length \(length)")
            try driver.submit(try driver.blockRequest(type: 0, sector: sector, dataLength: length))
            #expect(try driver.requestStatus() == 1)
        }
        #expect(disk.contents == before)
        #expect(try driver.memory.readBytes(at: MockDriver.data, count: 4) == [0x77, 0x77, 0x77, 0x77])
        // And the last sector itself is fine.
        try driver.submit(try driver.blockRequest(type: 0, sector: 63, dataLength: 512))
        #expect(try driver.requestStatus() == 0)
    }

    @Test func readOnlyDisksNeverChange() throws {
        let ro = try BlockDevice(path: disk.path, readOnly: true)
        let d = try MockDriver(device: ro)
        #expect(d.deviceFeatures & (1 << 5) != 0)
        d.start()
        let before = disk.contents
        try d.memory.write([UInt8](repeating: 0xEE, count: 512), at: MockDriver.data)
        try d.submit(try d.blockRequest(type: 1, sector: 0, dataLength: 512))
        #expect(try d.requestStatus() == 1)
        try d.submit(try d.blockRequest(type: 4, sector: 0, dataLength: 0))
        #expect(try d.requestStatus() == 0)
        #expect(disk.contents == before)
    }

    @Test func wrongDirectionDataIsRejected() throws {
        // A read whose data buffer is device-readable: the device must not write into it.
        _ = try driver.blockRequest(type: 0, sector: 0, dataLength: 512)
        try driver.descriptor(1, addr: MockDriver.data.raw, len: 512, flags: 1, next: 2)
        try driver.submit(0)
        #expect(try driver.requestStatus() == 1)
    }

    @Test func missingDiskIsAClearError() {
        #expect { try BlockDevice(path: "/nonexistent/disk.img", readOnly: true) } throws: {
            "\($0)".contains("/nonexistent/disk.img") && "\($0)".contains("does not exist")
        }
    }
}

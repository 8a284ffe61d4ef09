import GuestMemory
import Testing
@testable import Virtio
@testable import VirtioDevices

@Suite struct TransportTests {
    let disk: TempDisk
    let device: BlockDevice
    let driver: MockDriver

    init() throws {
        disk = try TempDisk(sectors: 64)
        device = try BlockDevice(path: disk.path, readOnly: false)
        driver = try MockDriver(device: device)
    }

    @Test func identifiesAsVersion2Block() {
        #expect(driver.r(0x00) == 0x7472_6976)
        #expect(driver.r(0x04) == 2)
        #expect(driver.r(0x08) == 2)
        #expect(driver.r(0x0C) == MMIOTransport.vendorID)
    }

    @Test func featuresAreReadInHalves() {
        let f = driver.deviceFeatures
        #expect(f & VirtioFeature.version1 != 0)
        #expect(f & (1 << 9) != 0)  // FLUSH
        #expect(f & (1 << 5) == 0)  // not read-only
    }

    @Test func featuresOKNeedsVersion1() {
        driver.negotiate(0)
        #expect(driver.status & VirtioStatus.featuresOK == 0)
        driver.negotiate(VirtioFeature.version1)
        #expect(driver.status & VirtioStatus.featuresOK != 0)
    }

    @Test func featuresOKRefusesFeaturesNotOffered() {
        driver.negotiate(VirtioFeature.version1 | (1 << 5) | (1 << 40))
        #expect(driver.status & VirtioStatus.featuresOK == 0)
    }

    @Test func featuresAreFixedAfterFeaturesOK() {
        driver.negotiate(VirtioFeature.version1)
        driver.w(0x24, 0); driver.w(0x20, 0xFFFF_FFFF)
        driver.setUpQueue()
        driver.w(0x70, 1 | 2 | 8 | 4)
        #expect(driver.status == 1 | 2 | 8 | 4)
    }

    @Test func driverOKNeedsFeaturesOK() {
        driver.w(0x70, 1); driver.w(0x70, 3); driver.w(0x70, 3 | 4)
        #expect(driver.status & VirtioStatus.driverOK == 0)
    }

    @Test func queuesAreConfiguredOnlyBetweenFeaturesOKAndDriverOK() {
        driver.w(0x70, 1); driver.w(0x70, 3)
        driver.setUpQueue()                        // before FEATURES_OK: ignored
        #expect(driver.r(0x44) == 0)
        driver.negotiate()
        driver.setUpQueue()
        #expect(driver.r(0x44) == 1)
        driver.w(0x70, 1 | 2 | 8 | 4)
        driver.w(0x44, 0)                          // after DRIVER_OK: ignored
        #expect(driver.r(0x44) == 1)
    }

    @Test func invalidQueuesAreNotMadeReady() {
        for (size, desc): (UInt16, GuestAddress) in [(3, MockDriver.desc), (0, MockDriver.desc), (512, MockDriver.desc),
                                                     (16, GuestAddress(0x10008)), (16, GuestAddress(0xFFF_FF00)), (16, GuestAddress(UInt64.max - 15))] {
            driver.negotiate()
            driver.setUpQueue(size: size, desc: desc)
            #expect(driver.r(0x44) == 0, "size \(size) desc \(desc)")
            #expect(driver.status & VirtioStatus.deviceNeedsReset != 0)
        }
    }

    @Test func queueMaxIsReportedAndUnknownQueuesReadZero() {
        driver.w(0x30, 0)
        #expect(driver.r(0x34) == UInt64(BlockDevice.queueSize))
        driver.w(0x30, 7)
        #expect(driver.r(0x34) == 0)
    }

    @Test func resetForgetsEverything() throws {
        driver.start()
        driver.w(0x70, 0)
        #expect(driver.status == 0)
        driver.w(0x30, 0)
        #expect(driver.r(0x44) == 0)
        #expect(driver.r(0x60) == 0)
    }

    @Test func nonWordAccessesToRegistersAreIgnoredInEveryState() {
        for state: UInt64 in [0, 1, 3, 11, 15] {
            driver.w(0x70, 0)
            if state != 0 { driver.negotiate(); driver.w(0x70, state) }
            let before = driver.status
            for offset in stride(from: UInt64(0), to: 0x100, by: 4) {
                for width in [1, 2, 8] {
                    #expect(driver.r(offset, size: width) == 0 || offset >= 0x100)
                    driver.w(offset, 0xFFFF_FFFF_FFFF_FFFF, size: width)
                }
            }
            #expect(driver.status == before)
        }
    }

    @Test func everyRegisterWrittenAtEveryWidthInEveryStateLeavesTheVMMUp() throws {
        for state: UInt64 in [0, 1, 3, 11, 15, 0x4F] {
            for width in [1, 2, 4, 8] {
                driver.w(0x70, 0)
                driver.negotiate()
                driver.w(0x70, state)
                for offset in stride(from: UInt64(0), to: 0x120, by: 1) where offset != 0x70 {
                    driver.w(offset, 0xDEAD_BEEF_0BAD_F00D, size: width)
                    _ = driver.r(offset, size: width)
                }
            }
        }
        // Still usable after a reset.
        driver.start()
        _ = try driver.blockRequest(type: 0, sector: 1, dataLength: 512)
        try driver.submit(0)
        #expect(try driver.requestStatus() == 0)
    }

    @Test func configSpaceShowsCapacityAndLimits() {
        #expect(driver.r(0x100, size: 8) == 64)                         // capacity in sectors
        #expect(driver.r(0x100, size: 4) == 64)
        #expect(driver.r(0x108) == UInt64(BlockDevice.maxSegmentSize))  // size_max
        #expect(driver.r(0x10C) == UInt64(BlockDevice.maxSegments))     // seg_max
        #expect(driver.r(0x114) == 512)                                 // blk_size
        #expect(driver.r(0x1F0) == 0)
    }

    @Test func usedBuffersRaiseTheInterruptUntilAcknowledged() throws {
        driver.start()
        _ = try driver.blockRequest(type: 0, sector: 0, dataLength: 512)
        try driver.submit(0)
        #expect(driver.r(0x60) == 1)
        #expect(driver.line.high)
        driver.ack()
        #expect(driver.r(0x60) == 0)
        #expect(!driver.line.high)
    }
}

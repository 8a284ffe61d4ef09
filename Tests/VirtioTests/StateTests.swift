import Foundation
import GuestMemory
import Testing
@testable import Virtio
@testable import VirtioDevices

/// Saving a transport with its queues and device, and restoring it into a
/// fresh one: the driver goes on as if nothing happened; a saved state that
/// breaks the driver-side rules is refused whole.
struct TransportStateTests {
    /// A block device brought up by the mock driver with one read served, then saved.
    static func savedBlockDevice() throws -> (driver: MockDriver, disk: TempDisk, saved: TransportState, device: BlockDeviceState) {
        let disk = try TempDisk(sectors: 16)
        let driver = try MockDriver(device: try BlockDevice(path: disk.path, readOnly: true))
        driver.start()
        let head = try driver.blockRequest(type: 0, sector: 1, dataLength: 512)
        try driver.submit(head)
        #expect(try driver.takeUsed().count == 1)
        let block = driver.transport.device as! BlockDevice
        let (t, d) = driver.transport.captureState { block.captureState() }
        return (driver, disk, t, d)
    }

    @Test func aRestoredTransportServesTheNextRequestWhereTheOldOneLeftOff() throws {
        let (driver, disk, saved, deviceState) = try Self.savedBlockDevice()
        #expect(saved.queues[0].ready && saved.queues[0].nextAvailable == 1 && saved.queues[0].nextUsed == 1)
        #expect(deviceState.requests == 1 && deviceState.sectors == 16)

        // A new device and transport on the same guest memory: the driver never noticed.
        let block = try BlockDevice(path: disk.path, readOnly: true)
        let line = RecordingLine()
        let fresh = MMIOTransport(device: block, memory: driver.memory, interrupt: line)
        try fresh.restoreState(saved, name: "disk") { () throws(StateError) in try block.restoreState(deviceState, name: "disk") }
        #expect(fresh.status == saved.status)
        #expect(block.statistics.requests == 1)

        let next = MockDriver(continuing: driver, on: fresh)
        let head = try next.blockRequest(type: 0, sector: 2, dataLength: 512)
        try next.submit(head)
        let used = try next.takeUsed()
        #expect(used.count == 1 && used[0].len == 513)
        #expect(try next.requestStatus() == 0)
        #expect(try driver.memory.readBytes(at: MockDriver.data, count: 512) == [UInt8](repeating: 2, count: 512))
        #expect(line.high, "the used-buffer interrupt is raised on the new line")
    }

    /// Each way a saved transport can break the rules, and the field the refusal names.
    static func breakState(_ name: String, _ s: inout TransportState) {
        switch name {
        case "status bits": s.status |= 0x20
        case "DRIVER_OK alone": s.status = VirtioStatus.driverOK
        case "features not offered": s.driverFeatures |= 1 << 40
        case "no VERSION_1": s.driverFeatures &= ~VirtioFeature.version1
        case "interrupt bits": s.interruptStatus = 0x80
        case "queue count": s.queues.append(s.queues[0])
        case "queue max": s.queues[0].maxSize = 1024
        case "queue size": s.queues[0].size = 3
        case "ring outside RAM": s.queues[0].usedRing = 0xFFFF_FFFF_FFFF_F000
        case "unaligned ring": s.queues[0].descriptorTable += 8
        case "indirect": s.queues[0].indirectAllowed = true
        case "errors": s.queueErrors = -1
        default: Issue.record("unknown case \(name)")
        }
    }

    @Test(arguments: [
        ("status bits", "bits virtio does not define"),
        ("DRIVER_OK alone", "DRIVER_OK without FEATURES_OK"),
        ("features not offered", "not ones this device offers"),
        ("no VERSION_1", "VERSION_1 required"),
        ("interrupt bits", "undefined bits"),
        ("queue count", "queues, this device"),
        ("queue max", "holds at most 1024"),
        ("queue size", "not one a driver could set up"),
        ("ring outside RAM", "not one a driver could set up"),
        ("unaligned ring", "not one a driver could set up"),
        ("indirect", "VIRTIO_F_INDIRECT_DESC"),
        ("errors", "negative"),
    ])
    func aStateThatBreaksTheRulesIsRefusedAndChangesNothing(name: String, message: String) throws {
        let (driver, disk, saved, deviceState) = try Self.savedBlockDevice()
        var bad = saved
        Self.breakState(name, &bad)
        let block = try BlockDevice(path: disk.path, readOnly: true)
        let fresh = MMIOTransport(device: block, memory: driver.memory, interrupt: RecordingLine())
        var deviceRestored = false
        do {
            try fresh.restoreState(bad, name: "disk") { () throws(StateError) in
                deviceRestored = true
                try block.restoreState(deviceState, name: "disk")
            }
            Issue.record("\(name): accepted")
        } catch {
            #expect(error.description.contains(message), "\(name): \(error)")
        }
        #expect(!deviceRestored, "\(name): the device was touched before the transport's checks")
        #expect(fresh.status == 0, "\(name): the transport changed")
    }

    @Test func aDiskOfAnotherSizeOrModeIsRefused() throws {
        let (_, _, _, deviceState) = try Self.savedBlockDevice()
        let other = try TempDisk(sectors: 32)
        #expect(throws: StateError.self) { try BlockDevice(path: other.path, readOnly: true).restoreState(deviceState, name: "disk") }
        let same = try TempDisk(sectors: 16)
        #expect(throws: StateError.self) { try BlockDevice(path: same.path, readOnly: false).restoreState(deviceState, name: "disk") }
    }
}

/// A console's ports, their pending input and control messages survive a save
/// and restore; saved values over the device's own limits do not get in.
struct ConsoleStateTests {
    static let ports: [ConsoleDevice.PortSpec] = [.init(name: "airlock.control", output: nil), .init(name: "airlock.stdout", output: nil)]

    @Test func portsInputAndControlMessagesRoundTrip() throws {
        let console = ConsoleDevice(ports: Self.ports)
        console.handleControl(ConsoleDevice.message(id: 0, event: 0, value: 1))   // DEVICE_READY: DEVICE_ADDs queue up
        console.handleControl(ConsoleDevice.message(id: 1, event: 6, value: 1))   // the guest opened port 1
        console.queueInput(port: 1, Array("pending".utf8))
        let saved = console.captureState()
        #expect(saved.driverReady && saved.control.count == 2 && saved.ports[1].guestOpen)
        #expect(saved.ports[1].input == Array("pending".utf8))

        let fresh = ConsoleDevice(ports: Self.ports)
        try fresh.restoreState(saved, name: "console")
        #expect(fresh.captureState() == saved)
        #expect(fresh.isOpenInGuest(port: 1))
    }

    @Test func otherPortsOrOversizedContentsAreRefused() throws {
        let saved = ConsoleDevice(ports: Self.ports).captureState()
        #expect(throws: StateError.self) {
            try ConsoleDevice(ports: [.init(name: "airlock.control", output: nil)]).restoreState(saved, name: "console")
        }
        var renamed = saved
        renamed.ports[1].name = "other"
        #expect(throws: StateError.self) { try ConsoleDevice(ports: Self.ports).restoreState(renamed, name: "console") }
        var flooded = saved
        flooded.ports[0].input = [UInt8](repeating: 1, count: ConsoleDevice.inputCapacity + 1)
        #expect(throws: StateError.self) { try ConsoleDevice(ports: Self.ports).restoreState(flooded, name: "console") }
        var backlog = saved
        backlog.control = [[UInt8]](repeating: ConsoleDevice.message(id: 0, event: 1, value: 0), count: ConsoleDevice.controlBacklogLimit + 1)
        #expect(throws: StateError.self) { try ConsoleDevice(ports: Self.ports).restoreState(backlog, name: "console") }
        var short = saved
        short.control = [[1, 2, 3]]
        #expect(throws: StateError.self) { try ConsoleDevice(ports: Self.ports).restoreState(short, name: "console") }
    }
}

import AirlockOS
import Foundation
import GuestMemory
import KVM
import Testing
import VirtioDevices
@testable import Snapshot
@testable import VMM

/// A payload guest (no kernel: well under a second even where guest kernel
/// code is emulated) saved while it runs and restored into a fresh machine
/// through the snapshot file.
@Suite(.enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct PayloadSnapshotKVMTests {
    static let entry = GuestAddress(0x10_0000)
    static let flag = GuestAddress(0x20_0000)

    /// Prints 'R', loads EBX = "OK", spins until the byte at 2 MiB is set, then
    /// prints BL and BH and asks the i8042 for a reset.
    static let payload: [UInt8] = [
        0x66, 0xBA, 0xF8, 0x03,                          // mov dx, 0x3F8
        0xB0, 0x52, 0xEE,                                // mov al, 'R'; out dx, al
        0xBB, 0x4F, 0x4B, 0x00, 0x00,                    // mov ebx, 0x4B4F ("OK")
        0x80, 0x3C, 0x25, 0x00, 0x00, 0x20, 0x00, 0x00,  // 1: cmp byte [0x200000], 0
        0x74, 0xF6,                                      // je 1b
        0x88, 0xD8, 0xEE,                                // mov al, bl; out dx, al
        0x88, 0xF8, 0xEE,                                // mov al, bh; out dx, al
        0xB0, 0xFE, 0xE6, 0x64,                          // mov al, 0xFE; out 0x64, al
        0xF4, 0xEB, 0xFD,                                // 2: hlt; jmp 2b
    ]

    static func config(console: BoundedCapture, image: MemoryImage? = nil) -> MachineConfig {
        var c = MachineConfig()
        c.memoryBytes = 64 << 20
        c.console = console
        c.memoryImage = image
        return c
    }

    /// Runs `machine` on a thread of its own; the result arrives through the returned box.
    static func runInBackground(_ machine: Machine) -> DispatchSemaphore_Result {
        let box = DispatchSemaphore_Result()
        Thread.detachNewThread {
            box.result = Result { try machine.run(timeout: 60) }
            box.done.signal()
        }
        return box
    }

    @Test(.timeLimit(.minutes(2)))
    func aRunningGuestSavedAndRestoredGoesOnInAFreshMachine() throws {
        let scratch = try ScratchDirectory()
        let consoleA = BoundedCapture(limit: 1 << 16)
        let a = try Machine(Self.config(console: consoleA))
        try a.addConsoleDevice(ports: [.init(name: "test.port", output: BoundedCapture(limit: 1 << 10))])
        try a.loadPayload(Self.payload, at: Self.entry)
        let running = Self.runInBackground(a)
        // Wait for the ready byte, then let it spin a moment before pausing.
        let deadline = Date().addingTimeInterval(30)
        while consoleA.text != "R", Date() < deadline { usleep(1000) }
        #expect(consoleA.text == "R")
        usleep(20_000)
        a.pause()
        running.done.wait()
        let paused = try running.result!.get()
        #expect(paused.paused && paused.event == nil)

        let path = scratch.path("payload.snap")
        let report = try writeSnapshot(a, manifest: testManifest(memoryBytes: 64 << 20), to: path)
        // The guest touched a handful of pages (payload, page tables, GDT, zero page): those are all the file holds.
        #expect(report.dataPages > 0 && report.dataPages < 64)
        #expect(report.allocatedBytes < 8 << 20, "a sparse file: \(report.allocatedBytes) bytes allocated")

        let snapshot = try SnapshotFile.open(path)
        try snapshot.verifyMemory()
        let consoleB = BoundedCapture(limit: 1 << 16)
        let b = try Machine(Self.config(console: consoleB, image: snapshot.memoryImage))
        try b.addConsoleDevice(ports: [.init(name: "test.port", output: BoundedCapture(limit: 1 << 10))])
        try b.restore(snapshot.state, guestMode: a.guestMode)
        try b.memory.write(UInt8(1), at: Self.flag)
        let exitB = try b.run(timeout: 30)
        #expect(consoleB.text == "OK", "the restored guest printed \(consoleB.text)")
        #expect(exitB.event?.cause == .i8042Reset)

        // The original goes on too, from where it was paused, and its RAM never saw B's write.
        #expect(try a.memory.read(UInt8.self, at: Self.flag) == 0)
        try a.memory.write(UInt8(1), at: Self.flag)
        let exitA = try a.run(timeout: 30)
        #expect(consoleA.text == "ROK")
        #expect(exitA.event?.cause == .i8042Reset)
    }

    @Test func aMachineWithOtherDevicesOrMemoryRefusesTheState() throws {
        let scratch = try ScratchDirectory()
        let a = try Machine(Self.config(console: BoundedCapture(limit: 1 << 10)))
        try a.addConsoleDevice(ports: [.init(name: "one", output: nil)])
        try a.loadPayload(Self.payload, at: Self.entry)
        let path = scratch.path("a.snap")
        try writeSnapshot(a, manifest: testManifest(memoryBytes: 64 << 20), to: path)
        let snapshot = try SnapshotFile.open(path)

        // Another port name.
        let b = try Machine(Self.config(console: BoundedCapture(limit: 1 << 10), image: snapshot.memoryImage))
        try b.addConsoleDevice(ports: [.init(name: "two", output: nil)])
        #expect(throws: VMMError.self) { try b.restore(snapshot.state, guestMode: a.guestMode) }
        // No device at all.
        let c = try Machine(Self.config(console: BoundedCapture(limit: 1 << 10), image: snapshot.memoryImage))
        #expect(throws: VMMError.self) { try c.restore(snapshot.state, guestMode: a.guestMode) }
        // A machine booted from zeroed RAM.
        let d = try Machine(Self.config(console: BoundedCapture(limit: 1 << 10)))
        try d.addConsoleDevice(ports: [.init(name: "one", output: nil)])
        #expect(throws: VMMError.self) { try d.restore(snapshot.state, guestMode: a.guestMode) }
    }
}

final class DispatchSemaphore_Result: @unchecked Sendable {
    let done = DispatchSemaphore(value: 0)
    var result: Result<MachineExit, Error>?
}

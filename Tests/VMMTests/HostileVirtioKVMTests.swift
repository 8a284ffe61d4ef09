import Foundation
import GuestMemory
import Testing
@testable import VMM
import VirtioDevices

/// Just enough x86-64 encoding to write hostile virtio drivers as payloads.
struct Assembler {
    var code: [UInt8] = []

    static func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian, Array.init) }

    /// mov rdi, imm64
    mutating func movRDI(_ v: UInt64) { code += [0x48, 0xBF] + Self.le(v) }
    /// mov [rdi+disp], imm (width 1, 2, 4, or 8 with a sign-extended imm32)
    mutating func storeRDI(_ disp: Int32, _ value: UInt32, width: Int) {
        switch width {
        case 1: code += [0xC6, 0x87] + Self.le(disp) + [UInt8(truncatingIfNeeded: value)]
        case 2: code += [0x66, 0xC7, 0x87] + Self.le(disp) + Self.le(UInt16(truncatingIfNeeded: value))
        case 4: code += [0xC7, 0x87] + Self.le(disp) + Self.le(value)
        default: code += [0x48, 0xC7, 0x87] + Self.le(disp) + Self.le(value)
        }
    }
    /// mov eax, [rdi+disp] (a read the guest makes; the value is discarded)
    mutating func loadRDI(_ disp: Int32) { code += [0x8B, 0x87] + Self.le(disp) }
    /// mov [abs32], imm: for guest RAM below 2 GiB (width 2, 4, or 8 sign-extended)
    mutating func store(_ address: UInt32, _ value: UInt32, width: Int) {
        switch width {
        case 2: code += [0x66, 0xC7, 0x04, 0x25] + Self.le(address) + Self.le(UInt16(truncatingIfNeeded: value))
        case 4: code += [0xC7, 0x04, 0x25] + Self.le(address) + Self.le(value)
        default: code += [0x48, 0xC7, 0x04, 0x25] + Self.le(address) + Self.le(value)
        }
    }
    /// Sends the byte at `address` to COM1.
    mutating func printByte(at address: UInt32) {
        code += [0x8A, 0x04, 0x25] + Self.le(address)  // mov al, [abs32]
        code += [0x66, 0xBA, 0xF8, 0x03, 0xEE]         // mov dx, 0x3F8; out dx, al
    }
    mutating func resetAndHalt() { code += [0xB0, 0xFE, 0xE6, 0x64, 0xF4, 0xEB, 0xFD] }
}

/// A guest that attacks the virtio-blk device from inside a real VM: garbage
/// in every transport register at every width, a descriptor loop, a buffer at
/// the top of the address space, then one valid read whose status and first
/// data byte it prints. The VMM must survive all of it and serve the read.
@Suite(.enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct HostileVirtioKVMTests {
    static let desc: UInt32 = 0x20_0000, avail: UInt32 = 0x20_1000, used: UInt32 = 0x20_2000
    static let header: UInt32 = 0x30_0000, data: UInt32 = 0x30_1000, status: UInt32 = 0x30_2000

    static func descriptor(_ a: inout Assembler, _ i: UInt32, addr: UInt32, len: UInt32, flags: UInt32, next: UInt32) {
        let at = desc + i * 16
        a.store(at, addr, width: 8)
        a.store(at + 8, len, width: 4)
        a.store(at + 12, flags, width: 2)
        a.store(at + 14, next, width: 2)
    }

    static func payload() -> [UInt8] {
        var a = Assembler()
        a.movRDI(Layout.virtioMMIOBase)
        // Garbage everywhere, at every width, before the driver has even said hello.
        for offset in stride(from: Int32(0), to: 0x108, by: 4) where offset != 0x70 {
            for width in [1, 2, 8] { a.storeRDI(offset, 0xDEAD_BEEF, width: width) }
            a.loadRDI(offset)
        }
        // Bring-up as a driver should: reset, ACK, DRIVER, VERSION_1, FEATURES_OK, queue 0, DRIVER_OK.
        for (offset, value): (Int32, UInt32) in [(0x70, 0), (0x70, 1), (0x70, 3), (0x24, 1), (0x20, 1), (0x24, 0), (0x20, 0), (0x70, 11),
                                                 (0x30, 0), (0x38, 8), (0x80, desc), (0x84, 0), (0x90, avail), (0x94, 0),
                                                 (0xA0, used), (0xA4, 0), (0x44, 1), (0x70, 15)] {
            a.storeRDI(offset, value, width: 4)
        }
        // Attack 1: a descriptor loop (0 -> 1 -> 0).
        descriptor(&a, 0, addr: header, len: 16, flags: 1, next: 1)
        descriptor(&a, 1, addr: data, len: 512, flags: 1 | 2, next: 0)
        a.store(avail + 4, 0, width: 2)
        a.store(avail + 2, 1, width: 2)
        a.storeRDI(0x50, 0, width: 4)
        // Attack 2: a buffer at the top of the 64-bit address space.
        descriptor(&a, 2, addr: header, len: 16, flags: 1, next: 3)
        descriptor(&a, 3, addr: 0xFFFF_F000, len: 512, flags: 1 | 2, next: 6)  // sign-extends to 0xffff_ffff_ffff_f000
        a.store(avail + 6, 2, width: 2)
        a.store(avail + 2, 2, width: 2)
        a.storeRDI(0x50, 0, width: 4)
        // Then a valid read of sector 1.
        a.store(header, 0, width: 4)
        a.store(header + 8, 1, width: 8)
        a.store(status, 0xFF, width: 2)
        descriptor(&a, 4, addr: header, len: 16, flags: 1, next: 5)
        descriptor(&a, 5, addr: data, len: 512, flags: 1 | 2, next: 6)
        descriptor(&a, 6, addr: status, len: 1, flags: 2, next: 0)
        a.store(avail + 8, 4, width: 2)
        a.store(avail + 2, 3, width: 2)
        a.storeRDI(0x50, 0, width: 4)
        a.printByte(at: status)
        a.printByte(at: data)
        a.resetAndHalt()
        return a.code
    }

    @Test func theVMMSurvivesAndServesTheValidRequest() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("airlock-hostile-\(UUID().uuidString).img").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        var disk = Data(count: 8 * 512)
        disk[512] = 0x5A  // first byte of sector 1
        try disk.write(to: URL(fileURLWithPath: path))

        let console = BoundedCapture(limit: 1 << 20)
        var config = MachineConfig()
        config.memoryBytes = 64 << 20
        config.console = console
        let machine = try Machine(config)
        let device = try machine.addBlockDevice(path: path, readOnly: true)
        try machine.loadPayload(Self.payload(), at: GuestAddress(0x10_0000))
        let exit = try machine.run(timeout: 60)

        #expect(exit.event?.cause == .i8042Reset)
        #expect(console.bytes == [0x00, 0x5A], "status and data byte the guest saw: \(console.bytes)")
        #expect(device.statistics.requests >= 1)
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == disk)
    }
}

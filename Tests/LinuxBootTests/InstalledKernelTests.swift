import AirlockOS
import Foundation
import GuestMemory
import Testing
@testable import LinuxBoot

/// Loads the installed guest kernel (make images), when there is one, as a check
/// that the synthetic images above resemble the real thing. Skipped otherwise.
@Suite(.enabled(if: installedKernelPath != nil, "no guest kernel installed (make images)"))
struct InstalledKernelTests {
    @Test func theInstalledVmlinuxLoads() throws {
        let path = try #require(installedKernelPath)
        let image = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        let m = try testMemory(128 << 20)
        let k = try KernelLoader.load(image, path: path, into: m)
        #expect(k.format == .elf)
        #expect(k.entry == k.start)  // phys_startup_64 is the first byte of .text
        #expect(k.start.raw >= 1 << 20 && k.end > k.start)
        // The first PT_LOAD's bytes are in guest memory at its physical address.
        let phoff = Int(readLE(UInt64.self, image, 32))
        let offset = Int(readLE(UInt64.self, image, phoff + 8))
        let paddr = readLE(UInt64.self, image, phoff + 24)
        #expect(try m.readBytes(at: GuestAddress(paddr), count: 4096) == Array(image[offset..<(offset + 4096)]))

        var params = BootParams(kernel: k)
        try params.setE820(E820Entry.e820Map(memory: m))
        let initrd = try InitrdPlacer.place(size: 2 << 20, kernel: k, memory: m, path: "initrd")
        #expect(initrd.raw >= k.end.raw)
    }

    @Test func theInstalledKernelCarriesThePVNoteThroughTheStrip() throws {
        // build.sh strips the symbol table; the note the VMM looks for must survive it.
        let path = try #require(installedKernelPath)
        #expect(KernelLoader.startsInPVMode(try MappedFile(path: path, role: "kernel")),
                "\(path) has no Airlock PV note: rebuild it with make images (guest-kernel/patches/0010)")
    }

    @Test func theInstalledVmlinuxLoadsTheSameMappedAsCopied() throws {
        let path = try #require(installedKernelPath)
        let image = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        let copied = try testMemory(128 << 20)
        let kc = try KernelLoader.load(image, path: path, into: copied)
        let mapped = try testMemory(128 << 20)
        let km = try KernelLoader.load(try MappedFile(path: path, role: "kernel"), into: mapped)
        #expect(km.start == kc.start && km.end == kc.end && km.entry == kc.entry)
        let count = Int(kc.end.raw - kc.start.raw)
        #expect(try mapped.readBytes(at: kc.start, count: count) == copied.readBytes(at: kc.start, count: count))
    }
}

/// ${AIRLOCK_HOME:-$HOME/.local/share/airlock}/images/vmlinux, if it is there.
let installedKernelPath: String? = {
    let env = ProcessInfo.processInfo.environment
    let home = env["AIRLOCK_HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? ((env["HOME"] ?? "/root") + "/.local/share/airlock")
    let path = home + "/images/vmlinux"
    return FileManager.default.isReadableFile(atPath: path) ? path : nil
}()

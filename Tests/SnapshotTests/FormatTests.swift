import AirlockOS
import Foundation
import GuestMemory
import KVM
import SeededRandom
import Testing
import Virtio
@testable import VirtioDevices
@testable import Snapshot
@testable import VMM

/// The snapshot file as a format: what is written reads back, and every way
/// a file can be wrong (cut short, a byte changed in any part, another
/// version, not a snapshot, made from other inputs) is refused with a message
/// that names the file and what to do. No VM needed.
struct SnapshotFormatTests {
    static let memoryBytes: UInt64 = 8 << 20

    static func blob(_ size: Int, _ seed: UInt8) -> [UInt8] { (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 7) &+ seed } }

    /// A machine state with every kind of record in it, values of the right shapes.
    static func state() -> MachineState {
        var chips: [[UInt8]] = []
        for id in 0..<3 {
            var c = blob(VMState.irqChipSize, UInt8(id))
            c[0] = UInt8(id); c[1] = 0; c[2] = 0; c[3] = 0
            chips.append(c)
        }
        let vcpu = VCPUState(
            cpuid: CPUIDTable(entries: [CPUIDEntry(function: 0, eax: 0xD, ebx: 1, ecx: 2, edx: 3), CPUIDEntry(function: 7, index: 1, flags: 1, eax: 9)]),
            regs: blob(VCPUState.regsSize, 1), sregs: blob(VCPUState.sregsSize, 2), xsave: blob(4096, 3), xcrs: blob(VCPUState.xcrsSize, 4),
            lapic: blob(VCPUState.lapicSize, 5), events: blob(VCPUState.eventsSize, 6), mpState: 3,
            debugRegisters: blob(VCPUState.debugRegistersSize, 7),
            msrs: [MSREntry(index: 0x10, value: 123_456), MSREntry(index: HostProfile.pvmVIFMSR, value: 0x5400)], tscKHz: 2_100_000)
        let queue = QueueState(maxSize: 256, size: 128, ready: true, descriptorTable: 0x10_0000, availableRing: 0x10_1000, usedRing: 0x10_2000,
                               indirectAllowed: false, nextAvailable: 65_530, nextUsed: 7)
        let transport = TransportState(status: 15, deviceFeaturesSel: 1, driverFeaturesSel: 0, driverFeatures: VirtioFeature.version1,
                                       queueSel: 0, queues: [queue], interruptStatus: 1, configGeneration: 0, queueErrors: 2)
        let console = ConsoleDeviceState(
            ports: [.init(name: "airlock.control", input: [1, 2, 3], droppedInput: 0, guestReady: true, guestOpen: true),
                    .init(name: "ü", input: [], droppedInput: 5, guestReady: false, guestOpen: false)],
            control: [ConsoleDevice.message(id: 1, event: 7, value: 0) + Array("name".utf8)], droppedControl: 0, driverReady: true,
            malformedControl: 1, oversizedTransmitBytes: 1 << 33)
        return MachineState(
            memoryBytes: memoryBytes, vcpus: [vcpu], vm: VMState(irqChips: chips, pit: blob(VMState.pitSize, 9), clock: 987_654_321),
            serial: SerialState(divisorLow: 1, divisorHigh: 0, ier: 3, lcr: 3, mcr: 0xB, scratch: 0x5A, fifosEnabled: true,
                                transmitEmptyPending: true, receive: [0x41], droppedInput: 0),
            i8042: I8042State(commandByte: 0x47, awaitingParameterFor: 0x60, output: nil, resetReported: false),
            virtio: [VirtioState(transport: transport, device: .block(BlockDeviceState(sectors: 32768, readOnly: true, requests: 99, errors: 1))),
                     VirtioState(transport: transport, device: .console(console))])
    }

    /// Guest RAM with a few data pages, a page of zeros that was touched, and untouched pages.
    static func memory() throws -> GuestMemory {
        let m = try GuestMemory(layout: [(GuestAddress(0), memoryBytes)])
        try m.write(Array("first page".utf8), at: GuestAddress(0))
        try m.write([UInt8](repeating: 0xAB, count: 3 * 4096), at: GuestAddress(0x20_0000))
        try m.write([UInt8](repeating: 0, count: 4096), at: GuestAddress(0x30_0000))   // touched, all zeros: left a hole
        try m.write(UInt64.max, at: GuestAddress(memoryBytes - 8))
        return m
    }

    static func write(to path: String) throws -> SnapshotWriteReport {
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        try #require(fd >= 0)
        defer { close(fd) }
        return try SnapshotWriter.write(fd: fd, path: path, manifest: testManifest(memoryBytes: memoryBytes), state: state(), memory: memory())
    }

    @Test func whatIsWrittenReadsBackAndOnlyDataPagesAreStored() throws {
        let scratch = try ScratchDirectory()
        let path = scratch.path("a.snap")
        let report = try Self.write(to: path)
        #expect(report.dataPages == 5, "4 pages of data at 0, 2 MiB (3 pages) and the last page")
        #expect(report.residentPages == 6, "the zero page was touched too")
        #expect(report.fileSize == SnapshotFormat.memoryAlignment + Self.memoryBytes)
        let snapshot = try SnapshotFile.open(path)
        #expect(snapshot.state == Self.state())
        var manifest = testManifest(memoryBytes: Self.memoryBytes)
        manifest.dataPages = 5
        #expect(snapshot.manifest == manifest)
        #expect(snapshot.memoryOffset == SnapshotFormat.memoryAlignment)
        try snapshot.verifyMemory()

        // The RAM image maps back with the same bytes.
        let restored = try GuestMemory(layout: [(GuestAddress(0), Self.memoryBytes)], imageFD: snapshot.file.rawValue, imageOffset: snapshot.memoryOffset)
        #expect(try restored.readBytes(at: GuestAddress(0), count: 10) == Array("first page".utf8))
        #expect(try restored.read(UInt64.self, at: GuestAddress(Self.memoryBytes - 8)) == .max)
        #expect(try restored.read(UInt8.self, at: GuestAddress(0x30_0000)) == 0)
        // Writes stay private: the file never changes.
        try restored.write(UInt8(0x77), at: GuestAddress(0))
        try SnapshotFile.open(path).verifyMemory()
    }

    /// One byte changed in each part: the header, the manifest, the machine state, guest memory.
    @Test(arguments: ["magic", "version", "section table", "manifest", "machine state", "memory"])
    func aChangedByteInAnyPartIsRefusedNamingIt(part: String) throws {
        let scratch = try ScratchDirectory()
        let path = scratch.path("a.snap")
        _ = try Self.write(to: path)
        let good = try SnapshotFile.open(path)
        let offset: UInt64
        switch part {
        case "magic": offset = 0
        case "version": offset = 8
        case "section table": offset = 40
        case "manifest": offset = 4096 + 20
        case "machine state": offset = 4096 + UInt64(StateCodec.encode(good.manifest).count) + 100
        default: offset = good.memoryOffset + 0x20_0000 + 17
        }
        try flipByte(path, at: offset)
        do {
            let s = try SnapshotFile.open(path)
            try s.verifyMemory()
            Issue.record("\(part): accepted")
        } catch {
            let text = error.description
            #expect(text.contains(path), "\(part): \(text)")
            switch part {
            case "magic": #expect(error == .notASnapshot(path: path))
            case "version": #expect(text.contains("format version") && text.contains("another Airlock"), "\(text)")
            case "section table": #expect(text.contains("corrupted: its header"), "\(text)")
            case "manifest": #expect(text.contains("its manifest does not match its SHA-256"), "\(text)")
            case "machine state": #expect(text.contains("its machine state"), "\(text)")
            default: #expect(text.contains("guest memory image does not match"), "\(text)")
            }
            #expect(text.contains("airlock snapshot rm") || part == "magic", "says what to do: \(text)")
        }
    }

    @Test(arguments: [0, 100, 4096, 8192, Int(SnapshotFormat.memoryAlignment) + 4096])
    func aTruncatedFileIsRefused(keep: Int) throws {
        let scratch = try ScratchDirectory()
        let path = scratch.path("a.snap")
        _ = try Self.write(to: path)
        #expect(truncate(path, off_t(keep)) == 0)
        #expect { try SnapshotFile.open(path) } throws: { e in
            let error = e as! SnapshotError
            if case .truncated = error { return error.description.contains(path) && error.description.contains("airlock snapshot rm") }
            return false
        }
    }

    @Test func otherFilesAreNotSnapshots() throws {
        let scratch = try ScratchDirectory()
        #expect(throws: SnapshotError.notASnapshot(path: "/")) { try SnapshotFile.open("/") }
        let path = scratch.path("text")
        try Data(repeating: 0x61, count: 8192).write(to: URL(fileURLWithPath: path))
        #expect(throws: SnapshotError.notASnapshot(path: path)) { try SnapshotFile.open(path) }
        #expect { try SnapshotFile.open(scratch.path("missing")) } throws: { e in
            if case .io = e as! SnapshotError { return true }
            return false
        }
    }

    /// Each input a manifest pins: a different one refuses the snapshot as foreign, naming it.
    @Test(arguments: ["kernel", "rootfs", "command line", "memory", "vcpus", "backend", "mode", "xsave", "cpuid"])
    func aSnapshotMadeFromOtherInputsIsForeign(input: String) throws {
        let m = testManifest(memoryBytes: Self.memoryBytes, cpuid: CPUIDTable(entries: [CPUIDEntry(function: 1, ecx: 5)]))
        var r = SnapshotRequirements(kernelSHA256: m.kernelSHA256, rootfsSHA256: m.rootfsSHA256, commandLines: [m.guestMode: m.commandLine],
                                     memoryBytes: m.memoryBytes, vcpuCount: m.vcpuCount, hostBackend: m.hostBackend,
                                     cpuid: m.cpuid, xsaveSize: m.xsaveSize)
        try m.check(r, path: "/x.snap")
        let needle: String
        switch input {
        case "kernel": r.kernelSHA256 = "c"; needle = "kernel"
        case "rootfs": r.rootfsSHA256 = "c"; needle = "root filesystem"
        case "command line": r.commandLines[m.guestMode]! += " more"; needle = "command line"
        case "memory": r.memoryBytes *= 2; needle = "memory"
        case "vcpus": r.vcpuCount = 2; needle = "vCPUs"
        case "backend": r.hostBackend = "hardware"; needle = "KVM backend"
        case "mode": r.commandLines = ["pvm-native": m.commandLine]; needle = "mode pvm-emulated"
        case "xsave": r.xsaveSize = 8192; needle = "XSAVE"
        default: r.cpuid = CPUIDTable(entries: [CPUIDEntry(function: 1, ecx: 6)]); needle = "CPU features"
        }
        #expect { try m.check(r, path: "/x.snap") } throws: { e in
            let text = (e as! SnapshotError).description
            return text.contains("/x.snap") && text.contains(needle) && text.contains("not made for this machine")
        }
    }

    /// Random changes to a valid file's header, manifest and state: the reader
    /// refuses or accepts, and never traps, hangs or allocates without bound;
    /// a change inside what the digests cover is always refused.
    @Test func theReaderSurvivesRandomDamage() throws {
        let scratch = try ScratchDirectory()
        let path = scratch.path("a.snap")
        _ = try Self.write(to: path)
        let original = try Data(contentsOf: URL(fileURLWithPath: path))
        let good = try SnapshotFile.open(path)
        let stateEnd = 4096 + StateCodec.encode(good.manifest).count + StateCodec.encode(good.state).count
        let covered = { (i: Int) in i < SnapshotFormat.tableEnd + 32 || (i >= 4096 && i < stateEnd) }
        var rng = SplitMix64(seed: UInt64(ProcessInfo.processInfo.environment["AIRLOCK_FUZZ_SEED"] ?? "") ?? 15)
        let rounds = Int(ProcessInfo.processInfo.environment["AIRLOCK_SNAPSHOT_FUZZ_ROUNDS"] ?? "") ?? 300
        var refused = 0
        for round in 0..<rounds {
            var bytes = [UInt8](original.prefix(stateEnd + 64))
            var touchedCovered = false
            for _ in 0..<(1 + rng.below(4)) {
                let i = rng.below(bytes.count)
                let old = bytes[i]
                bytes[i] = UInt8(truncatingIfNeeded: rng.next())
                if bytes[i] != old && covered(i) { touchedCovered = true }
            }
            let damaged = scratch.path("d\(round % 4).snap")
            // The records only; the memory image's place stays a hole (open reads no memory).
            try Data(bytes).write(to: URL(fileURLWithPath: damaged))
            #expect(truncate(damaged, off_t(original.count)) == 0)
            do {
                _ = try SnapshotFile.open(damaged)
                #expect(!touchedCovered, "round \(round): a change the digests cover was accepted")
            } catch {
                refused += 1
            }
        }
        #expect(refused > rounds / 2)
    }

    /// The decoder alone (the digests keep damaged bytes from it in a real
    /// file): a valid state with bytes changed, cut, or pure noise decodes or
    /// throws, never traps; no count makes it allocate more than the bytes it has.
    @Test func theStateDecoderSurvivesAnyBytes() throws {
        let valid = StateCodec.encode(Self.state())
        #expect(try StateCodec.decodeState(valid) == Self.state())
        var rng = SplitMix64(seed: 21)
        for _ in 0..<2000 {
            var bytes = valid
            switch rng.below(3) {
            case 0: for _ in 0..<(1 + rng.below(8)) { bytes[rng.below(bytes.count)] = UInt8(truncatingIfNeeded: rng.next()) }
            case 1: bytes = Array(bytes.prefix(rng.below(bytes.count)))
            default: bytes = (0..<rng.below(4096)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            }
            _ = try? StateCodec.decodeState(bytes)
            _ = try? StateCodec.decodeManifest(bytes)
        }
    }
}

func flipByte(_ path: String, at offset: UInt64) throws {
    let fd = open(path, O_RDWR | O_CLOEXEC)
    try #require(fd >= 0)
    defer { close(fd) }
    var b: UInt8 = 0
    #expect(pread(fd, &b, 1, off_t(offset)) == 1)
    b ^= 0x01
    #expect(pwrite(fd, &b, 1, off_t(offset)) == 1)
}

import GuestMemory

public enum KernelFormat: String, Sendable { case elf = "ELF vmlinux", bzImage }

/// A kernel copied into guest memory.
public struct LoadedKernel: Sendable {
    public let format: KernelFormat
    /// The 64-bit entry point (physical).
    public let entry: GuestAddress
    /// Lowest byte loaded.
    public let start: GuestAddress
    /// One past the highest byte loaded, bss included.
    public let end: GuestAddress
    /// bzImage only: the setup header (boot_params offsets 0x1F1 up to its end), copied into the zero page.
    public let setupHeader: [UInt8]?
}

/// Little-endian field reads from an untrusted file; every read is bounds-checked.
struct FileBytes {
    let bytes: [UInt8]
    let path: String

    var count: UInt64 { UInt64(bytes.count) }

    func range(_ offset: UInt64, _ length: UInt64, _ what: @autoclosure () -> String) throws(LinuxBootError) -> Range<Int> {
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow else { throw .malformed(path: path, reason: "\(what()) at offset \(LinuxBootError.hex(offset)) + \(LinuxBootError.hex(length)) overflows") }
        guard end <= count else { throw .truncated(path: path, what: what(), needed: end, fileSize: count) }
        return Int(offset)..<Int(end)
    }

    func integer<T: FixedWidthInteger>(_: T.Type, at offset: UInt64, _ what: @autoclosure () -> String) throws(LinuxBootError) -> T {
        let r = try range(offset, UInt64(MemoryLayout<T>.size), what())
        var v: T = 0
        for (i, b) in bytes[r].enumerated() { v |= T(b) << T(8 * i) }
        return v
    }
}

public enum KernelLoader {
    /// Recognises an ELF vmlinux or a bzImage, validates it and copies it into guest memory.
    public static func load(_ image: [UInt8], path: String, into memory: GuestMemory) throws(LinuxBootError) -> LoadedKernel {
        let file = FileBytes(bytes: image, path: path)
        if image.count >= 4, image[0] == 0x7F, image[1] == 0x45, image[2] == 0x4C, image[3] == 0x46 {
            return try loadELF(file, memory: memory)
        }
        if image.count >= 0x206, image[0x202] == 0x48, image[0x203] == 0x64, image[0x204] == 0x72, image[0x205] == 0x53 {
            return try loadBzImage(file, memory: memory)
        }
        throw .unknownFormat(path: path, firstBytes: Array(image.prefix(8)))
    }

    static let maxProgramHeaders: UInt16 = 64

    static func loadELF(_ f: FileBytes, memory: GuestMemory) throws(LinuxBootError) -> LoadedKernel {
        let path = f.path
        _ = try f.range(0, 64, "the ELF header")
        guard f.bytes[4] == 2 else { throw .unsupportedELF(path: path, reason: "it is a 32-bit ELF (class \(f.bytes[4])); Airlock boots 64-bit kernels") }
        guard f.bytes[5] == 1 else { throw .unsupportedELF(path: path, reason: "it is big-endian") }
        let machine = try f.integer(UInt16.self, at: 18, "e_machine")
        guard machine == 62 else { throw .unsupportedELF(path: path, reason: "e_machine is \(machine), not x86-64 (62)") }
        let entry = try f.integer(UInt64.self, at: 24, "e_entry")
        let phoff = try f.integer(UInt64.self, at: 32, "e_phoff")
        let phentsize = try f.integer(UInt16.self, at: 54, "e_phentsize")
        let phnum = try f.integer(UInt16.self, at: 56, "e_phnum")
        guard phentsize == 56 else { throw .malformed(path: path, reason: "program header size is \(phentsize), not 56") }
        guard phnum > 0, phnum <= maxProgramHeaders else {
            throw .malformed(path: path, reason: "\(phnum) program headers (expected 1 to \(maxProgramHeaders))")
        }
        _ = try f.range(phoff, UInt64(phnum) * 56, "the program header table")

        struct Segment { let index: Int; let offset: UInt64; let paddr: UInt64; let filesz: UInt64; let memsz: UInt64 }
        var segments: [Segment] = []
        for i in 0..<Int(phnum) {
            let h = phoff + UInt64(i) * 56  // inside the file: checked above
            guard try f.integer(UInt32.self, at: h, "p_type") == 1 else { continue }  // PT_LOAD
            let s = Segment(index: i,
                            offset: try f.integer(UInt64.self, at: h + 8, "p_offset"),
                            paddr: try f.integer(UInt64.self, at: h + 24, "p_paddr"),
                            filesz: try f.integer(UInt64.self, at: h + 32, "p_filesz"),
                            memsz: try f.integer(UInt64.self, at: h + 40, "p_memsz"))
            guard s.filesz <= s.memsz else {
                throw .malformed(path: path, reason: "segment \(i) has more file bytes (\(LinuxBootError.hex(s.filesz))) than memory bytes (\(LinuxBootError.hex(s.memsz)))")
            }
            _ = try f.range(s.offset, s.filesz, "segment \(i)")
            guard memory.contains(GuestAddress(s.paddr), length: s.memsz) else {
                throw .segmentOutsideMemory(path: path, segment: i, address: s.paddr, size: s.memsz, ramEnd: memory.highestAddress.raw)
            }
            segments.append(s)
        }
        guard !segments.isEmpty else { throw .malformed(path: path, reason: "no loadable (PT_LOAD) segments") }
        // x86-64 vmlinux links ENTRY(phys_startup_64): e_entry is physical and must be inside what we load.
        guard segments.contains(where: { entry >= $0.paddr && entry - $0.paddr < $0.memsz }) else {
            throw .malformed(path: path, reason: "entry point \(LinuxBootError.hex(entry)) is outside every loadable segment")
        }
        // Everything is validated; only now touch guest memory.
        do {
            for s in segments {
                let r = try f.range(s.offset, s.filesz, "segment \(s.index)")
                let result = f.bytes[r].withUnsafeBytes { b in
                    Result { () throws(GuestMemoryError) in try memory.write(at: GuestAddress(s.paddr), from: b) }
                }
                try result.get()
                try memory.fill(at: GuestAddress(s.paddr + s.filesz), count: s.memsz - s.filesz)
            }
        } catch let e as GuestMemoryError { throw .memory(e) } catch { throw .malformed(path: path, reason: "\(error)") }
        let start = segments.map(\.paddr).min()!
        let end = segments.map { $0.paddr + $0.memsz }.max()!  // no overflow: memory.contains checked it
        return LoadedKernel(format: .elf, entry: GuestAddress(entry), start: GuestAddress(start), end: GuestAddress(end), setupHeader: nil)
    }

    /// Where the protected-mode part of a bzImage goes: the classic 1 MiB high-load address.
    public static let bzImageLoadAddress: UInt64 = 0x10_0000
    /// The oldest boot protocol with the 64-bit entry (2.12 added xloadflags).
    static let minimumBootProtocol: UInt16 = 0x020C

    static func loadBzImage(_ f: FileBytes, memory: GuestMemory) throws(LinuxBootError) -> LoadedKernel {
        let path = f.path
        let bootFlag = try f.integer(UInt16.self, at: 0x1FE, "boot_flag")
        guard bootFlag == 0xAA55 else { throw .unsupportedBzImage(path: path, reason: "boot_flag is \(LinuxBootError.hex(UInt64(bootFlag))), not 0xaa55") }
        let version = try f.integer(UInt16.self, at: 0x206, "the boot protocol version")
        guard version >= minimumBootProtocol else {
            throw .unsupportedBzImage(path: path, reason: "boot protocol \(version >> 8).\(version & 0xFF) is older than 2.12, which the 64-bit entry needs")
        }
        let xloadflags = try f.integer(UInt16.self, at: 0x236, "xloadflags")
        guard xloadflags & 1 != 0 else {
            throw .unsupportedBzImage(path: path, reason: "it lacks XLF_KERNEL_64 (no 64-bit entry point); build it for x86-64")
        }
        let headerEnd = 0x202 + UInt64(try f.integer(UInt8.self, at: 0x201, "the setup header length"))
        let header = Array(f.bytes[try f.range(0x1F1, headerEnd - 0x1F1, "the setup header")])
        var setupSectors = UInt64(try f.integer(UInt8.self, at: 0x1F1, "setup_sects"))
        if setupSectors == 0 { setupSectors = 4 }
        let kernelOffset = (setupSectors + 1) * 512
        guard kernelOffset < f.count else {
            throw .truncated(path: path, what: "the protected-mode kernel after \(setupSectors) setup sectors", needed: kernelOffset + 1, fileSize: f.count)
        }
        let size = f.count - kernelOffset
        // init_size: the memory the kernel needs from its load address while it decompresses
        // and runs; nothing else (the initrd) may be placed there.
        let initSize = UInt64(try f.integer(UInt32.self, at: 0x260, "init_size"))
        let footprint = max(size, initSize)
        guard memory.contains(GuestAddress(bzImageLoadAddress), length: footprint) else {
            throw .segmentOutsideMemory(path: path, segment: 0, address: bzImageLoadAddress, size: footprint, ramEnd: memory.highestAddress.raw)
        }
        let r = try f.range(kernelOffset, size, "the protected-mode kernel")
        let result = f.bytes[r].withUnsafeBytes { b in
            Result { () throws(GuestMemoryError) in try memory.write(at: GuestAddress(bzImageLoadAddress), from: b) }
        }
        do { try result.get() } catch { throw .memory(error) }
        return LoadedKernel(format: .bzImage, entry: GuestAddress(bzImageLoadAddress + 0x200),
                            start: GuestAddress(bzImageLoadAddress), end: GuestAddress(bzImageLoadAddress + footprint),
                            setupHeader: header)
    }
}

import AirlockOS
import GuestMemory

/// Which of the two x86-64 kernel formats was booted; the zero page differs between them.
public enum KernelFormat: String, Sendable {
    case elf = "ELF vmlinux"
    case bzImage
}

/// A kernel copied into guest memory, and what the rest of the boot needs to know about it.
public struct LoadedKernel: Sendable {
    public let format: KernelFormat
    /// The 64-bit entry point, physical. ELF: e_entry (x86-64 vmlinux links it at
    /// phys_startup_64). bzImage: load address + 0x200, per the 64-bit boot protocol.
    public let entry: GuestAddress
    /// Lowest byte loaded.
    public let start: GuestAddress
    /// One past the highest byte the kernel occupies before it runs: ELF bss
    /// included; for a bzImage, the end of the area it decompresses into
    /// (init_size from its runtime start), which nothing else may overlap.
    public let end: GuestAddress
    /// bzImage only: the setup header (from boot_params offset 0x1F1 to the end
    /// its jump instruction at 0x200 announces), to copy into the zero page.
    public let setupHeader: [UInt8]?
    /// ELF only: the kernel's "Airlock" ELF note says it can start in a PVM
    /// host's paravirtual mode, with the VIF page registered before its first
    /// instruction (guest-kernel/patches: it then runs natively from there).
    /// A kernel without it must start emulated: its early page tables would
    /// lack the user bit the host needs in that mode.
    public var startsInPVMode: Bool = false

    /// The highest address the initrd may occupy: the bzImage's initrd_addr_max,
    /// or 4 GiB - 1 for a vmlinux, whose header does not say.
    public var initrdAddressMax: UInt64 {
        guard let h = setupHeader else { return 0xFFFF_FFFF }
        let v = Self.field(UInt32.self, BootParams.initrdAddrMax, in: h) ?? 0
        // boot.rst: a kernel with no value there accepts up to 0x37FFFFFF.
        return v == 0 ? 0x37FF_FFFF : UInt64(v)
    }

    /// bzImage only: the longest command line the kernel accepts, NUL excluded (cmdline_size).
    public var maxCommandLineLength: Int? {
        guard let h = setupHeader, let v = Self.field(UInt32.self, BootParams.cmdlineSize, in: h) else { return nil }
        return Int(v)
    }

    /// The boot protocol version, e.g. 0x020F; nil for a vmlinux.
    public var bootProtocolVersion: UInt16? {
        setupHeader.flatMap { Self.field(UInt16.self, BootParams.version, in: $0) }
    }

    /// A little-endian field of the setup header, addressed by its boot_params offset.
    static func field<T: FixedWidthInteger>(_: T.Type, _ offset: Int, in header: [UInt8]) -> T? {
        let at = offset - BootParams.setupHeader
        guard at >= 0, at + MemoryLayout<T>.size <= header.count else { return nil }
        var value: T = 0
        for i in 0..<MemoryLayout<T>.size { value |= T(header[at + i]) << (8 * i) }
        return value
    }
}

/// The front door for kernel images: recognises the format, validates the
/// whole file, and only then copies it into guest memory, so a rejected file
/// leaves guest RAM untouched.
public enum KernelLoader {
    /// Detects ELF vs bzImage, validates everything, copies into guest memory.
    /// `path` is only used in error messages.
    public static func load(_ image: [UInt8], path: String, into memory: GuestMemory) throws(LinuxBootError) -> LoadedKernel {
        // withUnsafeBytes is rethrows, which erases the typed error: carry it out in a Result.
        let result = image.withUnsafeBytes { bytes in
            Result { () throws(LinuxBootError) in try load(UntrustedFile(bytes: bytes, path: path, descriptor: nil), into: memory) }
        }
        return try result.get()
    }

    /// The same from a mapped file, read in place: a vmlinux's segments are
    /// mapped into guest RAM copy-on-write instead of copied, so several VMs
    /// booting one kernel share its unwritten pages through the page cache.
    public static func load(_ file: MappedFile, into memory: GuestMemory) throws(LinuxBootError) -> LoadedKernel {
        try withExtendedLifetime(file) { () throws(LinuxBootError) in
            try load(UntrustedFile(bytes: file.bytes, path: file.path, descriptor: file.descriptor.rawValue), into: memory)
        }
    }

    static func load(_ file: UntrustedFile, into memory: GuestMemory) throws(LinuxBootError) -> LoadedKernel {
        if file.bytes.starts(with: ELFLoader.magic) {
            return try ELFLoader.load(file, into: memory)
        }
        if BzImageLoader.hasSetupHeaderSignature(file.bytes) {
            return try BzImageLoader.load(file, into: memory)
        }
        throw .unrecognizedKernel(path: file.path, firstBytes: Array(file.bytes.prefix(8)))
    }

    /// Whether the kernel file says it can start in a PVM host's paravirtual mode (its
    /// "Airlock" ELF note; see `LoadedKernel.startsInPVMode`), without loading it. False for
    /// a bzImage and for anything that is not a valid x86-64 vmlinux.
    public static func startsInPVMode(_ file: MappedFile) -> Bool {
        withExtendedLifetime(file) {
            let f = UntrustedFile(bytes: file.bytes, path: file.path, descriptor: file.descriptor.rawValue)
            guard f.bytes.starts(with: ELFLoader.magic) else { return false }
            return (try? ELFLoader.noteSaysPVEntry(f)) ?? false
        }
    }

    /// Where a bzImage's protected-mode code goes: the classic high-load address.
    public static let bzImageLoadAddress: UInt64 = BzImageLoader.loadAddress
}

/// ELF64 vmlinux: copy each PT_LOAD segment to its physical address, zero its bss.
enum ELFLoader {
    static let magic: [UInt8] = [0x7F, 0x45, 0x4C, 0x46]  // "\x7FELF"
    static let headerSize: UInt64 = 64
    static let programHeaderSize: UInt16 = 56
    /// A vmlinux has a handful; the bound keeps a hostile e_phnum from costing anything.
    static let maxProgramHeaders: UInt16 = 64

    static let classELF64: UInt8 = 2
    static let dataLittleEndian: UInt8 = 1
    static let typeExecutable: UInt16 = 2
    static let machineX86_64: UInt16 = 62
    static let typeLoad: UInt32 = 1
    static let typeNote: UInt32 = 4
    /// The note the guest kernel carries (arch/x86/kernel/airlock_pv.c): name "Airlock", type 1.
    static let airlockNoteName: [UInt8] = Array("Airlock".utf8) + [0]
    static let airlockNotePVEntry: UInt32 = 1
    /// A vmlinux has a few dozen notes; a hostile one gains nothing from more.
    static let maxNotes = 256

    struct Segment {
        let index: Int
        let fileOffset: UInt64
        let address: UInt64
        let fileSize: UInt64
        let memorySize: UInt64
        var end: UInt64 { address + memorySize }  // no overflow: checked before a Segment is made
    }

    static func load(_ f: UntrustedFile, into memory: GuestMemory) throws(LinuxBootError) -> LoadedKernel {
        let path = f.path
        func invalid(_ p: ELFProblem) -> LinuxBootError { .invalidELF(path: path, problem: p) }

        let header = try f.slice(0, length: headerSize, "the ELF header")
        let base = header.startIndex
        guard header[base + 4] == classELF64 else { throw invalid(.notELF64(elfClass: header[base + 4])) }
        guard header[base + 5] == dataLittleEndian else { throw invalid(.notLittleEndian(encoding: header[base + 5])) }
        let type = try f.read(UInt16.self, at: 16, "e_type")
        let machine = try f.read(UInt16.self, at: 18, "e_machine")
        guard machine == machineX86_64 else { throw invalid(.notX86_64(machine: machine)) }
        guard type == typeExecutable else { throw invalid(.notExecutable(type: type)) }
        let entry = try f.read(UInt64.self, at: 24, "e_entry")
        let tableOffset = try f.read(UInt64.self, at: 32, "e_phoff")
        let entrySize = try f.read(UInt16.self, at: 54, "e_phentsize")
        let count = try f.read(UInt16.self, at: 56, "e_phnum")
        guard entrySize == programHeaderSize else { throw invalid(.programHeaderSize(entrySize)) }
        guard count >= 1, count <= maxProgramHeaders else { throw invalid(.programHeaderCount(count)) }
        // count * 56 <= 3584: cannot overflow. The table itself must lie inside the file.
        _ = try f.range(tableOffset, length: UInt64(count) * UInt64(programHeaderSize),
                        "the program header table (\(count) entries)")

        var segments: [Segment] = []
        var startsInPVMode = false
        for i in 0..<Int(count) {
            let h = tableOffset + UInt64(i) * UInt64(programHeaderSize)  // inside the file: checked above
            let segmentType = try f.read(UInt32.self, at: h, "program header \(i)")
            if segmentType == typeNote {
                let offset = try f.read(UInt64.self, at: h + 8, "program header \(i)")
                let size = try f.read(UInt64.self, at: h + 32, "program header \(i)")
                if try notesHaveAirlockPVEntry(f, offset: offset, size: size, segment: i) { startsInPVMode = true }
                continue
            }
            guard segmentType == typeLoad else { continue }
            let fileOffset = try f.read(UInt64.self, at: h + 8, "program header \(i)")
            let address = try f.read(UInt64.self, at: h + 24, "program header \(i)")  // p_paddr
            let fileSize = try f.read(UInt64.self, at: h + 32, "program header \(i)")
            let memorySize = try f.read(UInt64.self, at: h + 40, "program header \(i)")
            guard fileSize <= memorySize else {
                throw invalid(.fileSizeExceedsMemorySize(segment: i, fileSize: fileSize, memorySize: memorySize))
            }
            _ = try f.range(fileOffset, length: fileSize, "segment \(i)")
            if memorySize == 0 { continue }  // nothing to load
            if address.addingReportingOverflow(memorySize).overflow {
                throw .rangeOverflows(path: path, what: "segment \(i)'s physical range", offset: address, length: memorySize)
            }
            guard memory.contains(GuestAddress(address), length: memorySize) else {
                throw .segmentOutsideMemory(path: path, segment: i, address: address, size: memorySize,
                                            ramEnd: memory.highestAddress.raw)
            }
            segments.append(Segment(index: i, fileOffset: fileOffset, address: address, fileSize: fileSize, memorySize: memorySize))
        }
        guard !segments.isEmpty else { throw invalid(.noLoadableSegment) }
        guard segments.contains(where: { entry >= $0.address && entry < $0.end }) else {
            throw invalid(.entryOutsideSegments(entry: entry))
        }

        // Everything is validated; only now is guest memory written.
        for s in segments {
            try GuestMemoryWriter.place(f, offset: s.fileOffset, length: s.fileSize, at: s.address,
                                        memory: memory, what: "segment \(s.index)")
            // The bss: RAM may hold anything (a reused VM, a previous load), and the kernel expects zeros.
            try GuestMemoryWriter.zero(at: s.address + s.fileSize, count: s.memorySize - s.fileSize, memory: memory, path: path)
        }
        let start = segments.map(\.address).min()!  // non-empty: checked above
        let end = segments.map(\.end).max()!
        var kernel = LoadedKernel(format: .elf, entry: GuestAddress(entry), start: GuestAddress(start),
                                  end: GuestAddress(end), setupHeader: nil)
        kernel.startsInPVMode = startsInPVMode
        return kernel
    }

    /// Reads the ELF header and program headers only, for the PV note.
    static func noteSaysPVEntry(_ f: UntrustedFile) throws(LinuxBootError) -> Bool {
        let tableOffset = try f.read(UInt64.self, at: 32, "e_phoff")
        let entrySize = try f.read(UInt16.self, at: 54, "e_phentsize")
        let count = try f.read(UInt16.self, at: 56, "e_phnum")
        guard entrySize == programHeaderSize, count <= maxProgramHeaders else { return false }
        // The table must lie inside the file, so the offsets below cannot overflow.
        _ = try f.range(tableOffset, length: UInt64(count) * UInt64(programHeaderSize), "the program header table")
        for i in 0..<Int(count) {
            let h = tableOffset + UInt64(i) * UInt64(programHeaderSize)
            guard try f.read(UInt32.self, at: h, "program header \(i)") == typeNote else { continue }
            let offset = try f.read(UInt64.self, at: h + 8, "program header \(i)")
            let size = try f.read(UInt64.self, at: h + 32, "program header \(i)")
            if try notesHaveAirlockPVEntry(f, offset: offset, size: size, segment: i) { return true }
        }
        return false
    }

    /// Walks the notes of a PT_NOTE segment (namesz, descsz, type, name and
    /// descriptor each padded to 4 bytes) looking for Airlock's PV note. A
    /// note running past the segment or the file ends the walk: it is not
    /// an error, since the kernel boots without it (emulated).
    static func notesHaveAirlockPVEntry(_ f: UntrustedFile, offset: UInt64, size: UInt64, segment: Int) throws(LinuxBootError) -> Bool {
        guard (try? f.range(offset, length: size, "note segment \(segment)")) != nil else { return false }
        let end = offset + size  // inside the file: checked just above
        var at = offset
        for _ in 0..<maxNotes {
            guard end - at >= 12 else { return false }
            let nameSize = UInt64(try f.read(UInt32.self, at: at, "note"))
            let descSize = UInt64(try f.read(UInt32.self, at: at + 4, "note"))
            let type = try f.read(UInt32.self, at: at + 8, "note")
            let nameStart = at + 12
            let paddedName = (nameSize + 3) & ~3, paddedDesc = (descSize + 3) & ~3  // 32-bit sizes: no overflow
            guard paddedName <= end - nameStart, paddedDesc <= end - nameStart - paddedName else { return false }
            if type == airlockNotePVEntry, nameSize == UInt64(airlockNoteName.count),
               let name = try? f.slice(nameStart, length: nameSize, "note name"), name.elementsEqual(airlockNoteName) {
                return true
            }
            at = nameStart + paddedName + paddedDesc
        }
        return false
    }
}

/// bzImage: real-mode setup sectors (skipped: we use the 64-bit entry), then the
/// protected-mode code, which goes to 1 MiB and decompresses itself.
enum BzImageLoader {
    static let loadAddress: UInt64 = 0x10_0000
    /// The 64-bit entry is this far into the protected-mode code (boot.rst, "64-bit BOOT PROTOCOL").
    static let entryOffset: UInt64 = 0x200
    /// 2.12 introduced xloadflags, which is how a kernel says it has the 64-bit entry.
    static let minimumProtocol: UInt16 = 0x020C
    /// The 2.12 header runs through handover_offset (0x264..0x268).
    static let minimumHeaderEnd: UInt64 = 0x268
    /// boot_params reserves 0x1F1..<0x290 for the setup header; a longer claim is not copied.
    static let maximumHeaderEnd: UInt64 = 0x290
    static let signature: [UInt8] = Array("HdrS".utf8)

    static let loadedHigh: UInt8 = 0x01
    static let xlfKernel64: UInt16 = 0x01

    static func hasSetupHeaderSignature(_ image: UnsafeRawBufferPointer) -> Bool {
        image.count >= 0x206 && image[0x202..<0x206].elementsEqual(signature)
    }

    static func load(_ f: UntrustedFile, into memory: GuestMemory) throws(LinuxBootError) -> LoadedKernel {
        let path = f.path
        func invalid(_ p: BzImageProblem) -> LinuxBootError { .invalidBzImage(path: path, problem: p) }

        let bootFlag = try f.read(UInt16.self, at: 0x1FE, "boot_flag")
        guard bootFlag == 0xAA55 else { throw invalid(.badBootFlag(bootFlag)) }
        let version = try f.read(UInt16.self, at: 0x206, "the boot protocol version")
        guard version >= minimumProtocol else { throw invalid(.protocolTooOld(version: version)) }
        // The jump at 0x200 is "jmp short" over the header: its offset byte is the header length past 0x202.
        let headerEnd = 0x202 + UInt64(try f.read(UInt8.self, at: 0x201, "the setup header length"))
        guard headerEnd >= minimumHeaderEnd else { throw invalid(.setupHeaderTooShort(end: headerEnd)) }
        let header = Array(try f.slice(0x1F1, length: min(headerEnd, maximumHeaderEnd) - 0x1F1, "the setup header"))
        func field<T: FixedWidthInteger>(_: T.Type, _ offset: Int) -> T {
            LoadedKernel.field(T.self, offset, in: header)!  // every offset read lies below minimumHeaderEnd
        }

        guard field(UInt8.self, BootParams.loadFlags) & loadedHigh != 0 else { throw invalid(.notLoadedHigh) }
        guard field(UInt16.self, BootParams.xloadflags) & xlfKernel64 != 0 else { throw invalid(.no64BitEntry) }

        var setupSectors = UInt64(field(UInt8.self, BootParams.setupSects))
        if setupSectors == 0 { setupSectors = 4 }  // boot.rst: 0 means 4, for very old kernels
        let codeOffset = (setupSectors + 1) * 512  // at most 0x20000
        // syssize counts the protected-mode code in 16-byte paragraphs; a file shorter than that was cut off.
        let declaredSize = UInt64(field(UInt32.self, BootParams.syssize)) * 16
        let codeSize = f.size > codeOffset ? f.size - codeOffset : 0
        // It must at least reach past the 64-bit entry, which is where the vCPU starts.
        _ = try f.range(codeOffset, length: max(declaredSize, entryOffset + 1),
                        "the protected-mode kernel after \(setupSectors) setup sectors")

        // The kernel relocates itself before decompressing: to pref_address if it
        // is not relocatable, else to its load address rounded up to kernel_alignment
        // but never below pref_address. From there it needs init_size bytes.
        // (boot.rst, init_size; the kernel's compressed/head_64.S.)
        let relocatable = field(UInt8.self, BootParams.relocatableKernel) != 0
        let alignment = field(UInt32.self, BootParams.kernelAlignment)
        let preferred = field(UInt64.self, BootParams.prefAddress)
        let initSize = UInt64(field(UInt32.self, BootParams.initSize))
        let runtimeStart: UInt64
        if relocatable {
            guard alignment != 0, alignment & (alignment - 1) == 0 else { throw invalid(.badKernelAlignment(alignment)) }
            let mask = UInt64(alignment) - 1
            let (bumped, overflow) = max(loadAddress, preferred).addingReportingOverflow(mask)
            if overflow { throw .rangeOverflows(path: path, what: "pref_address", offset: preferred, length: mask) }
            runtimeStart = bumped & ~mask
        } else {
            runtimeStart = preferred == 0 ? loadAddress : preferred
        }
        let (runtimeEnd, overflow) = runtimeStart.addingReportingOverflow(initSize)
        if overflow { throw .rangeOverflows(path: path, what: "the decompression area", offset: runtimeStart, length: initSize) }
        let end = max(loadAddress + codeSize, runtimeEnd)  // loadAddress + codeSize < 2^64: codeSize is an array count
        // Below the load address is the VMM's (zero page, command line, page tables).
        guard runtimeStart >= loadAddress else { throw invalid(.runsBelowLoadAddress(runtimeStart)) }
        guard memory.contains(GuestAddress(loadAddress), length: end - loadAddress) else {
            throw .bzImageOutsideMemory(path: path, address: loadAddress, size: end - loadAddress, ramEnd: memory.highestAddress.raw)
        }

        try GuestMemoryWriter.copy(try f.slice(codeOffset, length: codeSize, "the protected-mode kernel"),
                                   to: loadAddress, memory: memory, path: path)
        return LoadedKernel(format: .bzImage, entry: GuestAddress(loadAddress + entryOffset), start: GuestAddress(loadAddress),
                            end: GuestAddress(end), setupHeader: header)
    }
}

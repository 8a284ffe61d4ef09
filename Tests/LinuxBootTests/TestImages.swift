import GuestMemory
import Testing
@testable import LinuxBoot

/// Little-endian encoding and decoding for building and checking images.
func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] {
    (0..<MemoryLayout<T>.size).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) }
}

func readLE<T: FixedWidthInteger>(_: T.Type, _ bytes: [UInt8], _ offset: Int) -> T {
    (0..<MemoryLayout<T>.size).reduce(T(0)) { $0 | T(bytes[offset + $1]) << (8 * $1) }
}

/// The guest RAM most tests use: 64 MiB at 0 (MAP_NORESERVE, so untouched pages cost nothing).
func testMemory(_ size: UInt64 = 64 << 20) throws -> GuestMemory {
    try GuestMemory(layout: [(GuestAddress(0), size)])
}

/// Runs a load that must fail and returns its error (recording an issue if it loaded).
func loadError(_ image: [UInt8], path: String = "/k/vmlinux", memory: GuestMemory? = nil,
               sourceLocation: SourceLocation = #_sourceLocation) throws -> LinuxBootError? {
    let m = try memory ?? testMemory()
    do {
        let k = try KernelLoader.load(image, path: path, into: m)
        Issue.record("a bad image loaded: \(k)", sourceLocation: sourceLocation)
        return nil
    } catch {
        #expect(error.description.contains(path), "error does not name the file: \(error)", sourceLocation: sourceLocation)
        return error
    }
}

/// Builds small ELF64 files in memory, good and broken.
enum ELFImage {
    struct ProgramHeader {
        var type: UInt32 = 1  // PT_LOAD
        var offset: UInt64
        var address: UInt64
        var fileSize: UInt64
        var memorySize: UInt64
    }

    struct Header {
        var elfClass: UInt8 = 2
        var encoding: UInt8 = 1
        var type: UInt16 = 2
        var machine: UInt16 = 62
        var entry: UInt64
        var programHeaderOffset: UInt64 = 64
        var programHeaderSize: UInt16 = 56
        var programHeaderCount: UInt16? = nil  // nil: the number of headers given
    }

    /// The ELF header, the program headers right after it, then `payload`.
    static func build(_ h: Header, _ phdrs: [ProgramHeader], payload: [UInt8] = []) -> [UInt8] {
        var b: [UInt8] = [0x7F, 0x45, 0x4C, 0x46, h.elfClass, h.encoding, 1, 0] + [UInt8](repeating: 0, count: 8)
        b += le(h.type) + le(h.machine) + le(UInt32(1)) + le(h.entry) + le(h.programHeaderOffset) + le(UInt64(0))
        b += le(UInt32(0)) + le(UInt16(64)) + le(h.programHeaderSize) + le(h.programHeaderCount ?? UInt16(phdrs.count))
        b += le(UInt16(64)) + le(UInt16(0)) + le(UInt16(0))
        precondition(b.count == 64)
        for p in phdrs {
            b += le(p.type) + le(UInt32(7)) + le(p.offset) + le(UInt64(0xFFFF_FFFF_8000_0000) &+ p.address)
            b += le(p.address) + le(p.fileSize) + le(p.memorySize) + le(UInt64(0x20_0000))
        }
        return b + payload
    }

    /// A single-segment image whose segment comes from the file's start, for hostile-header cases.
    static func one(_ p: ProgramHeader, entry: UInt64 = 0x100_0000, edit: (inout Header) -> Void = { _ in }) -> [UInt8] {
        var h = Header(entry: entry)
        edit(&h)
        return build(h, [p], payload: [UInt8](repeating: 0x90, count: 0x40))
    }

    // The good image: text (0x100 bytes at 16 MiB), a PT_NOTE, data (0x40 bytes + 0x1000 bss at 17 MiB).
    static let textOffset = 64 + 3 * 56  // 0xE8
    static let textSize = 0x100
    static let dataOffset = textOffset + textSize  // 0x1E8
    static let dataSize = 0x40
    static let bssSize = 0x1000
    static let textAddress: UInt64 = 0x100_0000
    static let dataAddress: UInt64 = 0x110_0000

    static var good: [UInt8] {
        let text = (0..<textSize).map { UInt8(truncatingIfNeeded: $0 &* 3 &+ 1) }
        let data = [UInt8](repeating: 0xAB, count: dataSize)
        return build(Header(entry: textAddress + 0x10), [
            ProgramHeader(offset: UInt64(textOffset), address: textAddress, fileSize: UInt64(textSize), memorySize: UInt64(textSize)),
            ProgramHeader(type: 4, offset: UInt64(textOffset), address: textAddress, fileSize: 0x10, memorySize: 0x10),
            ProgramHeader(offset: UInt64(dataOffset), address: dataAddress, fileSize: UInt64(dataSize),
                          memorySize: UInt64(dataSize + bssSize)),
        ], payload: text + data)
    }
}

/// Builds small bzImages: setup sectors holding a setup header, then protected-mode code.
enum BzImage {
    struct Options {
        var setupSects: UInt8 = 2
        var bootFlag: UInt16 = 0xAA55
        var headerLength: UInt8 = 0x6A  // header ends at 0x202 + 0x6A = 0x26C, as in current kernels
        var version: UInt16 = 0x020F
        var loadFlags: UInt8 = 0x01  // LOADED_HIGH
        var initrdAddrMax: UInt32 = 0x7FFF_FFFF
        var kernelAlignment: UInt32 = 0x20_0000
        var relocatable: UInt8 = 1
        var xloadflags: UInt16 = 0x01  // XLF_KERNEL_64
        var cmdlineSize: UInt32 = 0x7FF
        var prefAddress: UInt64 = 0x100_0000
        var initSize: UInt32 = 0x40_0000
        var payloadSize = 0x2000
        var syssize: UInt32? = nil  // nil: the payload's size in paragraphs
    }

    static func payload(_ count: Int) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 5) } }

    static func build(_ o: Options = Options()) -> [UInt8] {
        var f = [UInt8](repeating: 0, count: (Int(o.setupSects == 0 ? 4 : o.setupSects) + 1) * 512)
        func put(_ bytes: [UInt8], _ at: Int) { f.replaceSubrange(at..<(at + bytes.count), with: bytes) }
        f[0x1F1] = o.setupSects
        put(le(o.syssize ?? UInt32((o.payloadSize + 15) / 16)), 0x1F4)
        put(le(o.bootFlag), 0x1FE)
        f[0x200] = 0xEB
        f[0x201] = o.headerLength
        put(Array("HdrS".utf8), 0x202)
        put(le(o.version), 0x206)
        f[0x211] = o.loadFlags
        put(le(UInt32(0x10_0000)), 0x214)  // code32_start
        put(le(o.initrdAddrMax), 0x22C)
        put(le(o.kernelAlignment), 0x230)
        f[0x234] = o.relocatable
        f[0x235] = 21
        put(le(o.xloadflags), 0x236)
        put(le(o.cmdlineSize), 0x238)
        put(le(o.prefAddress), 0x258)
        put(le(o.initSize), 0x260)
        return f + payload(o.payloadSize)
    }

    static func with(_ edit: (inout Options) -> Void) -> [UInt8] {
        var o = Options()
        edit(&o)
        return build(o)
    }
}

import AirlockOS
import Foundation
import GuestMemory
import Testing
@testable import LinuxBoot

/// The guest kernel's "Airlock" ELF note (type 1) says it can start in a PVM host's native
/// mode; the VMM registers a VIF page before the first instruction only for such a kernel.
/// The notes come from an untrusted file: every size is checked, nothing can trap.
@Suite struct PVNoteTests {
    typealias P = ELFImage.ProgramHeader

    static func note(name: [UInt8], type: UInt32, desc: [UInt8] = le(UInt32(1)), nameSize: UInt32? = nil, descSize: UInt32? = nil) -> [UInt8] {
        func padded(_ b: [UInt8]) -> [UInt8] { b + [UInt8](repeating: 0, count: (4 - b.count % 4) % 4) }
        return le(nameSize ?? UInt32(name.count)) + le(descSize ?? UInt32(desc.count)) + le(type) + padded(name) + padded(desc)
    }
    static let airlock = Array("Airlock".utf8) + [0]
    static let pvNote = note(name: airlock, type: 1)

    /// A loadable image whose PT_NOTE segment holds `notes` (at `noteOffset`, or right after the text).
    static func image(notes: [UInt8], noteOffset: UInt64? = nil, noteSize: UInt64? = nil) -> [UInt8] {
        let text = [UInt8](repeating: 0x90, count: 0x100)
        let textOffset = UInt64(64 + 2 * 56)
        let at = noteOffset ?? textOffset + UInt64(text.count)
        return ELFImage.build(ELFImage.Header(entry: 0x100_0000), [
            P(offset: textOffset, address: 0x100_0000, fileSize: UInt64(text.count), memorySize: UInt64(text.count)),
            P(type: 4, offset: at, address: 0, fileSize: noteSize ?? UInt64(notes.count), memorySize: noteSize ?? UInt64(notes.count)),
        ], payload: text + notes)
    }

    static func startsInPVMode(_ image: [UInt8]) throws -> Bool {
        let k = try KernelLoader.load(image, path: "vmlinux", into: try testMemory())
        // The file-only check agrees with the loader.
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("airlock-note-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        try Data(image).write(to: URL(fileURLWithPath: path))
        #expect(KernelLoader.startsInPVMode(try MappedFile(path: path, role: "kernel")) == k.startsInPVMode)
        return k.startsInPVMode
    }

    @Test func theNoteIsFoundAmongOthers() throws {
        #expect(try Self.startsInPVMode(Self.image(notes: Self.pvNote)))
        let gnu = Self.note(name: Array("GNU".utf8) + [0], type: 3, desc: [UInt8](repeating: 7, count: 20))
        let xen = Self.note(name: Array("Xen".utf8) + [0], type: 1, desc: [1, 2, 3])
        #expect(try Self.startsInPVMode(Self.image(notes: gnu + xen + Self.pvNote)))
    }

    @Test func onlyTheExactNameAndTypeCount() throws {
        #expect(try !Self.startsInPVMode(Self.image(notes: [])))
        #expect(try !Self.startsInPVMode(Self.image(notes: Self.note(name: Self.airlock, type: 2))))
        #expect(try !Self.startsInPVMode(Self.image(notes: Self.note(name: Array("Airlocks".utf8) + [0], type: 1))))
        #expect(try !Self.startsInPVMode(Self.image(notes: Self.note(name: Array("Airlock".utf8), type: 1))))  // no NUL
        #expect(try !Self.startsInPVMode(ELFImage.good))
    }

    @Test func hostileNotesEndTheWalkAndTheKernelStillLoads() throws {
        // Sizes that run past the segment, or would overflow 32-bit arithmetic.
        for bad in [Self.note(name: Self.airlock, type: 1, nameSize: 0xFFFF_FFFF),
                    Self.note(name: Self.airlock, type: 1, descSize: 0xFFFF_FFFF),
                    Self.note(name: Self.airlock, type: 1, nameSize: 0xFFFF_FFFC, descSize: 0xFFFF_FFFC),
                    Array(Self.pvNote.prefix(11))] {
            #expect(try !Self.startsInPVMode(Self.image(notes: bad + Self.pvNote)))
        }
        // A note segment outside the file, or as large as the address space.
        #expect(try !Self.startsInPVMode(Self.image(notes: Self.pvNote, noteOffset: 1 << 40)))
        #expect(try !Self.startsInPVMode(Self.image(notes: Self.pvNote, noteSize: UInt64.max)))
        #expect(try !Self.startsInPVMode(Self.image(notes: Self.pvNote, noteOffset: UInt64.max - 4, noteSize: 16)))
        // More empty notes than the walk looks at: bounded work, and the note behind them is not reached.
        let empty = Self.note(name: [], type: 9, desc: [])
        let many = [UInt8]((0..<300).flatMap { _ in empty })
        #expect(try !Self.startsInPVMode(Self.image(notes: many + Self.pvNote)))
    }

    @Test func aFileThatIsNoVmlinuxSaysNo() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("airlock-note-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        for bytes in [[UInt8](repeating: 0, count: 64), Array("\u{7F}ELF".utf8), [0x7F, 0x45, 0x4C, 0x46] + [UInt8](repeating: 0xFF, count: 60)] {
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            #expect(!KernelLoader.startsInPVMode(try MappedFile(path: path, role: "kernel")))
        }
    }
}

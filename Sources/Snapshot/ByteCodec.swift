/// Little-endian encoding for snapshot records. Every read is bounds-checked
/// and every count and length is held to a limit before anything is
/// allocated for it: a snapshot file is untrusted input, and a record that
/// claims more than it holds, or more than any real machine has, is an
/// error naming the field, never a trap or a huge allocation.
struct ByteWriter {
    private(set) var bytes: [UInt8] = []

    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func bool(_ v: Bool) { bytes.append(v ? 1 : 0) }
    mutating func u16(_ v: UInt16) { for i in 0..<2 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    mutating func u32(_ v: UInt32) { for i in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    mutating func u64(_ v: UInt64) { for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    /// Counters (never negative in a valid state) as u64.
    mutating func count(_ v: Int) { u64(UInt64(max(0, v))) }
    mutating func data(_ v: [UInt8]) {
        u32(UInt32(v.count))
        bytes.append(contentsOf: v)
    }
    mutating func string(_ v: String) { data(Array(v.utf8)) }
    mutating func optionalU8(_ v: UInt8?) {
        bool(v != nil)
        u8(v ?? 0)
    }
    mutating func raw(_ v: [UInt8]) { bytes.append(contentsOf: v) }
}

/// A decode failure: the field and what was wrong with it.
struct DecodeError: Error {
    let detail: String
    init(_ detail: String) { self.detail = detail }
}

struct ByteReader {
    private let bytes: [UInt8]
    private(set) var offset = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var remaining: Int { bytes.count - offset }

    mutating func take(_ n: Int, _ what: String) throws(DecodeError) -> ArraySlice<UInt8> {
        guard n >= 0, n <= remaining else { throw DecodeError("\(what) needs \(n) bytes, \(remaining) are left") }
        defer { offset += n }
        return bytes[offset..<(offset + n)]
    }

    private mutating func uint(_ width: Int, _ what: String) throws(DecodeError) -> UInt64 {
        var v: UInt64 = 0
        for (i, b) in try take(width, what).enumerated() { v |= UInt64(b) << UInt64(8 * i) }
        return v
    }

    mutating func u8(_ what: String) throws(DecodeError) -> UInt8 { UInt8(try uint(1, what)) }
    mutating func u16(_ what: String) throws(DecodeError) -> UInt16 { UInt16(try uint(2, what)) }
    mutating func u32(_ what: String) throws(DecodeError) -> UInt32 { UInt32(try uint(4, what)) }
    mutating func u64(_ what: String) throws(DecodeError) -> UInt64 { try uint(8, what) }

    mutating func bool(_ what: String) throws(DecodeError) -> Bool {
        switch try u8(what) {
        case 0: return false
        case 1: return true
        case let v: throw DecodeError("\(what) is \(v), not a boolean")
        }
    }

    /// A counter, at most `limit`.
    mutating func count(_ what: String, limit: Int = Int(Int32.max)) throws(DecodeError) -> Int {
        let v = try u64(what)
        guard v <= UInt64(limit) else { throw DecodeError("\(what) is \(v), more than \(limit)") }
        return Int(v)
    }

    /// A u32 element count, at most `limit`, before any element is read.
    mutating func elements(_ what: String, limit: Int) throws(DecodeError) -> Int {
        let n = try u32("number of \(what)")
        guard n <= limit else { throw DecodeError("\(n) \(what), more than the \(limit) allowed") }
        return Int(n)
    }

    mutating func data(_ what: String, limit: Int) throws(DecodeError) -> [UInt8] {
        let n = try u32("length of \(what)")
        guard n <= limit else { throw DecodeError("\(what) is \(n) bytes, more than the \(limit) allowed") }
        return Array(try take(Int(n), what))
    }

    mutating func string(_ what: String, limit: Int) throws(DecodeError) -> String {
        let raw = try data(what, limit: limit)
        guard let s = String(validating: raw, as: UTF8.self) else { throw DecodeError("\(what) is not UTF-8") }
        return s
    }

    mutating func optionalU8(_ what: String) throws(DecodeError) -> UInt8? {
        let present = try bool("presence of \(what)")
        let v = try u8(what)
        return present ? v : nil
    }

    /// A record must be consumed exactly: bytes left over mean writer and reader disagree.
    func finish(_ what: String) throws(DecodeError) {
        guard remaining == 0 else { throw DecodeError("\(remaining) bytes follow the end of \(what)") }
    }
}

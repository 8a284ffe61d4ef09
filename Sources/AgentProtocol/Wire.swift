/// Little-endian encoding for the agent protocol's message bodies.
///
/// Both sides are little-endian x86-64 today, but the byte order is fixed here
/// rather than inherited from the CPU so that the format is a format. Every
/// read is bounds-checked: a body comes from the other side of a trust
/// boundary (the guest, for the host), so a short or lying body is an error,
/// never a trap.
public struct WireWriter {
    public private(set) var bytes: [UInt8] = []
    public init() {}

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func bool(_ v: Bool) { bytes.append(v ? 1 : 0) }
    public mutating func u16(_ v: UInt16) { for i in 0..<2 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    public mutating func u32(_ v: UInt32) { for i in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    public mutating func u64(_ v: UInt64) { for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    public mutating func i32(_ v: Int32) { u32(UInt32(bitPattern: v)) }
    public mutating func data(_ v: [UInt8]) {
        u32(UInt32(v.count))
        bytes.append(contentsOf: v)
    }
    public mutating func string(_ v: String) { data(Array(v.utf8)) }
    public mutating func strings(_ v: [String]) {
        u32(UInt32(v.count))
        for s in v { string(s) }
    }
}

public struct WireReader {
    private let bytes: [UInt8]
    private var offset = 0
    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public var remaining: Int { bytes.count - offset }

    private mutating func take(_ n: Int, _ what: String) throws(ProtocolError) -> ArraySlice<UInt8> {
        guard n >= 0, n <= remaining else {
            throw .malformed("\(what) needs \(n) bytes, \(remaining) left in the message")
        }
        defer { offset += n }
        return bytes[offset..<(offset + n)]
    }

    private mutating func uint(_ width: Int, _ what: String) throws(ProtocolError) -> UInt64 {
        var v: UInt64 = 0
        for (i, b) in try take(width, what).enumerated() { v |= UInt64(b) << UInt64(8 * i) }
        return v
    }

    public mutating func u8(_ what: String) throws(ProtocolError) -> UInt8 { UInt8(try uint(1, what)) }
    public mutating func u16(_ what: String) throws(ProtocolError) -> UInt16 { UInt16(try uint(2, what)) }
    public mutating func u32(_ what: String) throws(ProtocolError) -> UInt32 { UInt32(try uint(4, what)) }
    public mutating func u64(_ what: String) throws(ProtocolError) -> UInt64 { try uint(8, what) }
    public mutating func i32(_ what: String) throws(ProtocolError) -> Int32 { Int32(bitPattern: try u32(what)) }

    public mutating func bool(_ what: String) throws(ProtocolError) -> Bool {
        switch try u8(what) {
        case 0: return false
        case 1: return true
        case let v: throw .malformed("\(what) is \(v), not a boolean (0 or 1)")
        }
    }

    public mutating func data(_ what: String, limit: Int) throws(ProtocolError) -> [UInt8] {
        let n = try u32("length of \(what)")
        guard n <= limit else { throw .malformed("\(what) is \(n) bytes, more than the limit of \(limit)") }
        return Array(try take(Int(n), what))
    }

    public mutating func string(_ what: String, limit: Int) throws(ProtocolError) -> String {
        let raw = try data(what, limit: limit)
        guard let s = String(validating: raw, as: UTF8.self) else { throw .malformed("\(what) is not valid UTF-8") }
        guard !s.utf8.contains(0) else { throw .malformed("\(what) contains a NUL byte") }
        return s
    }

    public mutating func strings(_ what: String, count limit: Int, each: Int) throws(ProtocolError) -> [String] {
        let n = try u32("count of \(what)")
        guard n <= limit else { throw .malformed("\(what) has \(n) entries, more than the limit of \(limit)") }
        var out: [String] = []
        for i in 0..<Int(n) { out.append(try string("\(what)[\(i)]", limit: each)) }
        return out
    }

    /// A body must be consumed exactly: trailing bytes mean the two sides disagree on the format.
    public func finish(_ what: String) throws(ProtocolError) {
        guard remaining == 0 else { throw .malformed("\(remaining) unexpected bytes after \(what)") }
    }
}

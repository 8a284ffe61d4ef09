// Little-endian field access for on-disk structures.
//
// Callers check that `offset + width` is inside the buffer before reading a
// field at an offset that came from the image; fixed offsets into buffers this
// module sized itself need no check.

extension Array where Element == UInt8 {
    @inline(__always) func le8(_ offset: Int) -> UInt8 { self[offset] }

    @inline(__always) func le16(_ offset: Int) -> UInt16 {
        UInt16(self[offset]) | UInt16(self[offset + 1]) << 8
    }

    @inline(__always) func le32(_ offset: Int) -> UInt32 {
        UInt32(self[offset]) | UInt32(self[offset + 1]) << 8 | UInt32(self[offset + 2]) << 16 | UInt32(self[offset + 3]) << 24
    }
}

/// Whether `offset + width` bytes fit in a buffer of `count` bytes, without overflow.
@inline(__always) func fits(_ offset: Int, _ width: Int, in count: Int) -> Bool {
    offset >= 0 && width >= 0 && offset <= count && width <= count - offset
}

extension UInt64 {
    var isPowerOfTwo: Bool { self != 0 && self & (self - 1) == 0 }
}

func hex<T: BinaryInteger>(_ v: T) -> String { "0x" + String(v, radix: 16) }

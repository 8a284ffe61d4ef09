/// A device on the port-I/O or MMIO bus. Offsets are relative to the start of
/// the range the device was registered at; sizes are 1, 2, 4 or 8 bytes and the
/// bus has already checked the access lies inside the device's range.
///
/// Devices are called from vCPU threads (and may be called from several), so
/// they keep their mutable state behind a lock.
public protocol BusDevice: AnyObject, Sendable {
    /// The value read; the bus keeps only the low `size` bytes.
    func read(offset: UInt64, size: Int) -> UInt64
    /// A write of the low `size` bytes of `value`.
    func write(offset: UInt64, size: Int, value: UInt64)
}

public enum BusError: Error, Equatable, CustomStringConvertible, Sendable {
    case emptyRange(name: String, base: UInt64)
    case rangeOverflows(name: String, base: UInt64, length: UInt64)
    case overlap(name: String, base: UInt64, length: UInt64, existing: String)

    public var description: String {
        switch self {
        case let .emptyRange(name, base): return "device \(name) at 0x\(String(base, radix: 16)) has an empty range"
        case let .rangeOverflows(name, base, length):
            return "device \(name) at 0x\(String(base, radix: 16)) with length 0x\(String(length, radix: 16)) passes the end of the address space"
        case let .overlap(name, base, length, existing):
            return "device \(name) at 0x\(String(base, radix: 16))+0x\(String(length, radix: 16)) overlaps \(existing)"
        }
    }
}

/// An address space (ports or MMIO) that maps non-overlapping ranges to devices.
///
/// Built once while the machine is assembled, then read-only: lookups need no
/// lock. Reads from an address with no device return all-ones (what an ISA bus
/// or an unclaimed MMIO window returns on real hardware, so guest probes fail
/// fast); writes there are ignored.
public struct Bus: Sendable {
    public struct Entry: Sendable {
        public let name: String
        public let base: UInt64
        public let length: UInt64
        public let device: any BusDevice
        var last: UInt64 { base + (length - 1) }  // checked in insert
    }

    public let name: String
    /// Sorted by base; ranges never overlap.
    public private(set) var entries: [Entry] = []

    public init(name: String) { self.name = name }

    public mutating func insert(_ device: any BusDevice, name: String, base: UInt64, length: UInt64) throws(BusError) {
        guard length > 0 else { throw .emptyRange(name: name, base: base) }
        guard base.addingReportingOverflow(length - 1).overflow == false else {
            throw .rangeOverflows(name: name, base: base, length: length)
        }
        let entry = Entry(name: name, base: base, length: length, device: device)
        let index = entries.firstIndex { $0.base > base } ?? entries.endIndex
        if index > entries.startIndex, entries[index - 1].last >= base {
            let e = entries[index - 1]
            throw .overlap(name: name, base: base, length: length, existing: "\(e.name) at 0x\(String(e.base, radix: 16))+0x\(String(e.length, radix: 16))")
        }
        if index < entries.endIndex, entries[index].base <= entry.last {
            let e = entries[index]
            throw .overlap(name: name, base: base, length: length, existing: "\(e.name) at 0x\(String(e.base, radix: 16))+0x\(String(e.length, radix: 16))")
        }
        entries.insert(entry, at: index)
    }

    /// The device whose range holds the whole access, and the offset into it.
    @inline(__always)
    public func resolve(_ address: UInt64, size: Int) -> (device: any BusDevice, offset: UInt64)? {
        // Binary search for the last entry with base <= address.
        var low = 0
        var high = entries.count
        while low < high {
            let mid = (low + high) / 2
            if entries[mid].base <= address { low = mid + 1 } else { high = mid }
        }
        guard low > 0 else { return nil }
        let e = entries[low - 1]
        let offset = address - e.base
        // An access that starts inside and runs past the end belongs to no device.
        // The size check comes first: it keeps the subtraction from underflowing.
        guard size > 0, UInt64(size) <= e.length, offset <= e.length - UInt64(size) else { return nil }
        return (e.device, offset)
    }

    /// Reads `size` bytes at `address`: the device's value, or all-ones if none claims it.
    @inline(__always)
    public func read(_ address: UInt64, size: Int) -> UInt64 {
        let mask: UInt64 = size >= 8 ? ~0 : (UInt64(1) << UInt64(size * 8)) - 1
        guard let (device, offset) = resolve(address, size: size) else { return mask }
        return device.read(offset: offset, size: size) & mask
    }

    /// Writes `size` bytes at `address`; returns false when no device claims it.
    @discardableResult @inline(__always)
    public func write(_ address: UInt64, size: Int, value: UInt64) -> Bool {
        guard let (device, offset) = resolve(address, size: size) else { return false }
        let mask: UInt64 = size >= 8 ? ~0 : (UInt64(1) << UInt64(size * 8)) - 1
        device.write(offset: offset, size: size, value: value & mask)
        return true
    }
}

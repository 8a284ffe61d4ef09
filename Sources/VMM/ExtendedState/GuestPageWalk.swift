import GuestMemory

/// Translates a guest linear address to a guest-physical one through the guest's own
/// 4-level page tables, with the permission checks and accessed/dirty updates the CPU
/// would make. Used when the VMM completes an instruction that touches guest memory.
///
/// The page tables are guest data: every entry is read through `GuestMemory` (bounds
/// checked), and a table outside guest RAM ends the walk as a reserved-bit page fault
/// rather than a host access.
public struct GuestPageWalk: Sendable {
    public enum Access: Sendable { case read, write }

    /// Why a translation failed: the exception the CPU would raise.
    public enum Fault: Error, Equatable, Sendable {
        /// #PF with its error code, for `address` (the CR2 value).
        case pageFault(address: UInt64, errorCode: UInt32)
        /// #GP(0): a non-canonical address.
        case generalProtection
        /// A paging mode Airlock does not walk (5-level paging, or paging off).
        case unsupportedMode(String)
    }

    public let cr0: UInt64, cr3: UInt64, cr4: UInt64, efer: UInt64
    /// The current privilege level (3 = user).
    public let cpl: UInt8
    /// RFLAGS.AC, which lets supervisor code touch user pages under SMAP.
    public let alignmentCheck: Bool

    public init(cr0: UInt64, cr3: UInt64, cr4: UInt64, efer: UInt64, cpl: UInt8, alignmentCheck: Bool = false) {
        self.cr0 = cr0; self.cr3 = cr3; self.cr4 = cr4; self.efer = efer; self.cpl = cpl
        self.alignmentCheck = alignmentCheck
    }

    static let present: UInt64 = 1 << 0, writable: UInt64 = 1 << 1, user: UInt64 = 1 << 2
    static let accessed: UInt64 = 1 << 5, dirty: UInt64 = 1 << 6, largePage: UInt64 = 1 << 7
    /// Physical-address bits 51:12 of an entry.
    static let addressMask: UInt64 = 0x000F_FFFF_FFFF_F000

    // Page-fault error code bits.
    static let pfPresent: UInt32 = 1 << 0, pfWrite: UInt32 = 1 << 1, pfUser: UInt32 = 1 << 2, pfReserved: UInt32 = 1 << 3

    /// The guest-physical address of `linear`, or the fault the access raises.
    public func translate(_ linear: UInt64, access: Access, memory: GuestMemory) -> Result<UInt64, Fault> {
        guard cr0 & (1 << 31) != 0, cr4 & (1 << 5) != 0, efer & (1 << 10) != 0 else {
            return .failure(.unsupportedMode("paging is not in 4-level long mode (CR0 \(hex(cr0)), CR4 \(hex(cr4)), EFER \(hex(efer)))"))
        }
        guard cr4 & (1 << 12) == 0 else { return .failure(.unsupportedMode("5-level paging (CR4.LA57)")) }
        // Bits 63:47 must all equal bit 47.
        let top = linear >> 47
        guard top == 0 || top == (1 << 17) - 1 else { return .failure(.generalProtection) }

        let isWrite = access == .write, isUser = cpl == 3
        var code: UInt32 = (isWrite ? Self.pfWrite : 0) | (isUser ? Self.pfUser : 0)
        var table = cr3 & Self.addressMask
        var allowWrite = true, allowUser = true
        // Entries touched on the way, to set their accessed (and the leaf's dirty) bit afterwards.
        var touched: [(address: GuestAddress, entry: UInt64, leaf: Bool)] = []
        var level = 4
        while true {
            let shift = UInt64(12 + 9 * (level - 1))
            let slot = (linear >> shift) & 0x1FF
            let at = GuestAddress(table &+ slot * 8)
            guard let entry = try? memory.read(UInt64.self, at: at) else {
                // A table outside RAM: what the CPU reads there is not a valid entry.
                code |= Self.pfReserved | Self.pfPresent
                return .failure(.pageFault(address: linear, errorCode: code))
            }
            guard entry & Self.present != 0 else { return .failure(.pageFault(address: linear, errorCode: code)) }
            allowWrite = allowWrite && entry & Self.writable != 0
            allowUser = allowUser && entry & Self.user != 0
            let leaf = level == 1 || ((level == 2 || level == 3) && entry & Self.largePage != 0)
            touched.append((at, entry, leaf))
            if leaf {
                let pageMask: UInt64 = (1 << shift) - 1
                let physical = (entry & Self.addressMask & ~pageMask) | (linear & pageMask)
                code |= Self.pfPresent
                if isUser && !allowUser { return .failure(.pageFault(address: linear, errorCode: code)) }
                let writeProtect = cr0 & (1 << 16) != 0
                if isWrite && !allowWrite && (isUser || writeProtect) {
                    return .failure(.pageFault(address: linear, errorCode: code))
                }
                let smap = cr4 & (1 << 21) != 0
                if !isUser && allowUser && smap && !alignmentCheck {
                    return .failure(.pageFault(address: linear, errorCode: code))
                }
                // As the CPU does: accessed on every entry used, dirty on the leaf of a write.
                for t in touched {
                    var updated = t.entry | Self.accessed
                    if t.leaf && isWrite { updated |= Self.dirty }
                    if updated != t.entry { try? memory.write(updated, at: t.address) }
                }
                return .success(physical)
            }
            table = entry & Self.addressMask
            level -= 1
        }
    }

    private func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
}

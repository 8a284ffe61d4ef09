import GuestMemory

/// Chooses where the initrd goes.
///
/// As high as possible, the way boot loaders traditionally do it: the kernel
/// grows its own allocations upward from its end, and the initrd is freed after
/// unpacking, so the top of low RAM is where it is least in the way.
public enum InitrdPlacer {
    static let pageSize: UInt64 = 4096
    /// Kept below 4 GiB: the ramdisk fields above 4 GiB need XLF_CAN_BE_LOADED_ABOVE_4G,
    /// and a vmlinux has no header to say so.
    static let fourGiBLimit: UInt64 = 0xFFFF_FFFF

    /// Highest page-aligned address where `size` bytes fit: above the kernel's
    /// end, below min(top of the RAM region, the kernel's initrd_addr_max, 4 GiB,
    /// `maxAddress`), entirely inside one RAM region. `maxAddress`, like
    /// initrd_addr_max, is the highest address the initrd may occupy.
    public static func place(size: UInt64, kernel: LoadedKernel, memory: GuestMemory, path: String,
                             maxAddress: UInt64? = nil) throws(LinuxBootError) -> GuestAddress {
        let limit = min(kernel.initrdAddressMax, maxAddress ?? .max, fourGiBLimit)
        let limitEnd = limit + 1  // one past the last usable byte; no overflow: limit < 4 GiB
        // The kernel's end rounded up to a page; an end past 2^64 - 4096 leaves no room anywhere.
        let (roundedEnd, overflow) = kernel.end.raw.addingReportingOverflow(pageSize - 1)
        let floor = overflow ? UInt64.max : roundedEnd & ~(pageSize - 1)

        var best: UInt64?
        var room: UInt64 = 0
        for region in memory.regions {
            let low = max(region.start.raw, floor)
            let high = min(region.start.raw + region.size, limitEnd)  // region end cannot overflow: GuestMemory checked it
            guard high > low else { continue }
            room = max(room, high - low)
            guard size <= high - low else { continue }
            // low is page-aligned (region starts are too), so rounding down stays at or above it.
            let at = (high - size) & ~(pageSize - 1)
            best = max(best ?? 0, at)
        }
        guard let best else { throw .initrdDoesNotFit(path: path, size: size, room: room, limit: limit) }
        return GuestAddress(best)
    }
}

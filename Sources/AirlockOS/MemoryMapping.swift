#if canImport(Glibc)
import Glibc
#endif

/// Owns one mmap(2) region and unmaps it when the owner goes away.
///
/// The base pointer is exposed only to the types that wrap a mapping with a
/// safe interface (guest memory, the vCPU run page); they keep the owner alive
/// for as long as they use the pointer.
public final class MemoryMapping: @unchecked Sendable {
    // @unchecked: the mapping's address and length never change after init; what
    // is stored *in* the mapping is synchronised by the types that wrap it.
    public let base: UnsafeMutableRawPointer
    public let length: Int

    /// Anonymous, shared memory (shared so KVM and a future snapshot see the same pages).
    /// MAP_NORESERVE: guest RAM is committed only as the guest touches it.
    public static func anonymous(length: Int) throws(SystemError) -> MemoryMapping {
        precondition(length > 0)
        guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              p != MAP_FAILED
        else { throw SystemError("mmap", subject: "\(length) bytes of guest memory", errno: errno) }
        return MemoryMapping(base: p, length: length)
    }

    /// A shared read-write mapping of a file descriptor (the vCPU's kvm_run page).
    public static func shared(fd: Int32, length: Int, what: String) throws(SystemError) -> MemoryMapping {
        guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED
        else { throw SystemError("mmap", subject: what, errno: errno) }
        return MemoryMapping(base: p, length: length)
    }

    /// A private, read-only mapping of the first `length` bytes of a file, read
    /// in place instead of copied. The caller keeps the file as it was while it
    /// reads: pages past a truncation would fault (SIGBUS), which is why images
    /// are replaced by rename, never rewritten in place.
    public static func readOnlyFile(fd: Int32, length: Int, what: String) throws(SystemError) -> MemoryMapping {
        precondition(length > 0)
        guard let p = mmap(nil, length, PROT_READ, MAP_PRIVATE, fd, 0), p != MAP_FAILED
        else { throw SystemError("mmap", subject: what, errno: errno) }
        return MemoryMapping(base: p, length: length)
    }

    public static let pageSize: Int = Int(sysconf(Int32(_SC_PAGESIZE)))

    /// Replaces pages [offset, offset + length) of this mapping with a
    /// copy-on-write view of `fd` from `fileOffset`: reads see the file's page
    /// cache (shared with every other mapping of it), the first write to a page
    /// gives this mapping a private copy, and the file itself never changes.
    /// All three numbers must be page-aligned and the range inside the mapping;
    /// the replaced pages' old contents are gone. munmap in deinit covers the
    /// new pages too, so this object stays the one owner of the range.
    public func overlayPrivateFile(fd: Int32, fileOffset: Int, at offset: Int, length: Int, what: String) throws(SystemError) {
        let page = Self.pageSize
        precondition(offset >= 0 && length > 0 && fileOffset >= 0, "negative or empty overlay")
        precondition(offset % page == 0 && length % page == 0 && fileOffset % page == 0, "overlay not page-aligned")
        precondition(length <= self.length - offset, "overlay outside the mapping")
        // MAP_FIXED replaces exactly the pages named, which the preconditions
        // above proved lie inside this mapping: nothing outside it is touched.
        guard let p = mmap(base + offset, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, off_t(fileOffset)),
              p != MAP_FAILED
        else { throw SystemError("mmap", subject: what, errno: errno) }
    }

    /// Puts fresh shared anonymous pages (zeros) at [offset, offset + length):
    /// the way back after a failed overlay. False if even that fails.
    public func restoreAnonymousPages(at offset: Int, length: Int) -> Bool {
        let page = Self.pageSize
        precondition(offset >= 0 && length > 0 && offset % page == 0 && length % page == 0, "restore not page-aligned")
        precondition(length <= self.length - offset, "restore outside the mapping")
        // MAP_FIXED inside this mapping only: checked above.
        let p = mmap(base + offset, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0)
        return p != MAP_FAILED
    }

    /// Makes pages [offset, offset + length) read as zeros again without
    /// touching them (MADV_REMOVE frees shared anonymous pages). False where the
    /// kernel declines (the range is not shared anonymous memory, such as a file
    /// overlay): then the caller writes the zeros itself.
    public func discardPages(at offset: Int, length: Int) -> Bool {
        let page = Self.pageSize
        precondition(offset >= 0 && length >= 0 && offset % page == 0 && length % page == 0, "discard not page-aligned")
        precondition(length <= self.length - offset, "discard outside the mapping")
        guard length > 0 else { return true }
        return madvise(base + offset, length, MADV_REMOVE) == 0
    }

    /// One byte per page of the mapping, bit 0 set where the page is resident
    /// (mincore(2)): for guest RAM, the pages the guest has touched, or that a
    /// file mapped into it has in the page cache. Nil if the kernel refuses.
    public func residentPages() -> [UInt8]? {
        let pages = (length + Self.pageSize - 1) / Self.pageSize
        var vector = [UInt8](repeating: 0, count: pages)
        let rc = vector.withUnsafeMutableBufferPointer { mincore(base, length, $0.baseAddress) }
        return rc == 0 ? vector : nil
    }

    private init(base: UnsafeMutableRawPointer, length: Int) {
        self.base = base
        self.length = length
    }

    deinit { munmap(base, length) }
}

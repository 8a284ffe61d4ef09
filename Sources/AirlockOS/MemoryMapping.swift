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

    private init(base: UnsafeMutableRawPointer, length: Int) {
        self.base = base
        self.length = length
    }

    deinit { munmap(base, length) }
}

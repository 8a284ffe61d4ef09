import CCap
import CJailShim
#if canImport(Glibc)
import Glibc
#endif

/// Capability clearing with libcap.
enum Capabilities {
    /// Empties the bounding set (so nothing can regain a capability by exec,
    /// were exec still possible) and the ambient set, and locks the secure
    /// bits. Needs CAP_SETPCAP, so it runs before the uid changes.
    static func dropBoundingAndAmbient() throws(JailError) {
        // cap_max_bits() is what the running kernel knows, which can be more
        // than the headers this was built with; dropping an unknown bit is EINVAL.
        let maximum = cap_max_bits()
        for cap in 0..<maximum where cap_get_bound(cap) > 0 {
            if cap_drop_bound(cap) != 0 {
                throw .capabilities("cannot drop capability \(cap) from the bounding set: \(String(cString: strerror(errno))) (the jail needs CAP_SETPCAP: run the supervisor as root)")
            }
        }
        if cap_reset_ambient() != 0 {
            throw .capabilities("cannot clear the ambient set: \(String(cString: strerror(errno)))")
        }
        if airlock_jail_lock_securebits() != 0 {
            throw .capabilities("cannot lock the secure bits (NOROOT, no ambient raise): \(String(cString: strerror(errno)))")
        }
    }

    /// Clears the effective, permitted and inheritable sets. After a uid
    /// change from 0 they are already empty; this makes it true whatever the
    /// uids were (in a user namespace root stays root).
    static func clearProcessSets() throws(JailError) {
        guard let empty = cap_init() else {
            throw .capabilities("cap_init failed: \(String(cString: strerror(errno)))")
        }
        defer { cap_free(UnsafeMutableRawPointer(empty)) }
        if cap_set_proc(empty) != 0 {
            throw .capabilities("cannot clear the capability sets: \(String(cString: strerror(errno)))")
        }
    }
}

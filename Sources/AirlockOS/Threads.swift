#if canImport(Glibc)
import Glibc
#endif

/// Starts a detached OS thread for work that blocks (a pipe write, a KVM_RUN
/// loop): Swift concurrency's cooperative pool must never be blocked, and
/// Foundation's Thread is not linked into the VMM's targets.
public func startDetachedThread(_ body: @escaping @Sendable () -> Void) throws(SystemError) {
    final class Box: @unchecked Sendable {
        // @unchecked: written once here, read once by the new thread.
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    let box = Unmanaged.passRetained(Box(body))
    var attributes = pthread_attr_t()
    pthread_attr_init(&attributes)
    defer { pthread_attr_destroy(&attributes) }
    pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
    var thread = pthread_t()
    let rc = pthread_create(&thread, &attributes, { raw in
        Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue().body()
        return nil
    }, box.toOpaque())
    guard rc == 0 else {
        box.release()
        throw SystemError("pthread_create", errno: rc)
    }
}

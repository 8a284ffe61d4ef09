import Foundation

/// Runs blocking work (waiting for a process or a VM) on a new thread and awaits it, so
/// that it never holds one of the cooperative pool's threads, of which there is one per
/// core: two on the CI machine, where one test blocked on a boot stalls every async test.
func offThread<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        Thread { do { continuation.resume(returning: try work()) } catch { continuation.resume(throwing: error) } }.start()
    }
}

import Foundation
import Testing

/// VM tests run wherever /dev/kvm is, and fail (never skip) where it is not,
/// unless the run asked to leave them out with AIRLOCK_SKIP_VM_TESTS=1.
enum VMTests {
    static var skipped: Bool { ProcessInfo.processInfo.environment["AIRLOCK_SKIP_VM_TESTS"] == "1" }
    static var enabled: Bool { !skipped }
}

#if DEBUG
#if canImport(Glibc)
import Glibc
#endif

/// A forbidden system call made on purpose, for the tests that prove the filters hold in the
/// real VMM (`airlock run --test-violation ROLE:CALL`). Compiled into debug (test) builds
/// only: a release airlock-vmm has no such switch.
struct TestViolation {
    let role: String
    let call: String

    init?(_ text: String) {
        let parts = text.split(separator: ":").map(String.init)
        guard parts.count == 2, ["main", "vcpu"].contains(parts[0]),
              ["execve", "socket", "open", "ioctl"].contains(parts[1]) else { return nil }
        role = parts[0]
        call = parts[1]
    }

    /// Makes the call; the filter's SIGSYS handler ends the process before it returns.
    func commit() {
        switch call {
        case "execve":
            let argv: [UnsafeMutablePointer<CChar>?] = [strdup("/bin/true"), nil]
            _ = argv.withUnsafeBufferPointer { execv("/bin/true", $0.baseAddress!) }
        case "socket":
            _ = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        case "open":
            _ = open("/etc/passwd", O_RDONLY)
        default:
            // An allowed call (ioctl) with a request the filter does not list: KVM_CREATE_VM on stdout.
            _ = ioctl(1, 0xAE01, 0)
        }
    }
}
#endif

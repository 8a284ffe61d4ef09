import Foundation

/// Reading /proc/PID/status, for the tests that find a supervisor's jailed VMM among its
/// descendants and check what its threads hold.
public enum ProcStatus {
    /// A field of a status file ("PPid", "NSpid", "Seccomp"), its value trimmed.
    public static func field(_ name: String, in status: String) -> String? {
        status.split(separator: "\n").first { $0.hasPrefix(name + ":") }
            .map { $0.dropFirst(name.count + 1).trimmingCharacters(in: .whitespaces) }
    }

    /// Whether `pid` descends from `ancestor` (within eight generations: the jail's stages).
    public static func descends(_ pid: Int32, from ancestor: Int32) -> Bool {
        var current = pid
        for _ in 0..<8 {
            guard let status = try? String(contentsOfFile: "/proc/\(current)/status", encoding: .utf8),
                  let ppid = field("PPid", in: status).flatMap({ Int32($0) }) else { return false }
            if ppid == ancestor { return true }
            current = ppid
        }
        return false
    }
}

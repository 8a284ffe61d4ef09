import AirlockOS
#if canImport(Glibc)
import Glibc
#endif

/// Small file helpers for /proc, cgroupfs and the jail directories, whose
/// files report a size of 0 or 4096 whatever they hold: read until EOF.
enum FileIO {
    static func read(_ path: String, hint: String = "") throws(JailError) -> String {
        let fd = try jailCall("open", path, hint: hint) { open(path, O_RDONLY | O_CLOEXEC) }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = try jailCall("read", path) { chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) } }
            if n == 0 { break }
            bytes += chunk[0..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Writes `text` with one write(2): cgroupfs and /proc take a value per write.
    static func write(_ path: String, _ text: String, hint: String = "") throws(JailError) {
        let fd = try jailCall("open", path, hint: hint) { open(path, O_WRONLY | O_CLOEXEC) }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        let n = try jailCall("write '\(text)' to", path, hint: hint) { bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } }
        if n != bytes.count {
            throw .system(SystemError("write '\(text)' to", subject: path, errno: EIO), hint: "short write (\(n) of \(bytes.count) bytes)")
        }
    }

    static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    static func isDirectory(_ path: String) -> Bool {
        var info = stat()
        return lstat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR
    }

    /// Creates `path` (mode `mode`) and any missing parents; existing ones are fine.
    static func makeDirectories(_ path: String, mode: mode_t, hint: String = "") throws(JailError) {
        var prefix = ""
        for part in path.split(separator: "/") {
            prefix += "/" + part
            if mkdir(prefix, mode) != 0 && errno != EEXIST {
                throw .system(SystemError("mkdir", subject: prefix, errno: errno), hint: hint)
            }
        }
    }

    /// Names in a directory, without "." and "..".
    static func list(_ path: String) throws(JailError) -> [String] {
        guard let dir = opendir(path) else {
            throw .system(SystemError("opendir", subject: path, errno: errno), hint: "")
        }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    /// File size, or nil when it cannot be stat'ed.
    static func size(_ path: String) -> UInt64? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        return UInt64(info.st_size)
    }
}

/// A short sleep for clean-up retries (a killed process takes a moment to leave its cgroup).
func sleepMilliseconds(_ ms: Int) {
    var request = timespec(tv_sec: ms / 1000, tv_nsec: (ms % 1000) * 1_000_000)
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
}

#if canImport(Glibc)
import Glibc
#endif

/// Runs a host program to its end with stdin from /dev/null and its stdout
/// and stderr captured together (bounded), for the e2fsprogs tools the
/// workspace image is made with.
enum HostProgram {
    struct Outcome {
        var status: Int32
        var output: String
    }

    /// The first of `candidates` that is an executable file, else a search of PATH.
    static func find(_ name: String, candidates: [String]) -> String? {
        let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/sbin:/usr/bin:/sbin:/bin"
        for c in candidates + path.split(separator: ":").map({ "\($0)/\(name)" }) where access(c, X_OK) == 0 {
            return c
        }
        return nil
    }

    /// The exit status (128+N for a signal) and the last 16 KiB of what it printed.
    static func run(_ executable: String, _ arguments: [String]) throws(WorkspaceError) -> Outcome {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw .system("pipe", errno: errno) }
        defer { if fds[0] >= 0 { close(fds[0]) } }
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
        posix_spawn_file_actions_adddup2(&actions, fds[1], 2)
        posix_spawn_file_actions_addclose(&actions, fds[1])
        var pid: pid_t = 0
        let argv = [executable] + arguments
        var pointers: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { for p in pointers { free(p) } }
        let rc = posix_spawn(&pid, executable, &actions, nil, &pointers, environ)
        close(fds[1])
        guard rc == 0 else { throw .system("posix_spawn \(executable)", errno: rc) }
        var output: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { break }
            output.append(contentsOf: chunk[0..<n])
            if output.count > 32 << 10 { output.removeFirst(output.count - (16 << 10)) }
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            guard errno == EINTR else { throw .system("waitpid \(executable)", errno: errno) }
        }
        // WIFEXITED / WEXITSTATUS / WTERMSIG, which Swift cannot import as macros.
        let code = status & 0x7F == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
        return Outcome(status: code, output: String(decoding: output.suffix(16 << 10), as: UTF8.self))
    }
}

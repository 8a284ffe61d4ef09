import AgentProtocol

/// Errors the agent reports to the host (and, when there is no host, on the console).
public enum AgentError: Error, Equatable, CustomStringConvertible {
    /// The run could not be set up: user, group, working directory.
    case setup(String)
    case commandNotFound(String)
    case notExecutable(String)
    /// The agent itself cannot go on (no control port, a broken channel).
    case fatal(String)

    public var description: String {
        switch self {
        case let .setup(s), let .commandNotFound(s), let .notExecutable(s), let .fatal(s): return s
        }
    }

    var failure: RunFailure {
        switch self {
        case .commandNotFound: return .commandNotFound
        case .notExecutable: return .notExecutable
        case .setup, .fatal: return .setup
        }
    }
}

/// What a path is, as far as running it goes.
public enum PathKind: Equatable, Sendable {
    case missing
    case executableFile
    /// A directory, a file without execute permission, or something else exec would refuse.
    case notExecutable
}

public enum CommandLookup {
    public static let defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    /// The command's environment: the host's entries in order, then PATH and
    /// HOME where the host gave none. Later duplicates of a name win, as with
    /// `env A=1 A=2`, and only the winner is kept.
    public static func environment(_ entries: [String], home: String) -> [String] {
        var order: [String] = []
        var values: [String: String] = [:]
        for e in entries {
            let name = e.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)[0]
            let key = String(name)
            if values[key] == nil { order.append(key) }
            values[key] = e
        }
        if values["PATH"] == nil { order.append("PATH"); values["PATH"] = "PATH=" + defaultPath }
        if values["HOME"] == nil { order.append("HOME"); values["HOME"] = "HOME=" + home }
        return order.map { values[$0]! }
    }

    /// PATH's value in an environment built by `environment`.
    public static func searchPath(in environment: [String]) -> String {
        environment.last { $0.hasPrefix("PATH=") }.map { String($0.dropFirst(5)) } ?? defaultPath
    }

    /// Finds the file to exec for argv[0] the way a shell does: a name with a
    /// slash is used as given (relative to the working directory); otherwise the
    /// first executable file in PATH wins, and a non-executable match is
    /// remembered so the error can say "not executable" rather than "not found".
    public static func resolve(_ command: String, path: String, workingDirectory: String,
                               kind: (String) -> PathKind) -> Result<String, AgentError> {
        guard !command.isEmpty else { return .failure(.commandNotFound("an empty command name")) }
        if command.contains("/") {
            let full = command.hasPrefix("/") ? command : join(workingDirectory, command)
            switch kind(full) {
            case .executableFile: return .success(full)
            case .missing: return .failure(.commandNotFound("\(command): no such file in the guest"))
            case .notExecutable: return .failure(.notExecutable("\(command): not an executable file in the guest"))
            }
        }
        var refused: String?
        for dir in path.split(separator: ":", omittingEmptySubsequences: false) {
            // An empty PATH entry means the working directory, as POSIX says.
            let base = dir.isEmpty ? workingDirectory : String(dir)
            let candidate = join(base, command)
            switch kind(candidate) {
            case .executableFile: return .success(candidate)
            case .notExecutable: refused = refused ?? candidate
            case .missing: continue
            }
        }
        if let refused { return .failure(.notExecutable("\(command): \(refused) is not executable")) }
        return .failure(.commandNotFound("\(command): command not found in the guest (PATH=\(path))"))
    }

    static func join(_ dir: String, _ name: String) -> String {
        dir.hasSuffix("/") ? dir + name : dir + "/" + name
    }
}

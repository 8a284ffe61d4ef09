import AgentProtocol
import RootFS

/// Every check a command gets before it costs a boot or a run: one place for the rules,
/// for the CLI and the API alike (the agent applies the same `Accounts` rules again inside).
enum CommandValidation {
    /// Checks `command`; with `config`, also resolves `--user` against the root filesystem's
    /// own /etc/passwd and /etc/group, read from the image without booting it.
    static func check(_ command: Command, config: SandboxConfig? = nil) throws(SandboxError) {
        guard let first = command.arguments.first, !first.isEmpty else {
            throw .invalidConfiguration("the command is empty: give the program to run and its arguments (airlock run -- CMD ARGS...)")
        }
        if let t = command.timeoutSeconds, !(t.isFinite && t > 0) {
            throw .invalidConfiguration("--timeout \(t) is not a positive, finite number of seconds")
        }
        if let m = command.maxOutputBytes, m < 0 {
            throw .invalidConfiguration("--max-output \(m) is negative: give a number of bytes, 0 or more")
        }
        for (name, _) in command.environment where !isPortableName(name) {
            throw .invalidConfiguration("--env: '\(name)' is not a usable variable name: use letters, digits and '_', not starting with a digit (NAME=VALUE)")
        }
        guard command.workingDirectory.hasPrefix("/") else {
            throw .invalidConfiguration("--workdir '\(command.workingDirectory)' is not an absolute path: give the guest directory from / (e.g. /tmp)")
        }
        // The agent's limits, checked before any boot.
        let request = RunRequest(runID: 0, arguments: command.arguments,
                                 environment: command.environment.map { "\($0.name)=\($0.value)" },
                                 workingDirectory: command.workingDirectory, user: command.user,
                                 hasStdin: command.stdin != .none, shutdownAfter: false)
        if let problem = request.limitProblem {
            throw .invalidConfiguration("\(problem): pass large inputs on stdin or in a file instead")
        }
        if let config { try checkUser(command.user, config: config) }
    }

    /// POSIX's portable names: what a shell can reference, and what no tool mangles.
    static func isPortableName(_ name: String) -> Bool {
        guard let first = name.utf8.first, !(UInt8(ascii: "0")...UInt8(ascii: "9")).contains(first) else { return false }
        return name.utf8.allSatisfy { b in
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(b) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(b)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b) || b == UInt8(ascii: "_")
        }
    }

    /// Resolves `user` as the agent will, against the image's own account files.
    static func checkUser(_ user: String, config: SandboxConfig, store: ImageStore = ImageStore()) throws(SandboxError) {
        if user.isEmpty || user == "root" || user == "0" { return }
        let rootfs = config.rootfsPath ?? store.rootfsPath
        let passwd: [UInt8]?, group: [UInt8]?
        do {
            let image = try Ext4Image(path: rootfs)
            passwd = try image.readFile("/etc/passwd", limit: 1 << 20)
            group = try image.readFile("/etc/group", limit: 1 << 20)
        } catch {
            // The image check before the boot reports an unreadable image; the agent resolves the user then.
            return
        }
        let users = Accounts.parsePasswd(String(decoding: passwd ?? [], as: UTF8.self))
        let groups = Accounts.parseGroup(String(decoding: group ?? [], as: UTF8.self))
        if case let .failure(problem) = Accounts.resolve(user, passwd: users, groups: groups) {
            throw .invalidConfiguration("\(problem) (from \(rootfs))")
        }
    }
}

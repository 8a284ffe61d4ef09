/// Who a run's command runs as, resolved from the guest's /etc/passwd and
/// /etc/group. Parsed here rather than with getpwnam: a static binary cannot
/// load glibc's NSS modules, and the files are all a minimal guest has.
///
/// One rule for both sides: the agent resolves `--user` with it at run time, and the host
/// checks the same value against the image's files before it boots anything.
public struct Credentials: Equatable, Sendable {
    public var uid: UInt32
    public var gid: UInt32
    public var groups: [UInt32]
    public var home: String

    public init(uid: UInt32, gid: UInt32, groups: [UInt32], home: String) {
        self.uid = uid; self.gid = gid; self.groups = groups; self.home = home
    }

    public static let root = Credentials(uid: 0, gid: 0, groups: [0], home: "/root")
}

public struct PasswdEntry: Equatable, Sendable {
    public var name: String
    public var uid: UInt32
    public var gid: UInt32
    public var home: String
}

public struct GroupEntry: Equatable, Sendable {
    public var name: String
    public var gid: UInt32
    public var members: [String]
}

public enum Accounts {
    /// name:password:uid:gid:gecos:home:shell; malformed lines are skipped, as libc does.
    public static func parsePasswd(_ text: String) -> [PasswdEntry] {
        text.split(separator: "\n").compactMap { line in
            let f = line.split(separator: ":", omittingEmptySubsequences: false)
            guard f.count >= 7, let uid = UInt32(f[2]), let gid = UInt32(f[3]), !f[0].isEmpty else { return nil }
            return PasswdEntry(name: String(f[0]), uid: uid, gid: gid, home: String(f[5]))
        }
    }

    /// name:password:gid:member,member
    public static func parseGroup(_ text: String) -> [GroupEntry] {
        text.split(separator: "\n").compactMap { line in
            let f = line.split(separator: ":", omittingEmptySubsequences: false)
            guard f.count >= 4, let gid = UInt32(f[2]), !f[0].isEmpty else { return nil }
            return GroupEntry(name: String(f[0]), gid: gid, members: f[3].split(separator: ",").map(String.init))
        }
    }

    /// Resolves "", "name", "uid", "name:group", "uid:gid" (either side a name or a number).
    /// A numeric uid need not exist in /etc/passwd (as with `docker run --user`);
    /// a name must. The error names the value and what exists.
    public static func resolve(_ spec: String, passwd: [PasswdEntry], groups: [GroupEntry]) -> Result<Credentials, AccountsProblem> {
        if spec.isEmpty || spec == "root" || spec == "0" { return .success(.root) }
        let parts = spec.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
        let userPart = parts[0]
        guard !userPart.isEmpty else { return .failure(AccountsProblem("--user '\(spec)' has an empty user name: give NAME, UID, or NAME:GROUP")) }
        if parts.count == 2 && parts[1].isEmpty {
            return .failure(AccountsProblem("--user '\(spec)' has an empty group after ':': give NAME:GROUP, or just NAME for its own groups"))
        }

        var creds: Credentials
        let entry: PasswdEntry?
        if let uid = UInt32(userPart) {
            entry = passwd.first { $0.uid == uid }
            creds = Credentials(uid: uid, gid: entry?.gid ?? uid, groups: [], home: entry?.home ?? "/")
        } else {
            guard let e = passwd.first(where: { $0.name == userPart }) else {
                let known = passwd.map(\.name).joined(separator: ", ")
                return .failure(AccountsProblem("--user '\(userPart)' is not in the guest's /etc/passwd (it has: \(known)): give a listed name or a numeric uid"))
            }
            entry = e
            creds = Credentials(uid: e.uid, gid: e.gid, groups: [], home: e.home)
        }
        if parts.count == 2 {
            let g = parts[1]
            if let gid = UInt32(g) {
                creds.gid = gid
            } else if let e = groups.first(where: { $0.name == g }) {
                creds.gid = e.gid
            } else {
                return .failure(AccountsProblem("--user '\(spec)': group '\(g)' is not in the guest's /etc/group: give a listed group or a numeric gid"))
            }
            creds.groups = [creds.gid]
        } else {
            // Like login: the primary group plus every group that lists the user.
            let supplementary = entry.map { e in groups.filter { $0.members.contains(e.name) }.map(\.gid) } ?? []
            creds.groups = [creds.gid] + supplementary.filter { $0 != creds.gid }
        }
        return .success(creds)
    }
}

/// Why a `--user` value does not resolve, in words for the person who gave it.
public struct AccountsProblem: Error, Equatable, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

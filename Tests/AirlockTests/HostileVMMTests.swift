import Foundation
import Testing
@testable import Airlock

/// A VMM that breaks the session protocol (airlock-fake-vmm, jailed exactly like airlock-vmm):
/// the supervisor ends it, says what happened, and nothing of it stays behind: no process,
/// jail directory, cgroup, mount or descriptor. No guest boots.
@Suite(.serialized) struct HostileVMMTests {
    /// A wrapper script per mode: the jail spawns it, it execs the fake with the mode.
    static func fake(_ mode: String) throws -> String {
        let bin = URL(fileURLWithPath: try VMTests.airlockExecutable()).deletingLastPathComponent().appendingPathComponent("airlock-fake-vmm").path
        guard FileManager.default.isExecutableFile(atPath: bin) else { throw TestFailure("no airlock-fake-vmm beside airlock: swift build first") }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("airlock-fake-vmm-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let script = dir.appendingPathComponent(mode).path
        let text = "#!/bin/sh\nexec \(bin) --mode \(mode) \"$@\"\n"
        // Written once, and with O_CLOEXEC: a descriptor open for writing that another suite's
        // fork inherits makes this script's exec fail with ETXTBSY until that child execs.
        if (try? String(contentsOfFile: script, encoding: .utf8)) == text { return script }
        let fd = open(script + ".new", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o755)
        guard fd >= 0 else { throw TestFailure("cannot write \(script).new: errno \(errno)") }
        fchmod(fd, 0o755)  // the mode whatever the umask (a test elsewhere sets 077 for a while)
        let written = text.utf8CString.withUnsafeBytes { write(fd, $0.baseAddress, $0.count - 1) }
        close(fd)
        guard written == text.utf8.count, rename(script + ".new", script) == 0 else { throw TestFailure("cannot write \(script)") }
        return script
    }

    static let tag = "hostile"

    static func config(_ mode: String) throws -> SandboxConfig {
        var c = SandboxConfig(memoryMiB: 64)
        c.vmmExecutable = try fake(mode)
        c.bootTimeoutSeconds = 1
        c.jailTag = tag
        return c
    }

    /// Runs one session against the fake and returns the error it ended with.
    static func session(_ mode: String) throws -> SandboxError? {
        let config = try config(mode)
        do {
            let client = try SessionClient.boot(config, requestedAt: 0, logger: .init(label: "test"))
            var command = Command(["true"])
            command.timeoutSeconds = 1
            _ = try client.run(command, shutdownAfter: true)
            return nil
        } catch {
            return error
        }
    }

    static func withShortMargins<T>(_ body: () throws -> T) rethrows -> T {
        let saved = SessionClient.margins
        SessionClient.margins = .init(hello: 1, boot: 1, run: 1, exit: 2, send: 2)
        defer { SessionClient.margins = saved }
        return try body()
    }

    static let expectations: [(String, String)] = [
        ("garbage", "broke the session protocol"),
        ("oversized", "broke the session protocol"),
        ("descriptors", "sent descriptors"),
        ("silent", "did not answer"),
        ("exit-at-boot", "ended while booting"),
        ("exit-mid-run", "ended while running"),
        ("mute-run", "did not answer"),
        ("flood", "sent started"),
    ]

    @Test(arguments: expectations)
    func aBrokenVMMIsStoppedAndNamed(_ mode: String, _ mentions: String) throws {
        try JailProbe.requireRoot()
        let error = try Self.withShortMargins { try Self.session(mode) }
        let text = error?.description ?? "no error"
        #expect(text.contains(mentions), "\(mode): \(text)")
        #expect(Leftovers.now(tag: Self.tag).isEmpty, "\(mode): \(Leftovers.now(tag: Self.tag))")
    }

    /// 200 sessions, every kind of breakage in turn: nothing accumulates.
    @Test(.timeLimit(.minutes(10)))
    func twoHundredBrokenVMMsLeaveNothingBehind() throws {
        try JailProbe.requireRoot()
        let fdsBefore = Leftovers.socketsAndPipes()
        try Self.withShortMargins {
            for i in 0..<200 {
                // "silent" and "mute-run" wait out a margin each: a few of them are enough.
                let (mode, _) = Self.expectations[i % Self.expectations.count]
                if (mode == "silent" || mode == "mute-run") && i >= 16 { continue }
                let error = try Self.session(mode)
                #expect(error != nil, "\(mode) was not refused")
            }
        }
        #expect(Leftovers.now(tag: Self.tag).isEmpty, "\(Leftovers.now(tag: Self.tag))")
        // Other suites in this process open pipes and sockets of their own meanwhile; a leak here
        // would be one or more per session: 200 at least.
        var grown = 0
        _ = JailProbe.waitFor(seconds: 3) { grown = Leftovers.socketsAndPipes() - fdsBefore; return grown < 20 ? true : nil }
        #expect(grown < 50, "\(grown) more sockets and pipes are open than before")
    }
}

/// What a supervisor could leave behind: jails, cgroups and mounts named with `tag`, and VMM processes.
enum Leftovers {
    static func now(tag: String) -> [String] {
        var found: [String] = []
        let prefix = "\(tag)-\(getpid())-"
        let jails = (try? FileManager.default.contentsOfDirectory(atPath: "/run/airlock/jail")) ?? []
        found += jails.filter { $0.hasPrefix(prefix) }.map { "jail /run/airlock/jail/\($0)" }
        if let walker = FileManager.default.enumerator(atPath: "/sys/fs/cgroup") {
            while let path = walker.nextObject() as? String {
                if walker.level > 5 { walker.skipDescendants(); continue }
                if (path as NSString).lastPathComponent.hasPrefix(prefix) {
                    found.append("cgroup /sys/fs/cgroup/\(path)")
                    walker.skipDescendants()
                }
            }
        }
        let mountinfo = String(decoding: FileHandle(forReadingAtPath: "/proc/self/mountinfo")?.readDataToEndOfFile() ?? Data(), as: UTF8.self)
        found += mountinfo.split(separator: "\n").filter { $0.contains("/run/airlock/jail/\(prefix)") }.map { "mount \($0)" }
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] where Int32(entry) != nil {
            if let cmdline = try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(entry)/cmdline")),
               String(decoding: cmdline, as: UTF8.self).contains("airlock-fake-vmm") {
                found.append("process \(entry)")
            }
        }
        return found
    }

    static func socketsAndPipes() -> Int {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return fds.filter { fd in
            let target = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)")) ?? ""
            return target.hasPrefix("socket:") || target.hasPrefix("pipe:") || target.hasPrefix("anon_inode:[pidfd]")
        }.count
    }
}

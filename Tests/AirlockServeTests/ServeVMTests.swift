import AirlockTestSupport
@testable import Airlock
import Foundation
import Testing
@testable import AirlockServe

/// This process's jailed VMMs: `airlock-vmm` descendants that are PID 1 of their own namespace.
enum VMMProcesses {
    /// The jail name's first part for this suite's sandboxes (`SandboxConfig.jailTag`): other
    /// suites in this test process boot VMs at the same time, and theirs are not counted.
    static let tag = "serve"

    static func all() -> Set<Int32> {
        var found: Set<Int32> = []
        let cgroup = "/\(tag)-\(getpid())-"
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = Int32(entry), let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
                  let cmdline = try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(pid)/cmdline")),
                  String(decoding: cmdline, as: UTF8.self).contains("airlock-vmm"),
                  let groups = try? String(contentsOfFile: "/proc/\(pid)/cgroup", encoding: .utf8),
                  groups.contains(cgroup) else { continue }
            let nspid = field("NSpid", in: status)?.split(separator: "\t").map(String.init) ?? []
            if nspid.last == "1", descends(pid, from: getpid()) { found.insert(pid) }
        }
        return found
    }

    static func descends(_ pid: Int32, from ancestor: Int32) -> Bool { ProcStatus.descends(pid, from: ancestor) }

    static func field(_ name: String, in status: String) -> String? { ProcStatus.field(name, in: status) }

    /// Jail directories and cgroups this process's sandboxes made (named vm-<pid>-...).
    static func leftovers() -> [String] {
        let prefix = "\(tag)-\(getpid())-"
        var found = ((try? FileManager.default.contentsOfDirectory(atPath: "/run/airlock/jail")) ?? [])
            .filter { $0.hasPrefix(prefix) }.map { "/run/airlock/jail/" + $0 }
        if let walker = FileManager.default.enumerator(atPath: "/sys/fs/cgroup") {
            while let path = walker.nextObject() as? String {
                if walker.level > 5 { walker.skipDescendants(); continue }
                if (path as NSString).lastPathComponent.hasPrefix(prefix) {
                    found.append("/sys/fs/cgroup/" + path)
                    walker.skipDescendants()
                }
            }
        }
        return found
    }
}

/// The real provider, whose sandboxes can have their VMM killed mid-run. Boots one at a
/// time, so that the `airlock-vmm` process that appears during a boot is that sandbox's.
final class KillableProvider: SandboxProvider, @unchecked Sendable {
    // @unchecked: `killNextAfter` and the boot gate are under `lock`.
    let inner = BootingSandboxProvider()
    private let lock = NSLock()
    private var killNextAfter: Double?
    private var booting = false
    private var made: [Weak] = []

    struct Weak { weak var object: AnyObject?; init(_ o: AnyObject) { object = o } }

    /// Sandboxes this provider made that are still alive: each holds its VMM's socket and the
    /// /dev/kvm descriptor it passed in, so none alive means none of those is left open.
    var alive: Int { lock.withLock { made.filter { $0.object != nil }.count } }

    var origin: SandboxOrigin { inner.origin }
    func preflight(_ config: SandboxConfig) throws(SandboxError) { try inner.preflight(config) }
    func check(_ command: Command, config: SandboxConfig) throws(SandboxError) { try inner.check(command, config: config) }

    func prepare(_ config: SandboxConfig) async throws(SandboxError) -> any ReadySandbox {
        while !lock.withLock({ () -> Bool in
            if booting { return false }
            booting = true
            return true
        }) {
            try? await Task.sleep(for: .milliseconds(100))
        }
        defer { lock.withLock { booting = false } }
        var config = config
        config.jailTag = VMMProcesses.tag
        let before = VMMProcesses.all()
        let sandbox = try await inner.prepare(config)
        lock.withLock { made.append(Weak(sandbox as AnyObject)) }
        let mine = VMMProcesses.all().subtracting(before)
        return Killable(inner: sandbox, vmm: mine.count == 1 ? mine.first : nil, provider: self)
    }

    /// The next run's VMM is killed (SIGKILL) `seconds` into its run.
    func killNextRun(after seconds: Double) { lock.withLock { killNextAfter = seconds } }

    fileprivate func takeKill() -> Double? {
        lock.withLock {
            defer { killNextAfter = nil }
            return killNextAfter
        }
    }

    final class Killable: ReadySandbox {
        let inner: any ReadySandbox
        let vmm: Int32?
        unowned let provider: KillableProvider
        init(inner: any ReadySandbox, vmm: Int32?, provider: KillableProvider) {
            self.inner = inner
            self.vmm = vmm
            self.provider = provider
        }
        var origin: SandboxOrigin { inner.origin }
        func destroy() async { await inner.destroy() }
        func runOnce(_ command: Command) async throws(SandboxError) -> RunResult {
            guard let after = provider.takeKill() else { return try await inner.runOnce(command) }
            guard let vmm else { throw .vmm("the test could not tell this sandbox's VMM process apart") }
            let killer = Task {
                try? await Task.sleep(for: .seconds(after))
                kill(vmm, SIGKILL)
            }
            defer { killer.cancel() }
            return try await inner.runOnce(command)
        }
    }
}

/// The service over real, jailed VMs. One server and its pool serve every check, so the
/// whole suite costs six boots: a run with its receipt, a streamed run, a VMM killed
/// mid-run (500, and the pool refills), and a client that goes away (its VM ends), then
/// the drain, after which no VMM process, jail or cgroup of this process is left.
/// One test at a time: both count this suite's VMM processes (by jail tag).
@Suite(.serialized, .enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct ServeVMTests {

    /// The default provider: the pool's sandboxes are restores of one snapshot (made at the
    /// start when the store has none), each with its own random numbers; none is left after
    /// the drain.
    @Test(.timeLimit(.minutes(15)))
    func thePoolRestoresSnapshotsWithFreshRandomNumbers() async throws {
        guard getuid() == 0 else { throw TestFailure("the jailed sandboxes need root: run the suite as root, or AIRLOCK_SKIP_VM_TESTS=1") }
        var configuration = ServeConfiguration(listen: .tcp(host: "127.0.0.1", port: 0), token: nil,
                                               pool: TestServer.settings(pool: 2, maxConcurrent: 3, queueTimeout: 600))
        configuration.pool.config.bootTimeoutSeconds = 300
        configuration.pool.config.jailTag = VMMProcesses.tag
        let s = try TestServer(configuration, provider: RestoringSandboxProvider())
        try await s.start()
        try await s.use { s in
            #expect(await TestServer.eventually(400, every: .milliseconds(250)) { await s.poolCount("ready") == 2 })
            var seen: Set<String> = []
            for _ in 0..<3 {
                let r = try await s.run(#"{"argv": ["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"]}"#).json()
                #expect(r["exitCode"] as? Int == 0, "\(r)")
                #expect((r["snapshot"] as? [String: Any])?["restored"] as? Bool == true, "\(r)")
                #expect(((r["timings"] as? [String: Double])?["restoreMs"] ?? 0) > 0, "\(r)")
                seen.insert(r["stdout"] as? String ?? "")
            }
            #expect(seen.count == 3, "two restores of one snapshot drew the same numbers: \(seen)")
            #expect(await TestServer.eventually(60, every: .milliseconds(250)) {
                (try? await s.metric(#"airlock_serve_restores_total{result="ok"}"#)) ?? 0 >= 5
            })
            #expect(try await s.metric(#"airlock_serve_boots_total{result="ok"}"#) == 0)
        }
        #expect(await TestServer.eventually(30, every: .milliseconds(250)) { VMMProcesses.all().isEmpty }, "\(VMMProcesses.all())")
        #expect(await TestServer.eventually(30, every: .milliseconds(250)) { VMMProcesses.leftovers().isEmpty }, "\(VMMProcesses.leftovers())")
    }

    @Test(.timeLimit(.minutes(15)))
    func realSandboxesServeStreamFailAndEndWithTheirClients() async throws {
        guard getuid() == 0 else { throw TestFailure("the jailed sandboxes need root: run the suite as root, or AIRLOCK_SKIP_VM_TESTS=1") }
        guard FileManager.default.isReadableFile(atPath: "/dev/kvm") else {
            throw TestFailure("/dev/kvm is not readable here: run the VM tests where KVM is, or AIRLOCK_SKIP_VM_TESTS=1")
        }
        let provider = KillableProvider()
        var configuration = ServeConfiguration(listen: .tcp(host: "127.0.0.1", port: 0), token: nil,
                                               pool: TestServer.settings(pool: 2, maxConcurrent: 3, queueTimeout: 600))
        configuration.pool.config.bootTimeoutSeconds = 300
        let s = try TestServer(configuration, provider: provider)
        try await s.start()
        try await s.use { s in
            let bootWait = 400.0
            let filled = await TestServer.eventually(bootWait, every: .seconds(1)) { await s.poolCount("ready") == 2 }
            let health = filled ? "" : ((try? await s.health()).map { "\($0)" } ?? "no answer")
            #expect(filled, "the pool did not fill: \(health)")

            // A user the image does not know is refused before any VM is spent on it.
            let unknownUser = try await s.run(#"{"argv": ["id"], "user": "nosuchuser"}"#)
            #expect(unknownUser.status == 400)
            #expect(try unknownUser.json()["field"] as? String == "user", "\(unknownUser.body)")
            #expect(await s.poolCount("ready") == 2)

            // A run: output kept apart, status, stdin, env, workdir, the receipt's timings.
            let run = try await s.run(#"""
                {"argv": ["sh", "-c", "echo out; echo err >&2; echo \"$GREETING\"; pwd; cat; exit 3"],
                 "env": {"GREETING": "hello there"}, "workdir": "/tmp", "stdin": "piped\n", "timeoutSeconds": 120}
                """#)
            #expect(run.status == 200, "\(run.body)")
            let r = try run.json()
            #expect(r["exitCode"] as? Int == 3)
            #expect(r["stdout"] as? String == "out\nhello there\n/tmp\npiped\n")
            #expect(r["stderr"] as? String == "err\n")
            #expect(r["fromPool"] as? Bool == true)
            #expect((r["systemEvent"] as? String)?.contains("reset") == true)
            let timings = r["timings"] as? [String: Double] ?? [:]
            #expect((timings["kernelBootMs"] ?? 0) > 0 && (timings["commandMs"] ?? 0) > 0)
            // A warm run's total is its own time in the sandbox, not the boot before it.
            #expect((timings["totalMs"] ?? 0) <= (r["sandboxMs"] as? Double ?? 0) + 1)

            // Streamed: events as they happen, the two lines a second apart in two chunks.
            let streamed = try await s.run(#"{"argv": ["sh", "-c", "echo one; sleep 1; echo two >&2; sleep 1; echo three"]}"#,
                                           headers: ["Accept: application/x-ndjson"])
            #expect(streamed.status == 200)
            let events = try streamed.events()
            #expect(events.map { $0["event"] as? String ?? "" } == ["started", "stdout", "stderr", "stdout", "exited"], "\(streamed.body)")
            #expect(events.compactMap { $0["text"] as? String } == ["one\n", "two\n", "three\n"])
            #expect(events.last?["exitCode"] as? Int == 0)

            // The VMM is killed under a running command: 500 with the cause; the pool refills.
            #expect(await TestServer.eventually(bootWait, every: .seconds(1)) { await s.poolCount("ready") == 2 })
            #expect(VMMProcesses.all().count == 2)
            provider.killNextRun(after: 3)
            let killed = try await s.run(#"{"argv": ["sh", "-c", "echo started; sleep 600"]}"#)
            #expect(killed.status == 500, "\(killed.body)")
            #expect((try killed.json()["error"] as? String)?.contains("failed inside Airlock") == true)

            // A client that goes away mid-run ends its VM, long before the command would have.
            let client = try BackgroundCurl(s.address, #"{"argv": ["sleep", "600"]}"#)
            #expect(await TestServer.eventually(60, every: .milliseconds(250)) { await s.poolCount("busy") == 1 })
            try await Task.sleep(for: .seconds(2))
            kill(client.process.processIdentifier, SIGKILL)
            _ = await client.exitStatus()
            #expect(await TestServer.eventually(30, every: .milliseconds(250)) { await s.poolCount("busy") == 0 })
            #expect(await TestServer.eventually(10, every: .milliseconds(250)) {
                (try? await s.metric(#"airlock_serve_runs_total{outcome="cancelled"}"#)) == 1
            })
            // Both replaced: each sandbox served one request.
            #expect(await TestServer.eventually(bootWait, every: .seconds(1)) { await s.poolCount("ready") == 2 })
            #expect(try await s.metric(#"airlock_serve_boots_total{result="ok"}"#) == 6)
            #expect(try await s.metric(#"airlock_serve_runs_total{outcome="error"}"#) == 1)
        }
        // The drain destroyed the pool: no VMM process, jail, cgroup or KVM descriptor is left.
        #expect(await TestServer.eventually(30, every: .milliseconds(250)) { VMMProcesses.all().isEmpty }, "\(VMMProcesses.all())")
        #expect(await TestServer.eventually(30, every: .milliseconds(250)) { VMMProcesses.leftovers().isEmpty }, "\(VMMProcesses.leftovers())")
        #expect(await TestServer.eventually(30, every: .milliseconds(250)) { provider.alive == 0 }, "\(provider.alive) sandboxes alive")
    }
}

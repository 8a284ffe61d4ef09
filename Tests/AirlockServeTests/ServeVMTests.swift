import Airlock
import Foundation
import Testing
@testable import AirlockServe

/// A provider over the real one whose sandboxes can be made to die mid-run, as a VMM
/// that is killed does: the VM goes away under the command.
final class KillableProvider: SandboxProvider, @unchecked Sendable {
    // @unchecked: `killNext` is set by the test between requests, under `lock`.
    let inner = BootingSandboxProvider()
    private let lock = NSLock()
    private var killNextAfter: Double?

    var origin: SandboxOrigin { inner.origin }
    func preflight(_ config: SandboxConfig) throws(SandboxError) { try inner.preflight(config) }
    func check(_ command: Command) throws(SandboxError) { try inner.check(command) }
    func prepare(_ config: SandboxConfig) async throws(SandboxError) -> any ReadySandbox {
        Killable(inner: try await inner.prepare(config), provider: self)
    }

    /// The next run's VM is stopped `seconds` into its run.
    func killNextRun(after seconds: Double) { lock.withLock { killNextAfter = seconds } }

    fileprivate func takeKill() -> Double? {
        lock.withLock {
            defer { killNextAfter = nil }
            return killNextAfter
        }
    }

    final class Killable: ReadySandbox {
        let inner: any ReadySandbox
        unowned let provider: KillableProvider
        init(inner: any ReadySandbox, provider: KillableProvider) {
            self.inner = inner
            self.provider = provider
        }
        var origin: SandboxOrigin { inner.origin }
        func destroy() async { await inner.destroy() }
        func runOnce(_ command: Command) async throws(SandboxError) -> RunResult {
            guard let after = provider.takeKill() else { return try await inner.runOnce(command) }
            // The VM is stopped under the command the way a dying VMM stops it: its run ends
            // with the machine, not with the command (Sandbox stops the VM when the task running
            // the command is cancelled).
            let inner = self.inner
            let run = Task { () -> Result<RunResult, SandboxError> in
                do throws(SandboxError) { return .success(try await inner.runOnce(command)) } catch { return .failure(error) }
            }
            let killer = Task {
                try? await Task.sleep(for: .seconds(after))
                run.cancel()
            }
            defer { killer.cancel() }
            return try await run.value.get()
        }
    }
}

/// The service over real VMs. One server and its pool serve every check, so the
/// whole suite costs three rounds of two boots: a run with its receipt, a streamed
/// run, a VM that dies mid-run (500, and the pool refills), and a client that goes
/// away (its VM ends), then the drain, after which no VM is left in this process.
@Suite(.enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct ServeVMTests {
    static func kvmDescriptors() -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).compactMap { fd in
            let target = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)")) ?? ""
            return target.contains("kvm") ? target : nil
        }
    }

    @Test(.timeLimit(.minutes(15)))
    func realSandboxesServeStreamFailAndEndWithTheirClients() async throws {
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

            // The VM dies under a running command: 500 with the cause; the pool refills.
            #expect(await TestServer.eventually(bootWait, every: .seconds(1)) { await s.poolCount("ready") == 2 })
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
        // The drain destroyed the pool: no KVM descriptor is left in this process.
        #expect(await TestServer.eventually(30) { Self.kvmDescriptors().isEmpty }, "\(Self.kvmDescriptors())")
    }
}

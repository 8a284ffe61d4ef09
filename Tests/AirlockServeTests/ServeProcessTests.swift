import Foundation
import Testing

/// `airlock serve` as an operator runs it: the real executable, real signals.
/// The scripted provider (`--test-provider scripted`) keeps these fast; the VM
/// suite covers the same paths with real sandboxes.
final class ServeProcess: @unchecked Sendable {
    // @unchecked: the pipes' readers write under `lock`; everything else is set in init.
    let process = Process()
    private let lock = NSLock()
    private var stdoutText = ""
    private var stderrText = ""
    private let done = DispatchGroup()

    init(_ arguments: [String]) throws {
        process.executableURL = URL(fileURLWithPath: try airlockExecutable())
        // debug: ServiceLifecycle says which shutdown step it is at, should one hang.
        process.arguments = ["serve", "--log-level", "debug"] + arguments
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        try process.run()
        for (pipe, isOut) in [(out, true), (err, false)] {
            let handle = pipe.fileHandleForReading
            onNewThread(done) { [self] in
                while true {
                    let chunk = handle.availableData
                    if chunk.isEmpty { break }
                    lock.lock()
                    if isOut { stdoutText += String(decoding: chunk, as: UTF8.self) } else { stderrText += String(decoding: chunk, as: UTF8.self) }
                    lock.unlock()
                }
            }
        }
    }

    var stdout: String { lock.lock(); defer { lock.unlock() }; return stdoutText }
    var stderr: String { lock.lock(); defer { lock.unlock() }; return stderrText }

    /// The address from the "listening on" line.
    func address(within seconds: Double = 20) async throws -> String {
        let found = await TestServer.eventually(seconds) { self.stdout.contains("listening on ") || !self.process.isRunning }
        guard found, let line = stdout.split(separator: "\n").first(where: { $0.contains("listening on ") }) else {
            throw TestFailure("airlock serve did not say where it listens; stderr: \(stderr)")
        }
        return String(line.split(separator: " ").last!)
    }

    func signal(_ sig: Int32) { kill(process.processIdentifier, sig) }

    /// Waits for the process to exit; its status, or nil when it is still running after `seconds`.
    func exit(within seconds: Double) async -> Int32? {
        let ended = await TestServer.eventually(seconds) { !self.process.isRunning }
        guard ended else { return nil }
        _ = try? await offPool { [self] in done.wait() }
        return process.terminationStatus
    }

    static func socketPath() throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("airlock-serve-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir.appendingPathComponent("s.sock").path
    }
}

@Suite struct ServeProcessTests {
    /// SIGTERM: no new requests, the one in flight finishes, the pool is destroyed, exit 0.
    @Test(.timeLimit(.minutes(1)))
    func sigtermDrainsInFlightRunsThenExitsZero() async throws {
        let path = try ServeProcess.socketPath()
        let serve = try ServeProcess(["--listen", "unix:\(path)", "--test-provider", "scripted", "--pool", "2", "--drain-timeout", "20"])
        let address = try await serve.address()
        let inFlight = try BackgroundCurl(address, #"{"argv": ["sleep", "3"]}"#)
        #expect(await TestServer.eventually { (try? await Curl.request(address, "GET", "/v1/health").json()["inFlight"] as? Int) == 1 })
        serve.signal(SIGTERM)
        let answer = try await inFlight.answer()
        #expect(answer.status == 200)
        #expect(try answer.json()["exitCode"] as? Int == 0)
        #expect(await serve.exit(within: 10) == 0, "stderr: \(serve.stderr)")
        // Nothing listens any more, and the socket file is gone.
        #expect(!FileManager.default.fileExists(atPath: path))
        #expect(serve.stderr.contains("draining"))
        #expect(serve.stderr.contains("pool destroyed"))
        #expect(serve.stderr.contains("outcome=succeeded"))
    }

    /// A run past --drain-timeout is stopped (its VM with it) and answered 503; the exit is still 0.
    @Test(.timeLimit(.minutes(1)))
    func theDrainIsBoundedByItsTimeout() async throws {
        let serve = try ServeProcess(["--listen", "127.0.0.1:0", "--allow-no-token", "--test-provider", "scripted", "--pool", "0",
                                      "--drain-timeout", "0.5"])
        let address = try await serve.address()
        let slow = try BackgroundCurl(address, #"{"argv": ["sleep", "60"]}"#)
        #expect(await TestServer.eventually { (try? await Curl.request(address, "GET", "/v1/health").json()["inFlight"] as? Int) == 1 })
        let start = Date()
        serve.signal(SIGTERM)
        let answer = try await slow.answer()
        #expect(answer.status == 503)
        #expect(await serve.exit(within: 10) == 0, "stderr: \(serve.stderr)")
        #expect(Date().timeIntervalSince(start) < 8)
        #expect(serve.stderr.contains("drain timeout: stopping 1 runs"))
        // After the drain began, new connections find nobody.
        let refused = try await Curl.run(["-sS", "--max-time", "5", address + "/v1/health"])
        #expect(refused.status == 7)  // curl: could not connect
    }

    /// SIGKILL leaves the socket file; the next start replaces it.
    @Test(.timeLimit(.minutes(1)))
    func aKilledServiceLeavesNothingTheNextStartDoesNotSweep() async throws {
        let path = try ServeProcess.socketPath()
        let first = try ServeProcess(["--listen", "unix:\(path)", "--test-provider", "scripted"])
        _ = try await first.address()
        first.signal(SIGKILL)
        #expect(await first.exit(within: 10) == SIGKILL)
        #expect(FileManager.default.fileExists(atPath: path))
        let second = try ServeProcess(["--listen", "unix:\(path)", "--test-provider", "scripted"])
        let address = try await second.address()
        #expect(try await Curl.request(address, "POST", "/v1/runs", json: #"{"argv": ["true"]}"#).status == 200)
        second.signal(SIGTERM)
        #expect(await second.exit(within: 10) == 0)
    }

    @Test func tcpWithoutATokenIsRefusedUnlessAskedFor() async throws {
        let serve = try ServeProcess(["--listen", "127.0.0.1:0", "--test-provider", "scripted"])
        #expect(await serve.exit(within: 20) == 125)
        #expect(serve.stderr.contains("--token-file"))
    }

    @Test func aNonLoopbackAddressWithoutATokenIsWarnedAbout() async throws {
        let serve = try ServeProcess(["--listen", "0.0.0.0:0", "--allow-no-token", "--test-provider", "scripted", "--pool", "0"])
        _ = try await serve.address()
        #expect(serve.stderr.contains("WARNING: listening on 0.0.0.0:0, which is not a loopback address, without a token"))
        serve.signal(SIGTERM)
        #expect(await serve.exit(within: 10) == 0)
    }

    @Test func theTokenFileIsRequiredOnTCPAndChecked() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("airlock-token-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let file = dir.appendingPathComponent("token").path
        let token = "f00dfeedf00dfeedf00dfeedf00dfeed"
        try (token + "\n").write(toFile: file, atomically: true, encoding: .utf8)
        chmod(file, 0o644)
        let serve = try ServeProcess(["--listen", "127.0.0.1:0", "--token-file", file, "--test-provider", "scripted", "--pool", "0"])
        let address = try await serve.address()
        #expect(serve.stderr.contains("is readable by others"))
        #expect(try await Curl.request(address, "POST", "/v1/runs", json: #"{"argv": ["true"]}"#).status == 401)
        #expect(try await Curl.request(address, "POST", "/v1/runs", json: #"{"argv": ["true"]}"#, token: token).status == 200)
        serve.signal(SIGTERM)
        #expect(await serve.exit(within: 10) == 0)
    }
}

import Airlock
import AirlockServe
import Foundation
import Testing

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// VM tests run wherever /dev/kvm is, and fail (never skip) where it is not,
/// unless the run asked to leave them out with AIRLOCK_SKIP_VM_TESTS=1.
enum VMTests {
    static var enabled: Bool { ProcessInfo.processInfo.environment["AIRLOCK_SKIP_VM_TESTS"] != "1" }
}

/// One HTTP answer as curl saw it.
struct Answer {
    var status: Int
    var headers: [String: String]
    var body: String
    var curlStderr: String

    func json() throws -> [String: Any] {
        guard let object = try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any] else {
            throw TestFailure("not a JSON object: \(body)")
        }
        return object
    }

    /// Each line of an NDJSON body, parsed.
    func events() throws -> [[String: Any]] {
        try body.split(separator: "\n").map { line in
            guard let e = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
                throw TestFailure("not a JSON object line: \(line)")
            }
            return e
        }
    }

    func header(_ name: String) -> String? { headers[name.lowercased()] }
}

/// curl, a real HTTP/1.1 client, against a server on loopback or a Unix socket.
enum Curl {
    /// Runs curl with `arguments` on a thread of its own (never blocking Swift
    /// concurrency's few threads, which the server in this process needs).
    static func run(_ arguments: [String]) async throws -> (status: Int32, stdout: Data, stderr: String) {
        try await offPool { try runBlocking(arguments) }
    }

    static func runBlocking(_ arguments: [String]) throws -> (status: Int32, stdout: Data, stderr: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
        p.arguments = arguments
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        try p.run()
        nonisolated(unsafe) var outData = Data(), errData = Data()
        let group = DispatchGroup()
        onNewThread(group) { outData = out.fileHandleForReading.readDataToEndOfFile() }
        onNewThread(group) { errData = err.fileHandleForReading.readDataToEndOfFile() }
        group.wait()
        p.waitUntilExit()
        return (p.terminationStatus, outData, String(decoding: errData, as: UTF8.self))
    }

    /// One request; `address` is `http://127.0.0.1:PORT` or `unix:PATH`.
    static func request(_ address: String, _ method: String, _ path: String, json body: String? = nil,
                        headers: [String] = [], token: String? = nil, extra: [String] = []) async throws -> Answer {
        var args = ["-sS", "-i", "-X", method, "--max-time", "120"]
        let url: String
        if address.hasPrefix("unix:") {
            args += ["--unix-socket", String(address.dropFirst(5))]
            url = "http://localhost" + path
        } else {
            url = address + path
        }
        if let body {
            args += ["-H", "Content-Type: application/json", "--data-binary", body]
        }
        for h in headers { args += ["-H", h] }
        if let token { args += ["-H", "Authorization: Bearer \(token)"] }
        args += extra
        args.append(url)
        let r = try await run(args)
        guard r.status == 0 else { throw TestFailure("curl \(args) failed (\(r.status)): \(r.stderr)") }
        return try parse(r.stdout, stderr: r.stderr)
    }

    /// `curl -i` output: status line, headers, blank line, body.
    static func parse(_ data: Data, stderr: String) throws -> Answer {
        let text = String(decoding: data, as: UTF8.self)
        guard let split = text.range(of: "\r\n\r\n") else { throw TestFailure("no header end in: \(text)") }
        let head = text[..<split.lowerBound].split(separator: "\r\n")
        guard let statusLine = head.first, let code = statusLine.split(separator: " ").dropFirst().first.flatMap({ Int($0) }) else {
            throw TestFailure("no status line in: \(text)")
        }
        var headers: [String: String] = [:]
        for line in head.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return Answer(status: code, headers: headers, body: String(text[split.upperBound...]), curlStderr: stderr)
    }
}

/// An `AirlockServer` on an ephemeral loopback port (or a Unix socket), running in
/// this process with a provider of the test's choosing.
final class TestServer: @unchecked Sendable {
    // @unchecked: set once in start, then read only.
    let server: AirlockServer
    private(set) var address = ""
    private var task: Task<Void, any Error>?

    init(_ configuration: ServeConfiguration, provider: any SandboxProvider) throws {
        server = try AirlockServer(configuration: configuration, provider: provider)
    }

    static func settings(pool: Int = 1, maxConcurrent: Int = 4, queue: Int = 8, queueTimeout: Double = 30,
                         memoryMiB: Int = 128) -> PoolSettings {
        PoolSettings(config: SandboxConfig(memoryMiB: memoryMiB), size: pool, maxConcurrent: maxConcurrent,
                     queueLimit: queue, queueTimeoutSeconds: queueTimeout)
    }

    /// A scripted-provider server on 127.0.0.1:0 without a token, adjusted by `change`.
    static func scripted(pool: Int = 1, maxConcurrent: Int = 4, queue: Int = 8, provider: ScriptedSandboxProvider = ScriptedSandboxProvider(),
                         _ change: (inout ServeConfiguration) -> Void = { _ in }) async throws -> TestServer {
        var c = ServeConfiguration(listen: .tcp(host: "127.0.0.1", port: 0), token: nil,
                                   pool: settings(pool: pool, maxConcurrent: maxConcurrent, queue: queue))
        change(&c)
        let s = try TestServer(c, provider: provider)
        try await s.start()
        return s
    }

    func start() async throws {
        let (stream, continuation) = AsyncStream<String>.makeStream()
        let server = self.server
        task = Task {
            defer { continuation.finish() }
            try await server.run(handlingSignals: false) { continuation.yield($0) }
        }
        for await a in stream {
            address = a
            return
        }
        try await task?.value
        throw TestFailure("the server stopped before it listened")
    }

    /// Runs `body`, then stops the server, whether `body` failed or not.
    func use(_ body: (TestServer) async throws -> Void) async throws {
        do {
            try await body(self)
        } catch {
            try? await stop()
            throw error
        }
        try await stop()
    }

    /// The graceful drain, as SIGTERM starts it; returns when the service has stopped.
    func stop() async throws {
        await server.shutdown()
        try await task?.value
    }

    func request(_ method: String, _ path: String, json body: String? = nil, headers: [String] = [], token: String? = nil,
                 extra: [String] = []) async throws -> Answer {
        try await Curl.request(address, method, path, json: body, headers: headers, token: token, extra: extra)
    }

    func run(_ body: String, headers: [String] = []) async throws -> Answer {
        try await request("POST", "/v1/runs", json: body, headers: headers)
    }

    func health() async throws -> [String: Any] { try await request("GET", "/v1/health").json() }

    func pool() async throws -> [String: Any] { try await health()["pool"] as? [String: Any] ?? [:] }

    /// A pool count from /v1/health ("ready", "busy", "queued"), -1 when it cannot be read.
    func poolCount(_ key: String) async -> Int { (try? await pool()[key] as? Int) ?? -1 }

    /// A metric's value from /metrics (`name{labels}` as written there).
    func metric(_ series: String, token: String? = nil) async throws -> Double? {
        let text = try await request("GET", "/metrics", token: token).body
        for line in text.split(separator: "\n") where line.hasPrefix(series + " ") {
            return Double(line.dropFirst(series.count + 1))
        }
        return nil
    }

    /// Polls `condition` until it holds or `seconds` pass.
    static func eventually(_ seconds: Double = 10, every interval: Duration = .milliseconds(20),
                           _ condition: () async throws -> Bool) async rethrows -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if try await condition() { return true }
            try? await Task.sleep(for: interval)
        }
        return try await condition()
    }
}

/// A background curl, for requests a test needs in flight while it does something else.
final class BackgroundCurl: @unchecked Sendable {
    let process = Process()
    private let out = Pipe(), err = Pipe()
    nonisolated(unsafe) private var outData = Data()
    private let reading = DispatchGroup()

    init(_ address: String, _ body: String, maxTime: Double = 120, headers: [String] = []) throws {
        var args = ["-sS", "-i", "-X", "POST", "--max-time", "\(maxTime)", "-H", "Content-Type: application/json", "--data-binary", body]
        for h in headers { args += ["-H", h] }
        if address.hasPrefix("unix:") {
            args += ["--unix-socket", String(address.dropFirst(5)), "http://localhost/v1/runs"]
        } else {
            args.append(address + "/v1/runs")
        }
        process.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
        process.arguments = args
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let handle = out.fileHandleForReading
        onNewThread(reading) { [self] in outData = handle.readDataToEndOfFile() }
    }

    /// Waits for curl to end and parses its answer.
    func answer() async throws -> Answer {
        try await offPool { try self.answerBlocking() }
    }

    private func answerBlocking() throws -> Answer {
        reading.wait()
        process.waitUntilExit()
        let e = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        guard process.terminationStatus == 0 else { throw TestFailure("curl failed (\(process.terminationStatus)): \(e)") }
        return try Curl.parse(outData, stderr: e)
    }

    /// Waits for curl to end (it may have been cut off) and returns its exit status.
    func exitStatus() async -> Int32 {
        (try? await offPool { [self] in
            reading.wait()
            process.waitUntilExit()
            return process.terminationStatus
        }) ?? -1
    }
}

/// Blocking work on a thread of its own, awaited. Tests must not hold Swift
/// concurrency's threads (as many as cores) while the server under test needs them,
/// nor Dispatch's global queues: on Linux they share that pool of threads.
func offPool<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        let thread = Thread {
            do { continuation.resume(returning: try work()) } catch { continuation.resume(throwing: error) }
        }
        thread.start()
    }
}

/// `work` on a new thread, inside `group`.
func onNewThread(_ group: DispatchGroup, _ work: @escaping @Sendable () -> Void) {
    group.enter()
    let thread = Thread {
        work()
        group.leave()
    }
    thread.start()
}

/// The `airlock` executable built beside this test bundle (`make test` builds it first).
func airlockExecutable() throws -> String {
    let beside = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("airlock").path
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    let candidates = [beside, root.appendingPathComponent(".build/debug/airlock").path]
    guard let found = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
        throw TestFailure("no airlock executable at \(candidates): run 'swift build' first (make test does)")
    }
    return found
}

/// This process's open descriptors, for leak checks.
func openDescriptorCount() -> Int {
    ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).count
}

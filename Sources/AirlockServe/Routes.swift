import Airlock
import AirlockOS
import FoundationEssentials
import Hummingbird
import Logging
import NIOCore
import Synchronization

/// What one request did, filled in by its handler and read by the log line.
final class RequestRecord: Sendable {
    struct Fields: Sendable {
        var id = ""
        var outcome: ServeMetrics.Outcome?
        var exitCode: Int32?
        var fromPool: Bool?
        var queueMs: Double?
        var sandboxMs: Double?
        var error: String?
        /// The answer streams: the log line waits for its end.
        var streaming = false
        /// Close the connection after the answer (a body too large to read to its end).
        var closeAfter = false
    }
    private let fields = Mutex(Fields())
    var value: Fields { fields.withLock { $0 } }
    func update(_ change: (inout Fields) -> Void) { fields.withLock { change(&$0) } }
    var id: String { fields.withLock { $0.id } }
}

/// The per-request context: Hummingbird's, plus the connection (to watch for the
/// client going away) and the record for the log line.
struct ServeContext: RequestContext {
    var coreContext: CoreRequestContextStorage
    let channel: any Channel
    let record = RequestRecord()

    init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
    }
}

/// The routes, in one table: the router is built from it, 405 answers name the
/// methods from it, and a test checks /openapi.json against the router.
enum ServeRoutes {
    static let runs = "/v1/runs", health = "/v1/health", metrics = "/metrics", openAPI = "/openapi.json"
    static let methods: [String: [HTTPRequest.Method]] = [
        runs: [.post], health: [.get], metrics: [.get], openAPI: [.get],
    ]
    /// Reachable without the bearer token (load balancers' health checks carry none).
    static let open: Set<String> = [health]
}

extension AirlockServer {
    /// The service's router: middleware (log line, draining, errors as JSON, token), then the routes.
    func makeRouter() -> Router<ServeContext> {
        let router = Router(context: ServeContext.self)
        router.add(middleware: RequestLogMiddleware(server: self))
        if let token = configuration.token {
            router.add(middleware: BearerTokenMiddleware(token: Array(token.utf8), metrics: metrics))
        }
        router.post(RouterPath(ServeRoutes.runs)) { request, context in try await self.runRoute(request, context) }
        router.get(RouterPath(ServeRoutes.health)) { _, _ in await self.healthRoute() }
        router.get(RouterPath(ServeRoutes.metrics)) { _, _ in
            Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                     body: ResponseBody(byteBuffer: ByteBuffer(string: self.metrics.exposition())))
        }
        router.get(RouterPath(ServeRoutes.openAPI)) { _, _ in
            Response(status: .ok, headers: [.contentType: "application/json"],
                     body: ResponseBody(byteBuffer: ByteBuffer(string: OpenAPIDocument.json)))
        }
        return router
    }

    // MARK: - Answers

    struct ErrorBody: Encodable {
        let error: String
        let field: String?
        let id: String
        enum CodingKeys: String, CodingKey { case error, field, id }
        func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(error, forKey: .error)
            try c.encode(field, forKey: .field)
            try c.encode(id, forKey: .id)
        }
    }

    static func json(_ status: HTTPResponse.Status, _ bytes: [UInt8], headers: HTTPFields = [:]) -> Response {
        var fields = headers
        fields[.contentType] = "application/json"
        return Response(status: status, headers: fields, body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
    }

    static func error(_ status: HTTPResponse.Status, _ message: String, field: String? = nil, id: String,
                      headers: HTTPFields = [:]) -> Response {
        json(status, JSON.encode(ErrorBody(error: message, field: field, id: id)), headers: headers)
    }

    // MARK: - GET /v1/health

    struct Health: Encodable {
        let status: String
        let pool: PoolStatus
        let inFlight: Int
    }

    func healthRoute() async -> Response {
        let status = await pool.status
        let body = Health(status: isDraining ? "draining" : "ok", pool: status, inFlight: runs.count)
        return Self.json(isDraining ? .serviceUnavailable : .ok, JSON.encode(body))
    }

    // MARK: - POST /v1/runs

    func runRoute(_ request: Request, _ context: ServeContext) async throws -> Response {
        let limits = configuration.limits
        let tooLarge = "the body is over \(limits.maxBodyBytes) bytes (this service's --max-body): pass less stdin, or raise --max-body"
        if let length = request.headers[.contentLength].flatMap({ Int($0) }), length > limits.maxBodyBytes {
            return refuse(.bodyTooLarge, 413, tooLarge, context)
        }
        var request = request
        let body: ByteBuffer
        do {
            body = try await request.collectBody(upTo: limits.maxBodyBytes)
        } catch is NIOTooManyBytesError {
            return refuse(.bodyTooLarge, 413, tooLarge, context)
        }
        let spec: RunSpec
        do {
            spec = try RunRequestBody.parse(Array(body.readableBytesView), limits: limits, base: configuration.pool.config)
        } catch {
            return refuse(.badRequest, error.status, error.message, context, field: error.field)
        }
        do {
            try provider.check(spec.command, config: spec.config)
        } catch {
            return refuse(.badRequest, 400, error.description, context, field: blamedField(spec))
        }
        let connection = await ConnectionWatcher.state(of: context.channel)
        let streaming = request.headers[.accept].map { $0.contains("application/x-ndjson") } ?? false
        if streaming { return await streamRoute(spec, context, connection) }

        let outcome = await tracked(connection) { await self.execute(spec, record: context.record, events: nil) }
        return answer(outcome, context)
    }

    /// The field a failed check is about, when taking it out makes the check pass (an unknown
    /// `user` is the usual one: the sandbox checks it against the image's own account files).
    private func blamedField(_ spec: RunSpec) -> String? {
        guard !spec.command.user.isEmpty else { return nil }
        var without = spec.command
        without.user = ""
        return (try? provider.check(without, config: spec.config)) != nil ? "user" : nil
    }

    private func refuse(_ reason: ServeMetrics.Refusal, _ status: Int, _ message: String, _ context: ServeContext,
                        field: String? = nil, headers: HTTPFields = [:]) -> Response {
        metrics.refusal(reason)
        metrics.run(.refused)
        context.record.update {
            $0.outcome = .refused
            $0.error = message
            if status == 413 { $0.closeAfter = true }
        }
        return Self.error(.init(code: status), message, field: field, id: context.record.id, headers: headers)
    }

    /// How a run request ended, before it becomes an answer.
    enum RunOutcome: Sendable {
        case receipt(Receipt)
        case refused(AcquireError)
        /// Airlock failed (boot, VMM, protocol): a 500 with the cause.
        case failed(String)
        /// The client went away or the drain's time ran out.
        case cancelled
    }

    /// `work` in a task of its own that the client's going away, or the drain's
    /// deadline, cancels (which stops the VM).
    func tracked<T: Sendable>(_ connection: ConnectionState?, _ work: @escaping @Sendable () async -> T) async -> T {
        let task = Task { await work() }
        let cancel: @Sendable () -> Void = { task.cancel() }
        let registration = runs.add(cancel)
        let watch = connection?.onClose(cancel)
        defer {
            runs.remove(registration)
            connection?.remove(watch)
        }
        return await withTaskCancellationHandler { await task.value } onCancel: { task.cancel() }
    }

    /// Waits for a sandbox, then runs the request in it.
    func execute(_ spec: RunSpec, record: RequestRecord, events: EventStream?) async -> RunOutcome {
        switch await pool.acquire(spec.config) {
        case let .success(lease):
            return await run(spec, on: lease, record: record, events: events)
        case let .failure(error):
            return .refused(error)
        }
    }

    /// Runs the one command `lease`'s sandbox serves; the sandbox is gone afterwards.
    func run(_ spec: RunSpec, on lease: Lease, record: RequestRecord, events: EventStream?) async -> RunOutcome {
        let queueMs = Double(lease.queueNanoseconds) / 1e6
        metrics.queueWait.record(.nanoseconds(Int64(clamping: lease.queueNanoseconds)))
        record.update {
            $0.fromPool = lease.fromPool
            $0.queueMs = queueMs
        }
        if Task.isCancelled {
            await pool.discard(lease)
            return .cancelled
        }
        var command = spec.command
        let output = events.map { OutputRelay(events: $0) }
        if let output {
            command.stdout = .handler { output.send("stdout", $0) }
            command.stderr = .handler { output.send("stderr", $0) }
            events?.push(.started(id: record.id, fromPool: lease.fromPool, queueMs: queueMs), size: 64)
        }
        let runAt = monotonicNanoseconds()
        let result: Result<RunResult, SandboxError>
        do throws(SandboxError) { result = .success(try await lease.sandbox.runOnce(command)) } catch { result = .failure(error) }
        let endedAt = monotonicNanoseconds()
        output?.flush()
        let sandboxSeconds = Double(endedAt &- runAt) / 1e9
        await pool.finished(sandboxSeconds: sandboxSeconds)
        metrics.runDuration.record(.nanoseconds(Int64(clamping: endedAt &- runAt)))
        record.update { $0.sandboxMs = sandboxSeconds * 1e3 }

        if Task.isCancelled { return .cancelled }
        switch result {
        case let .failure(error):
            if case let .invalidConfiguration(message) = error { return .failed("the run was refused: \(message)") }
            return .failed("the run failed inside Airlock: \(error)")
        case var .success(r):
            if let failure = r.failure, r.exitCode == SandboxExitCode.airlockFailed, r.systemEvent == nil, !r.timedOut {
                // The VM went away under the command (not the command's doing): Airlock failed.
                return .failed("the run failed inside Airlock: \(failure)")
            }
            Self.adjustTimings(&r, lease: lease, runAt: runAt, endedAt: endedAt)
            return .receipt(Receipt(result: r, id: record.id, fromPool: lease.fromPool, queueMs: queueMs,
                                    sandboxMs: sandboxSeconds * 1e3))
        }
    }

    /// The sandbox's timings count from its boot; a pool sandbox then waited, idle, for
    /// this request. That wait is left out: a warm run's `totalMs` is the request's own time
    /// in the sandbox (`sandboxMs`) and its `agentReadyMs` what of it the command's start
    /// took (its boot, before the request, stays in vmmStartMs and kernelBootMs); a cold
    /// run's counts from its boot, less the moment between the boot and the hand-over.
    static func adjustTimings(_ r: inout RunResult, lease: Lease, runAt: UInt64, endedAt: UInt64) {
        func ms(_ ns: UInt64) -> Double { Double(ns) / 1e6 }
        if lease.fromPool {
            let inSandbox = ms(endedAt &- runAt)
            r.timings.totalMs = inSandbox
            r.timings.agentReadyMs = max(0, inSandbox - r.timings.commandMs - r.timings.shutdownMs)
        } else if runAt > lease.readyAt {
            let handOver = ms(runAt - lease.readyAt)
            r.timings.agentReadyMs = max(0, r.timings.agentReadyMs - handOver)
            r.timings.totalMs = max(0, r.timings.totalMs - handOver)
        }
    }

    /// The answer for a finished (or refused) run, and its outcome in the record and the metrics.
    func answer(_ outcome: RunOutcome, _ context: ServeContext) -> Response {
        let id = context.record.id
        switch outcome {
        case let .receipt(receipt):
            let o = Self.outcome(of: receipt.result)
            metrics.run(o)
            context.record.update {
                $0.outcome = o
                $0.exitCode = receipt.result.exitCode
            }
            return Self.json(.ok, JSON.encode(receipt))
        case let .refused(error):
            return refusal(error, context)
        case let .failed(message):
            metrics.run(.error)
            context.record.update {
                $0.outcome = .error
                $0.error = message
            }
            return Self.error(.internalServerError, message, id: id)
        case .cancelled:
            metrics.run(.cancelled)
            context.record.update { $0.outcome = .cancelled }
            return Self.error(.serviceUnavailable, "the run was stopped: the client went away or the service is shutting down", id: id)
        }
    }

    static func outcome(of r: RunResult) -> ServeMetrics.Outcome {
        r.timedOut ? .timedOut : r.exitCode == 0 ? .succeeded : .failed
    }

    func refusal(_ error: AcquireError, _ context: ServeContext) -> Response {
        switch error {
        case let .queueFull(seconds):
            return refuse(.queueFull, 429, "the queue is full (\(configuration.pool.queueLimit) requests wait already, --queue): retry after \(seconds) s",
                          context, headers: [.retryAfter: "\(seconds)"])
        case .draining:
            return refuse(.draining, 503, "the service is shutting down: send the request to another instance", context,
                          headers: [.connection: "close"])
        case let .queueTimeout(seconds):
            metrics.run(.error)
            let message = "no sandbox became ready within \(Int(seconds)) s (--queue-timeout): the service is overloaded or its boots fail (see its log)"
            context.record.update {
                $0.outcome = .error
                $0.error = message
            }
            return Self.error(.serviceUnavailable, message, id: context.record.id, headers: [.retryAfter: "\(max(1, Int(seconds / 10)))"])
        case let .prepareFailed(cause):
            let message = "the sandbox for this request could not be made ready: \(cause)"
            metrics.run(.error)
            context.record.update {
                $0.outcome = .error
                $0.error = message
            }
            return Self.error(.internalServerError, message, id: context.record.id)
        case .cancelled:
            return answer(.cancelled, context)
        }
    }

    // MARK: - Streaming (Accept: application/x-ndjson)

    /// Waits for a sandbox first, so that refusals keep their status codes; then
    /// answers 200 and streams the run's events as they happen.
    func streamRoute(_ spec: RunSpec, _ context: ServeContext, _ connection: ConnectionState?) async -> Response {
        let acquired = await tracked(connection) { await self.pool.acquire(spec.config) }
        let lease: Lease
        switch acquired {
        case let .success(l): lease = l
        case let .failure(error): return refusal(error, context)
        }
        let holder = LeaseHolder(lease, pool: pool)
        let record = context.record
        record.update { $0.streaming = true }
        let body = ResponseBody { [self] writer in
            guard let lease = holder.take() else { return }
            let events = EventStream()
            let runTask = Task {
                let outcome = await self.run(spec, on: lease, record: record, events: events)
                self.finishStream(outcome, record: record, events: events)
            }
            let cancel: @Sendable () -> Void = { runTask.cancel() }
            let registration = runs.add(cancel)
            let watch = connection?.onClose(cancel)
            defer {
                runs.remove(registration)
                connection?.remove(watch)
            }
            do {
                while let event = await events.next() {
                    try await writer.write(ByteBuffer(bytes: event.line()))
                }
                try await writer.finish(nil)
            } catch {
                // The client is gone: its VM goes too.
                runTask.cancel()
                events.close()
                await runTask.value
                throw error
            }
            await runTask.value
        }
        return Response(status: .ok, headers: [.contentType: "application/x-ndjson", .cacheControl: "no-store"], body: body)
    }

    /// The last event of a stream: the receipt, or the error that ended the run.
    func finishStream(_ outcome: RunOutcome, record: RequestRecord, events: EventStream) {
        let id = record.id
        switch outcome {
        case let .receipt(receipt):
            let o = Self.outcome(of: receipt.result)
            metrics.run(o)
            record.update {
                $0.outcome = o
                $0.exitCode = receipt.result.exitCode
            }
            events.push(.exited(receipt), size: 0)
        case let .failed(message):
            metrics.run(.error)
            record.update {
                $0.outcome = .error
                $0.error = message
            }
            events.push(.error(status: 500, message: message, id: id), size: 0)
        case .cancelled, .refused:
            metrics.run(.cancelled)
            record.update { $0.outcome = .cancelled }
            events.push(.error(status: 503, message: "the run was stopped: the client went away or the service is shutting down", id: id), size: 0)
        }
        events.finish()
    }
}

/// A lease on its way to a streamed answer's body. If Hummingbird never writes that
/// body (the connection went first), the sandbox is still destroyed and its slot freed.
final class LeaseHolder: Sendable {
    private let lease: Mutex<Lease?>
    private let pool: SandboxPool

    init(_ lease: Lease, pool: SandboxPool) {
        self.lease = Mutex(lease)
        self.pool = pool
    }

    func take() -> Lease? { lease.withLock { $0.take() } }

    deinit {
        if let unused = lease.withLock({ $0.take() }) {
            let pool = self.pool
            Task { await pool.discard(unused) }
        }
    }
}

/// Output handlers for a streamed run: each stream's bytes, cut at UTF-8 boundaries, become events.
final class OutputRelay: Sendable {
    private let events: EventStream
    private let boundaries = Mutex<[String: UTF8Boundary]>([:])

    init(events: EventStream) { self.events = events }

    /// Called on the stream's own output thread, in order.
    func send(_ stream: String, _ bytes: [UInt8]) {
        let ready = boundaries.withLock { b -> [UInt8] in
            var boundary = b[stream] ?? UTF8Boundary()
            defer { b[stream] = boundary }
            return boundary.take(bytes)
        }
        guard !ready.isEmpty else { return }
        events.push(.output(stream: stream, bytes: ready), size: ready.count)
    }

    /// What is left of a cut character at the end of the run.
    func flush() {
        let rest = boundaries.withLock { b -> [(String, [UInt8])] in
            defer { b.removeAll() }
            return b.map { ($0.key, $0.value.flushed) }.filter { !$0.1.isEmpty }.sorted { $0.0 > $1.0 }
        }
        for (stream, bytes) in rest { events.push(.output(stream: stream, bytes: bytes), size: bytes.count) }
    }
}

extension UTF8Boundary {
    var flushed: [UInt8] {
        var copy = self
        return copy.flush()
    }
}

/// One log line per request (id, route, status, outcome, timings), a 503 for requests
/// that arrive while the service drains, errors as JSON, and 405 for a known path with
/// the wrong method.
struct RequestLogMiddleware: RouterMiddleware {
    typealias Context = ServeContext
    let server: AirlockServer

    func handle(_ request: Request, context: ServeContext, next: (Request, ServeContext) async throws -> Response) async throws -> Response {
        let start = monotonicNanoseconds()
        let id = server.nextRequestID()
        context.record.update { $0.id = id }
        let path = request.uri.path
        var response: Response
        if server.isDraining && path != ServeRoutes.health {
            server.metrics.refusal(.draining)
            if path == ServeRoutes.runs { server.metrics.run(.refused) }
            context.record.update {
                $0.outcome = .refused
                $0.error = "draining"
            }
            response = AirlockServer.error(.serviceUnavailable, "the service is shutting down: send the request to another instance", id: id,
                                           headers: [.connection: "close"])
        } else {
            do {
                response = try await next(request, context)
            } catch let error as HTTPError where error.status == .notFound {
                if let allowed = ServeRoutes.methods[path] {
                    let allow = allowed.map(\.rawValue).joined(separator: ", ")
                    response = AirlockServer.error(.methodNotAllowed, "\(request.method.rawValue) \(path) is not served: use \(allow)", id: id,
                                                   headers: [.allow: allow])
                } else {
                    response = AirlockServer.error(.notFound, "no route \(path): see /openapi.json", id: id)
                }
            } catch let error as any HTTPResponseError {
                response = AirlockServer.error(error.status, "\(error)", id: id)
            } catch {
                context.record.update { $0.error = "\(error)" }
                response = AirlockServer.error(.internalServerError, "the service failed: \(error)", id: id)
            }
        }
        response.headers[.init("X-Request-Id")!] = id
        let record = context.record
        let method = request.method.rawValue
        let status = response.status.code
        let logger = server.logger
        if record.value.closeAfter { response.headers[.connection] = "close" }
        guard record.value.streaming || record.value.closeAfter else {
            Self.log(logger, record.value, method: method, path: path, status: status, start: start)
            return response
        }
        let body = response.body
        let channel = context.channel
        response.body = ResponseBody(contentLength: body.contentLength) { writer in
            do {
                try await body.write(writer)
                Self.log(logger, record.value, method: method, path: path, status: status, start: start)
            } catch {
                Self.log(logger, record.value, method: method, path: path, status: status, start: start, writeError: "\(error)")
                throw error
            }
            // The rest of a refused body is not worth reading.
            if record.value.closeAfter { try? await channel.close() }
        }
        return response
    }

    static func log(_ logger: Logger, _ r: RequestRecord.Fields, method: String, path: String, status: Int, start: UInt64,
                    writeError: String? = nil) {
        var metadata: Logger.Metadata = [
            "id": "\(r.id)", "method": "\(method)", "path": "\(path)", "status": "\(status)",
            "ms": "\(Self.milliseconds(monotonicNanoseconds() &- start))",
        ]
        if let o = r.outcome { metadata["outcome"] = "\(o.rawValue)" }
        if let e = r.exitCode { metadata["exitCode"] = "\(e)" }
        if let p = r.fromPool { metadata["fromPool"] = "\(p)" }
        if let q = r.queueMs { metadata["queueMs"] = "\(Self.rounded(q))" }
        if let s = r.sandboxMs { metadata["sandboxMs"] = "\(Self.rounded(s))" }
        if let e = r.error { metadata["error"] = "\(e)" }
        if let writeError { metadata["writeError"] = "\(writeError)" }
        logger.info("request", metadata: metadata)
    }

    static func milliseconds(_ ns: UInt64) -> Double { rounded(Double(ns) / 1e6) }
    static func rounded(_ ms: Double) -> Double { (ms * 1000).rounded() / 1000 }
}

/// `Authorization: Bearer TOKEN` on every route but the health check, compared in
/// constant time (the time taken says nothing about how much of a guess was right).
struct BearerTokenMiddleware: RouterMiddleware {
    typealias Context = ServeContext
    let token: [UInt8]
    let metrics: ServeMetrics

    func handle(_ request: Request, context: ServeContext, next: (Request, ServeContext) async throws -> Response) async throws -> Response {
        if ServeRoutes.open.contains(request.uri.path) { return try await next(request, context) }
        let header = request.headers[.authorization] ?? ""
        guard let presented = Self.bearerCredentials(header), Self.constantTimeEqual(presented, token) else {
            metrics.refusal(.unauthorized)
            context.record.update {
                $0.outcome = .refused
                $0.error = "unauthorized"
            }
            let message = header.isEmpty ? "this service needs Authorization: Bearer TOKEN (the token in its --token-file)"
                                         : "the bearer token is not this service's"
            return AirlockServer.error(.unauthorized, message, id: context.record.id, headers: [.wwwAuthenticate: "Bearer"])
        }
        return try await next(request, context)
    }

    /// The credentials of `Bearer TOKEN` (the scheme's name in any case, RFC 9110), else nil.
    static func bearerCredentials(_ header: String) -> [UInt8]? {
        let bytes = Array(header.utf8)
        let scheme = Array("bearer".utf8)
        guard bytes.count > scheme.count + 1, bytes[scheme.count] == UInt8(ascii: " "),
              zip(bytes, scheme).allSatisfy({ $0 | 0x20 == $1 })  // ASCII letters only: | 0x20 lowercases them
        else { return nil }
        return Array(bytes[(scheme.count + 1)...].drop { $0 == UInt8(ascii: " ") })
    }

    /// Equal bytes, in time that depends on the lengths only.
    static func constantTimeEqual(_ presented: [UInt8], _ expected: [UInt8]) -> Bool {
        var difference = UInt8(truncatingIfNeeded: presented.count ^ expected.count)
        difference |= UInt8(presented.count == expected.count ? 0 : 1)
        for i in 0..<expected.count {
            let p = i < presented.count ? presented[i] : 0
            difference |= p ^ expected[i]
        }
        return difference == 0
    }
}

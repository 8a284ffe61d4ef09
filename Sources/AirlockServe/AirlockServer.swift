import Airlock
import AirlockOS
import FoundationEssentials
import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import ServiceLifecycle
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Everything `airlock serve` is told on its command line.
public struct ServeConfiguration: Sendable {
    public var listen: ListenAddress
    /// Requests must carry `Authorization: Bearer TOKEN` (all routes but /v1/health); nil: no token.
    public var token: String?
    public var pool: PoolSettings
    public var limits = RequestLimits()
    /// How long in-flight requests may take to finish after SIGTERM before their VMs are stopped.
    public var drainTimeoutSeconds = 30.0
    /// The Unix socket's file mode (who may connect).
    public var socketMode: UInt32 = 0o600
    /// Keep-alive connections idle this long are closed.
    public var idleTimeoutSeconds: Int64 = 120
    /// Open connections at most; beyond it the service stops accepting until one closes.
    public var maxConnections = 256

    public init(listen: ListenAddress, token: String?, pool: PoolSettings) {
        self.listen = listen
        self.token = token
        self.pool = pool
    }

    /// Refuses combinations that cannot work, naming the option.
    func validate() throws(ServeSetupError) {
        guard pool.size >= 0 else { throw .invalid("--pool \(pool.size) is negative: give 0 or more sandboxes") }
        guard pool.maxConcurrent >= 1 else { throw .invalid("--max-concurrent \(pool.maxConcurrent): give at least 1") }
        guard pool.size <= pool.maxConcurrent else {
            throw .invalid("--pool \(pool.size) is more than --max-concurrent \(pool.maxConcurrent): the pool's VMs count towards it; raise --max-concurrent or lower --pool")
        }
        guard pool.queueLimit >= 0 else { throw .invalid("--queue \(pool.queueLimit) is negative: give 0 or more") }
        guard pool.queueTimeoutSeconds > 0 else { throw .invalid("--queue-timeout must be a positive number of seconds") }
        guard drainTimeoutSeconds >= 0 else { throw .invalid("--drain-timeout must be 0 or more seconds") }
        guard maxConnections >= 1 else { throw .invalid("--max-connections \(maxConnections): give at least 1") }
        guard limits.maxBodyBytes > 0 else { throw .invalid("--max-body must be at least 1 byte") }
        guard limits.defaultTimeoutSeconds > 0, limits.defaultTimeoutSeconds <= limits.maxTimeoutSeconds else {
            throw .invalid("--timeout \(limits.defaultTimeoutSeconds) must be positive and at most --max-timeout \(limits.maxTimeoutSeconds)")
        }
        guard limits.maxOutputBytes >= 0, limits.maxOutputBytes <= Command.captureLimit else {
            throw .invalid("--max-output \(limits.maxOutputBytes) bytes: give at most \(Command.captureLimit >> 20) MiB, the most a sandbox keeps of a stream")
        }
        guard limits.maxMemoryMiB >= 32 else { throw .invalid("--max-memory \(limits.maxMemoryMiB) MiB: give at least 32") }
        guard pool.config.memoryMiB <= limits.maxMemoryMiB else {
            throw .invalid("--memory \(pool.config.memoryMiB) MiB is more than --max-memory \(limits.maxMemoryMiB) MiB")
        }
        if let token {
            guard token.utf8.count >= 16 else {
                throw .invalid("the token is \(token.utf8.count) bytes: use at least 16 (e.g. openssl rand -hex 32 > TOKEN_FILE)")
            }
        }
    }
}

/// `airlock serve`: an HTTP/1.1 service (Hummingbird) that runs each `POST /v1/runs`
/// in a sandbox of its own, from a warm pool where one is ready (docs/serve.md).
public final class AirlockServer: Sendable {
    public let configuration: ServeConfiguration
    public let metrics = ServeMetrics()
    let provider: any SandboxProvider
    let pool: SandboxPool
    let runs = RunRegistry()
    let logger: Logger
    private let draining = Atomic<Bool>(false)
    private let requestCounter = Atomic<UInt64>(0)
    /// Unique across restarts, so log lines of two runs of the service never share ids.
    let idPrefix: String
    private let state = Mutex<(group: ServiceGroup?, deadline: Task<Void, Never>?, socket: (dev: UInt64, ino: UInt64)?)>((nil, nil, nil))

    public init(configuration: ServeConfiguration, provider: any SandboxProvider,
                logger: Logger = Logger(label: "airlock.serve")) throws(ServeSetupError) {
        try configuration.validate()
        self.configuration = configuration
        self.provider = provider
        self.logger = logger
        pool = SandboxPool(settings: configuration.pool, provider: provider, metrics: metrics, logger: logger)
        idPrefix = String(UInt32.random(in: 0...UInt32.max), radix: 16)
    }

    var isDraining: Bool { draining.load(ordering: .relaxed) }

    func nextRequestID() -> String {
        let n = requestCounter.add(1, ordering: .relaxed).newValue
        return "\(idPrefix)-\(n)"
    }

    /// Runs the service until a graceful shutdown (SIGTERM or SIGINT when `handlingSignals`, or `shutdown()`) has
    /// drained it: no new requests, in-flight ones finished (or stopped after
    /// --drain-timeout), the pool destroyed. `onListening` gets the address once it is bound
    /// (`http://127.0.0.1:PORT` with the real port, or `unix:PATH`).
    public func run(handlingSignals: Bool = true,
                    onListening: @escaping @Sendable (String) async -> Void = { _ in }) async throws {
        do {
            try provider.preflight(configuration.pool.config)
        } catch {
            throw ServeSetupError.invalid("the pool's sandboxes cannot boot: \(error)")
        }
        let bind: BindAddress
        // A Unix socket is bound in a new directory only this user can enter, given its
        // --socket-mode there, and renamed into place: nobody can connect before the mode is
        // set, and the process umask (which every thread shares) is never changed.
        let privateDirectory: String?
        switch configuration.listen {
        case let .tcp(host, port):
            bind = .hostname(host, port: port)
            privateDirectory = nil
        case let .unix(path):
            try Self.checkSocketPath(path)
            let directory = try Self.privateDirectory(beside: path)
            privateDirectory = directory
            bind = .unixDomainSocket(path: directory + "/s")
        }
        let app = Application(
            router: makeRouter(),
            server: .http1(configuration: .init(additionalChannelHandlers: [ConnectionWatcher()],
                                                idleTimeout: .seconds(configuration.idleTimeoutSeconds))),
            configuration: .init(address: bind, serverName: nil,
                                 availableConnectionsDelegate: MaximumAvailableConnections(configuration.maxConnections, logger: logger)),
            onServerRunning: { [self] channel in
                let address: String
                switch configuration.listen {
                case .tcp:
                    let port = channel.localAddress?.port ?? 0
                    let host = channel.localAddress?.ipAddress ?? "127.0.0.1"
                    address = host.contains(":") ? "http://[\(host)]:\(port)" : "http://\(host):\(port)"
                case let .unix(path):
                    if let privateDirectory {
                        let bound = privateDirectory + "/s"
                        if chmod(bound, mode_t(configuration.socketMode)) != 0 || rename(bound, path) != 0 {
                            logger.error("cannot put the socket at \(path): \(String(cString: strerror(errno)))")
                        }
                        rmdir(privateDirectory)
                    }
                    var st = stat()
                    if stat(path, &st) == 0 { state.withLock { $0.socket = (UInt64(st.st_dev), UInt64(st.st_ino)) } }
                    address = "unix:\(path)"
                }
                logger.notice("listening", metadata: [
                    "address": "\(address)", "pool": "\(configuration.pool.size)",
                    "maxConcurrent": "\(configuration.pool.maxConcurrent)", "queue": "\(configuration.pool.queueLimit)",
                    "token": "\(configuration.token != nil)",
                ])
                await onListening(address)
            },
            logger: logger)

        var groupConfiguration = ServiceGroupConfiguration(
            services: [PoolService(server: self), app, DrainTrigger(server: self)],
            gracefulShutdownSignals: handlingSignals ? [.sigterm, .sigint] : [], cancellationSignals: [], logger: logger)
        // The drain is bounded by --drain-timeout; past that and a margin, ServiceLifecycle cancels everything.
        groupConfiguration.maximumGracefulShutdownDuration = Duration.seconds(configuration.drainTimeoutSeconds + 60)
        let group = ServiceGroup(configuration: groupConfiguration)
        state.withLock { $0.group = group }
        defer {
            if let privateDirectory {
                unlink(privateDirectory + "/s")  // only if it never got renamed into place
                rmdir(privateDirectory)
            }
            removeOwnSocket()
            state.withLock { s in
                s.deadline?.cancel()
                s.group = nil
            }
        }
        try await group.run()
        logger.notice("stopped", metadata: ["runs": "\(requestCounter.load(ordering: .relaxed))"])
    }

    /// Starts the same graceful drain as SIGTERM.
    public func shutdown() async {
        let group = state.withLock { $0.group }
        await group?.triggerGracefulShutdown()
    }

    /// The first step of a drain: new requests are refused, the pool stops refilling,
    /// and a deadline stops whatever still runs after --drain-timeout.
    func beginDrain() async {
        guard !draining.exchange(true, ordering: .relaxed) else { return }
        logger.notice("draining", metadata: ["inFlight": "\(runs.count)", "timeoutSeconds": "\(configuration.drainTimeoutSeconds)"])
        await pool.beginDrain()
        let seconds = configuration.drainTimeoutSeconds
        let deadline = Task { [self] in
            try? await Task.sleep(for: .seconds(seconds))
            guard !Task.isCancelled else { return }
            let stopping = runs.count
            if stopping > 0 { logger.warning("drain timeout: stopping \(stopping) runs still in flight", metadata: ["timeoutSeconds": "\(seconds)"]) }
            runs.cancelAll()
            await pool.abort()
        }
        state.withLock { $0.deadline = deadline }
    }

    /// A Unix socket path must be free, or a socket nobody listens on (left by a
    /// killed service; the bind replaces it). A live one belongs to another server.
    static func checkSocketPath(_ path: String) throws(ServeSetupError) {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        guard st.st_mode & S_IFMT == S_IFSOCK else {
            throw .invalid("--listen unix:\(path): the path exists and is not a socket; remove it or choose another path")
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            let bytes = Array(path.utf8.prefix(raw.count - 1))
            raw.copyBytes(from: bytes)
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if connected == 0 {
            throw .invalid("--listen unix:\(path): another server is listening on it; stop it or choose another path")
        }
    }

    /// A new directory (mode 0700) in the socket's own directory, so that the rename into
    /// place stays on one file system.
    static func privateDirectory(beside path: String) throws(ServeSetupError) -> String {
        let parent = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        var template = Array((parent.isEmpty ? "/" : parent + "/") .utf8CString.dropLast()) + Array(".airlock-serve-XXXXXX".utf8CString)
        guard template.count - 1 + 2 < 108 else {
            throw .invalid("--listen unix:\(path): the socket's directory is too long a path for a Unix socket (bound first in a new directory there, the directory path must be under 84 bytes); choose a shorter path")
        }
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw .invalid("--listen unix:\(path): cannot create a directory in \(parent) (\(String(cString: strerror(errno)))); choose a directory this user can write")
        }
        return String(cString: made)
    }

    /// Removes the socket file if it is still the one this service bound.
    private func removeOwnSocket() {
        guard case let .unix(path) = configuration.listen, let own = state.withLock({ $0.socket }) else { return }
        var st = stat()
        if stat(path, &st) == 0, UInt64(st.st_dev) == own.dev, UInt64(st.st_ino) == own.ino { unlink(path) }
    }
}

/// Keeps the pool for the service's lifetime; shut down last, it destroys every VM left.
struct PoolService: Service {
    let server: AirlockServer
    func run() async throws {
        await server.pool.start()
        try? await gracefulShutdown()
        await server.pool.beginDrain()
        await server.pool.waitUntilEmpty()
        server.logger.notice("pool destroyed")
    }
}

/// Shut down first (ServiceLifecycle stops services in reverse order): starts the drain
/// before Hummingbird stops accepting and waits for the requests in flight.
struct DrainTrigger: Service {
    let server: AirlockServer
    func run() async throws {
        try? await gracefulShutdown()
        await server.beginDrain()
    }
}

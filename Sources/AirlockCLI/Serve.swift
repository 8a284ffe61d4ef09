import Airlock
import AirlockOS
import AirlockServe
import ArgumentParser
import Dispatch
import FoundationEssentials
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run commands sent over HTTP, each in a fresh micro-VM, from a warm pool.",
        discussion: """
            POST /v1/runs with {"argv": [...], "env": {...}, "workdir", "user", "stdin" or "stdinBase64", \
            "timeoutSeconds", "maxOutputBytes", "memoryMiB"} runs the command in a sandbox of its own and \
            answers with the receipt of 'airlock run --json' plus id, fromPool, queueMs and sandboxMs; with \
            Accept: application/x-ndjson the answer streams events (started, stdout, stderr, exited). \
            GET /v1/health, GET /metrics (Prometheus text), GET /openapi.json. See docs/serve.md.

            --pool sandboxes are kept booted; each serves exactly one request and is destroyed, and the \
            pool refills in the background. --max-concurrent bounds the VMs alive at once (the pool's \
            included); up to --queue requests wait for one, beyond that the answer is 429 with Retry-After.

            On TCP every route but /v1/health needs Authorization: Bearer TOKEN, the contents of \
            --token-file; --allow-no-token drops that (with a warning on a non-loopback address). A Unix \
            socket is protected by its file mode (--socket-mode, default 600) instead.

            SIGTERM or SIGINT drains: no new requests, those in flight finish (their VMs are stopped \
            after --drain-timeout), the pool is destroyed, and the process exits 0. A killed service \
            leaves its Unix socket file, which the next start replaces.

            One log line per request on stderr (id, method, path, status, outcome, ms, queueMs, \
            sandboxMs, fromPool, exitCode) at level info.
            """)

    @Option(help: "Where to listen: HOST:PORT (127.0.0.1:8080, [::1]:8080, 0.0.0.0:8080; port 0 picks a free one) or unix:PATH.")
    var listen: String

    @Option(help: "A file holding the bearer token requests must carry (at least 16 bytes; e.g. openssl rand -hex 32 > FILE).")
    var tokenFile: String?

    @Flag(help: "Listen on TCP without a token: anyone who can reach the address can run VMs.")
    var allowNoToken = false

    @Option(help: "Sandboxes kept ready (each serves one request, then the pool refills): restored from the snapshot store's file for --memory and the images, saved at the start when there is none.")
    var pool: Int = 1

    @Flag(help: "Boot every sandbox from the kernel instead of restoring a snapshot.")
    var noSnapshot = false

    @Option(help: "VMs alive at once, in every state (booting, ready, running).")
    var maxConcurrent: Int = 4

    @Option(help: "Requests that may wait for a sandbox; beyond that, 429 with Retry-After.")
    var queue: Int = 32

    @Option(help: "Seconds a request may wait for a sandbox before a 503.")
    var queueTimeout: Double = 300

    @Option(help: "Guest memory of the pool's sandboxes (MiB, or 512M, 1G); a request asking for other memoryMiB gets a VM of its own.")
    var memory: String = "256"

    @Option(help: "The most guest memory a request may ask for.")
    var maxMemory: String = "2G"

    @Option(help: "The largest request body (stdin travels in it); beyond it, 413.")
    var maxBody: String = "8M"

    @Option(help: "Output kept per stream: the default and the most a request's maxOutputBytes may be.")
    var maxOutput: String = "16M"

    @Option(help: "Seconds a command may run when its request names no timeoutSeconds.")
    var timeout: Double = 60

    @Option(help: "The most timeoutSeconds a request may ask for.")
    var maxTimeout: Double = 900

    @Option(help: "Seconds a guest may take to boot to its agent.")
    var bootTimeout: Double = 300

    @Option(help: "Seconds in-flight requests get to finish after SIGTERM before their VMs are stopped.")
    var drainTimeout: Double = 30

    @Option(help: "Open connections at most; beyond that the service stops accepting until one closes.")
    var maxConnections: Int = 256

    @Option(help: "The Unix socket's file mode, in octal.")
    var socketMode: String = "600"

    @Option(help: "The guest kernel. Default: the installed image (make images).")
    var kernel: String?

    @Option(help: "The root filesystem (ext4 with Airlock's agent). Default: the installed image.")
    var rootfs: String?

    @Option(help: "Extra kernel command-line parameters.")
    var cmdline: String = ""

    @Option(help: .hidden)
    var testProvider: String?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical (default: info, or $AIRLOCK_LOG).")
    var logLevel: String?

    func validate() throws {
        _ = try listenAddress()
        _ = try cli(SizeArgument.mebibytes(memory, option: "--memory"))
        _ = try cli(SizeArgument.mebibytes(maxMemory, option: "--max-memory"))
        _ = try cli(SizeArgument.bytes(maxBody, option: "--max-body"))
        _ = try cli(SizeArgument.bytes(maxOutput, option: "--max-output"))
        guard UInt32(socketMode, radix: 8).map({ $0 <= 0o777 }) == true else {
            throw ValidationError("--socket-mode '\(socketMode)' is not an octal file mode (e.g. 600 or 660)")
        }
        if let testProvider, testProvider != "scripted" {
            throw ValidationError("--test-provider '\(testProvider)': only 'scripted' exists")
        }
    }

    func run() throws {
        let level = logLevel ?? ImageStore.processEnvironment()["AIRLOCK_LOG"] ?? "info"
        guard let logLevelValue = Logger.Level(rawValue: level) else {
            throw ValidationError("--log-level '\(level)' is not a level: use trace, debug, info, notice, warning, error or critical")
        }
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = logLevelValue
            return h
        }
        let address = try listenAddress()
        var token: String?
        if let tokenFile {
            token = try Self.readToken(tokenFile)
        } else if case .tcp = address, !allowNoToken {
            throw ValidationError("--listen \(address) is TCP: give --token-file FILE (requests then need Authorization: Bearer TOKEN), or --allow-no-token to serve without one")
        }
        if token == nil, case .tcp = address, !address.isLoopback {
            printError("airlock serve: WARNING: listening on \(address), which is not a loopback address, without a token: anyone who can reach it can run VMs on this host (use --token-file)")
        }

        var sandbox = SandboxConfig(kernelPath: kernel, rootfsPath: rootfs,
                                    memoryMiB: try cli(SizeArgument.mebibytes(memory, option: "--memory")))
        sandbox.bootTimeoutSeconds = bootTimeout
        sandbox.extraKernelCommandLine = cmdline
        var configuration = ServeConfiguration(
            listen: address, token: token,
            pool: PoolSettings(config: sandbox, size: pool, maxConcurrent: maxConcurrent, queueLimit: queue,
                               queueTimeoutSeconds: queueTimeout))
        configuration.limits.maxBodyBytes = try cli(SizeArgument.bytes(maxBody, option: "--max-body"))
        configuration.limits.maxOutputBytes = try cli(SizeArgument.bytes(maxOutput, option: "--max-output"))
        configuration.limits.maxMemoryMiB = try cli(SizeArgument.mebibytes(maxMemory, option: "--max-memory"))
        configuration.limits.defaultTimeoutSeconds = timeout
        configuration.limits.maxTimeoutSeconds = maxTimeout
        configuration.drainTimeoutSeconds = drainTimeout
        configuration.maxConnections = maxConnections
        configuration.socketMode = UInt32(socketMode, radix: 8) ?? 0o600

        let sandboxLogger = Logger(label: "airlock.sandbox")
        let provider: any SandboxProvider = testProvider == "scripted" ? ScriptedSandboxProvider(bootDelay: .milliseconds(1))
            : noSnapshot ? BootingSandboxProvider(logger: sandboxLogger) as any SandboxProvider : RestoringSandboxProvider(logger: sandboxLogger)
        let server: AirlockServer
        do {
            server = try AirlockServer(configuration: configuration, provider: provider)
        } catch {
            throw ValidationError(error.description)
        }
        do {
            try Self.blocking {
                try await server.run { address in
                    // One line on stdout for scripts (with the real port when --listen gave 0).
                    let line = Array("airlock serve: listening on \(address)\n".utf8)
                    line.withUnsafeBytes { _ = try? AirlockOS.writeAll(fd: 1, $0) }
                }
            }
        } catch let error as ServeSetupError {
            printError("airlock serve: \(error)")
            throw ExitCode(ExitStatus.airlockFailed)
        } catch {
            printError("airlock serve: \(error)")
            throw ExitCode(1)
        }
    }

    func listenAddress() throws -> ListenAddress {
        do { return try ListenAddress.parse(listen) } catch { throw ValidationError(error.description) }
    }

    /// The token in `path`, without a trailing newline; a file others can read gets a warning.
    static func readToken(_ path: String) throws -> String {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ValidationError("--token-file \(path) cannot be read: check the path (create one with: openssl rand -hex 32 > \(path); chmod 600 \(path))")
        }
        var st = stat()
        if stat(path, &st) == 0, st.st_mode & 0o077 != 0 {
            printError("airlock serve: WARNING: --token-file \(path) is readable by others (mode \(String(st.st_mode & 0o777, radix: 8))): chmod 600 \(path)")
        }
        let text = String(decoding: data, as: UTF8.self)
        let token = String(text.reversed().drop { $0 == "\n" || $0 == "\r" || $0 == " " || $0 == "\t" }.reversed())
        guard !token.isEmpty, !token.contains("\n") else {
            throw ValidationError("--token-file \(path) must hold one line, the token")
        }
        return token
    }

    /// Runs async work from this (the main) thread and waits for it; the work runs on
    /// Swift concurrency's threads, which this thread is not one of.
    static func blocking(_ work: @escaping @Sendable () async throws -> Void) throws {
        let done = DispatchSemaphore(value: 0)
        let outcome = Mutex<(any Error)?>(nil)
        Task {
            do { try await work() } catch { outcome.withLock { $0 = error } }
            done.signal()
        }
        done.wait()
        if let error = outcome.withLock({ $0 }) { throw error }
    }
}

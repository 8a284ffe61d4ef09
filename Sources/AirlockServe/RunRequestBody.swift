import Airlock
import FoundationEssentials

/// The service's limits on what one request may ask for.
public struct RequestLimits: Sendable {
    /// The largest request body (413 beyond it). Stdin travels in the body.
    public var maxBodyBytes = 8 << 20
    /// The most output kept per stream, and the default when a request gives none.
    public var maxOutputBytes = 16 << 20
    /// The timeout a request gets when it names none, and the most it may name.
    public var defaultTimeoutSeconds = 60.0
    public var maxTimeoutSeconds = 900.0
    /// The most guest memory a request may ask for.
    public var maxMemoryMiB = 2048
    public init() {}
}

/// A request that cannot be served as asked: 400 (or 413), naming the field.
struct RequestError: Error, Sendable {
    let status: Int
    let message: String
    let field: String?

    static func field(_ field: String, _ message: String) -> RequestError {
        RequestError(status: 400, message: "\(field): \(message)", field: field)
    }
}

/// What a run request becomes: the command and the machine to run it on.
struct RunSpec: Sendable {
    var command: Command
    var config: SandboxConfig
}

/// The body of `POST /v1/runs`. Every field is checked for its type and range here,
/// and unknown fields are refused: a typo (`timeout` for `timeoutSeconds`) must not
/// silently run a command without the limit its caller meant.
struct RunRequestBody: Decodable {
    /// Every field a body may have, as docs/serve.md and /openapi.json list them.
    static let fields = ["argv", "env", "workdir", "user", "stdin", "stdinBase64", "timeoutSeconds", "maxOutputBytes", "memoryMiB"]

    /// What each field must be, for the error that names it.
    static let expected: [String: String] = [
        "argv": "an array of strings, the program first (e.g. [\"sh\", \"-c\", \"echo hi\"])",
        "env": "an object of string values (e.g. {\"NAME\": \"value\"})",
        "workdir": "a string, the working directory in the guest",
        "user": "a string: NAME, UID, NAME:GROUP or UID:GID",
        "stdin": "a string, the command's input as text",
        "stdinBase64": "a string, the command's input as base64",
        "timeoutSeconds": "a number of seconds",
        "maxOutputBytes": "a whole number of bytes",
        "memoryMiB": "a whole number of MiB",
    ]

    var argv: [String]
    var env: [String: String]?
    var workdir: String?
    var user: String?
    var stdin: String?
    var stdinBase64: String?
    var timeoutSeconds: Double?
    // Whole numbers, read as Double: FoundationEssentials' decoder reports 1.5 for an Int as
    // "not valid JSON" with no field, where this names the field.
    var maxOutputBytes: Double?
    var memoryMiB: Double?

    private enum Keys: String, CodingKey {
        case argv, env, workdir, user, stdin, stdinBase64, timeoutSeconds, maxOutputBytes, memoryMiB
    }

    private struct AnyKey: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    init(from decoder: any Decoder) throws {
        let all = try decoder.container(keyedBy: AnyKey.self)
        if let unknown = all.allKeys.map(\.stringValue).sorted().first(where: { !Self.fields.contains($0) }) {
            throw RequestError.field(unknown, "unknown field: a run request has \(Self.fields.joined(separator: ", "))")
        }
        let c = try decoder.container(keyedBy: Keys.self)
        argv = try c.decode([String].self, forKey: .argv)
        env = try c.decodeIfPresent([String: String].self, forKey: .env)
        workdir = try c.decodeIfPresent(String.self, forKey: .workdir)
        user = try c.decodeIfPresent(String.self, forKey: .user)
        stdin = try c.decodeIfPresent(String.self, forKey: .stdin)
        stdinBase64 = try c.decodeIfPresent(String.self, forKey: .stdinBase64)
        timeoutSeconds = try c.decodeIfPresent(Double.self, forKey: .timeoutSeconds)
        maxOutputBytes = try c.decodeIfPresent(Double.self, forKey: .maxOutputBytes)
        memoryMiB = try c.decodeIfPresent(Double.self, forKey: .memoryMiB)
    }

    /// Decodes and checks a body; every failure names the field and what it must be.
    static func parse(_ body: [UInt8], limits: RequestLimits, base: SandboxConfig) throws(RequestError) -> RunSpec {
        let decoded: RunRequestBody
        do {
            decoded = try JSONDecoder().decode(RunRequestBody.self, from: Data(body))
        } catch let error as RequestError {
            throw error
        } catch let error as DecodingError {
            throw describe(error)
        } catch {
            throw RequestError(status: 400, message: "the body could not be read as JSON: \(error)", field: nil)
        }
        return try decoded.spec(limits: limits, base: base)
    }

    /// `argv[2]`, `env.NAME`: where in the body a decoding error is.
    static func path(_ codingPath: [any CodingKey]) -> String {
        var out = ""
        for key in codingPath {
            if let index = key.intValue { out += "[\(index)]" } else { out += out.isEmpty ? key.stringValue : "." + key.stringValue }
        }
        return out
    }

    static func describe(_ error: DecodingError) -> RequestError {
        switch error {
        case let .keyNotFound(key, context):
            let field = path(context.codingPath + [key])
            return .field(field, "missing: give \(expected[key.stringValue] ?? "it")")
        case let .typeMismatch(_, context), let .valueNotFound(_, context):
            guard let top = context.codingPath.first?.stringValue else {
                return RequestError(status: 400, message: "the body must be a JSON object (e.g. {\"argv\": [\"true\"]})", field: nil)
            }
            let field = path(context.codingPath)
            return .field(field, "wrong type: \(field == top ? "" : top + " must be ")\(expected[top] ?? "see docs/serve.md")")
        case let .dataCorrupted(context):
            guard let top = context.codingPath.first?.stringValue else {
                let detail = context.underlyingError.map { "\($0)" } ?? context.debugDescription
                return RequestError(status: 400, message: "the body is not valid JSON: \(detail)", field: nil)
            }
            let field = path(context.codingPath)
            return .field(field, "not valid: \(field == top ? "" : top + " must be ")\(expected[top] ?? "see docs/serve.md")")
        @unknown default:
            return RequestError(status: 400, message: "the body could not be decoded: \(error)", field: nil)
        }
    }

    /// POSIX's portable names (what `airlock run --env` accepts too).
    static func isPortableName(_ name: String) -> Bool {
        guard let first = name.utf8.first, !(UInt8(ascii: "0")...UInt8(ascii: "9")).contains(first) else { return false }
        return name.utf8.allSatisfy { b in
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(b) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(b)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b) || b == UInt8(ascii: "_")
        }
    }

    /// `value` as an Int when it is a whole number in Int's range.
    static func whole(_ value: Double) -> Int? {
        guard value.isFinite, value == value.rounded(), abs(value) < 9e15 else { return nil }
        return Int(value)
    }

    /// The checks past the types: ranges, names, the one-of-two stdin.
    func spec(limits: RequestLimits, base: SandboxConfig) throws(RequestError) -> RunSpec {
        guard let program = argv.first, !program.isEmpty else {
            throw .field("argv", "empty: give the program and its arguments, e.g. [\"sh\", \"-c\", \"echo hi\"]")
        }
        var command = Command(argv)
        for (name, value) in (env ?? [:]).sorted(by: { $0.key < $1.key }) {
            guard Self.isPortableName(name) else {
                throw .field("env.\(name)", "not a usable variable name: use letters, digits and '_', not starting with a digit")
            }
            command.environment.append((name, value))
        }
        if let workdir {
            guard workdir.hasPrefix("/") else {
                throw .field("workdir", "'\(workdir)' is not an absolute path: give the guest directory from / (e.g. /tmp)")
            }
            command.workingDirectory = workdir
        }
        if let user { command.user = user }
        switch (stdin, stdinBase64) {
        case (.some, .some):
            throw .field("stdinBase64", "give stdin (text) or stdinBase64 (bytes), not both")
        case let (text?, nil):
            command.stdin = .bytes(Array(text.utf8))
        case let (nil, encoded?):
            guard let data = Data(base64Encoded: encoded) else {
                throw .field("stdinBase64", "not valid base64 (RFC 4648, with padding)")
            }
            command.stdin = .bytes(Array(data))
        case (nil, nil):
            break
        }
        let timeout = timeoutSeconds ?? limits.defaultTimeoutSeconds
        guard timeout.isFinite, timeout > 0, timeout <= limits.maxTimeoutSeconds else {
            throw .field("timeoutSeconds", "\(timeout) is out of range: give more than 0 and at most \(limits.maxTimeoutSeconds) seconds")
        }
        command.timeoutSeconds = timeout
        var maxOutput = limits.maxOutputBytes
        if let maxOutputBytes {
            guard let whole = Self.whole(maxOutputBytes), whole >= 0, whole <= limits.maxOutputBytes else {
                throw .field("maxOutputBytes", "\(maxOutputBytes) is not a whole number from 0 to \(limits.maxOutputBytes) bytes (this service's --max-output)")
            }
            maxOutput = whole
        }
        command.maxOutputBytes = maxOutput
        var config = base
        if let memoryMiB {
            guard let whole = Self.whole(memoryMiB), whole >= 32, whole <= limits.maxMemoryMiB, whole % 2 == 0 else {
                throw .field("memoryMiB", "\(memoryMiB) is not an even whole number of MiB from 32 to \(limits.maxMemoryMiB) (this service's --max-memory)")
            }
            config.memoryMiB = whole
        }
        return RunSpec(command: command, config: config)
    }
}

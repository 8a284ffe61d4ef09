import Airlock
import FoundationEssentials

/// The answer to `POST /v1/runs`: `airlock run --json`'s document (every key, null
/// where absent), plus what the service adds.
struct Receipt: Encodable, Sendable {
    let result: RunResult
    /// The request's id (also in the X-Request-Id header and the log line).
    let id: String
    /// The sandbox was ready before the request arrived (a warm start, no boot on its path).
    let fromPool: Bool
    /// Time waiting for a sandbox: a free slot, then a ready VM (a boot when none was).
    let queueMs: Double
    /// Time in the sandbox: handing it the command to the VM's end.
    let sandboxMs: Double

    /// The keys the service adds to the `airlock run --json` document.
    static let serviceKeys = ["id", "fromPool", "queueMs", "sandboxMs"]

    private enum ServiceKeys: String, CodingKey { case id, fromPool, queueMs, sandboxMs }

    func encode(to encoder: any Encoder) throws {
        // The same keyed container: the run's keys and these land in one object.
        try RunReport(result).encode(to: encoder)
        var c = encoder.container(keyedBy: ServiceKeys.self)
        try c.encode(id, forKey: .id)
        try c.encode(fromPool, forKey: .fromPool)
        try c.encode(queueMs, forKey: .queueMs)
        try c.encode(sandboxMs, forKey: .sandboxMs)
    }
}

/// One line of an `application/x-ndjson` answer.
enum RunEvent: Sendable {
    /// The request has its sandbox; the command is being started in it.
    case started(id: String, fromPool: Bool, queueMs: Double)
    /// Output as it arrives; `text` is the bytes as UTF-8 (U+FFFD for bad bytes),
    /// and `base64` the exact bytes when they are not valid UTF-8.
    case output(stream: String, bytes: [UInt8])
    /// The end: the receipt (its stdout and stderr empty, since they were streamed).
    case exited(Receipt)
    /// Airlock failed after the answer began (the status line said 200 already).
    case error(status: Int, message: String, id: String)

    static let names = ["started", "stdout", "stderr", "exited", "error"]

    private struct Started: Encodable { let event = "started"; let id: String; let fromPool: Bool; let queueMs: Double }
    private struct Output: Encodable {
        let event: String
        let text: String
        let base64: String?
        // Explicit so that a nil base64 is written as null: readers see every key.
        enum CodingKeys: String, CodingKey { case event, text, base64 }
        func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(event, forKey: .event)
            try c.encode(text, forKey: .text)
            try c.encode(base64, forKey: .base64)
        }
    }
    private struct Exited: Encodable {
        let receipt: Receipt
        enum Keys: String, CodingKey { case event }
        func encode(to encoder: any Encoder) throws {
            try receipt.encode(to: encoder)
            var c = encoder.container(keyedBy: Keys.self)
            try c.encode("exited", forKey: .event)
        }
    }
    private struct Failure: Encodable { let event = "error"; let status: Int; let error: String; let id: String }

    /// The event as one line of JSON, newline included.
    func line() -> [UInt8] {
        var bytes: [UInt8]
        switch self {
        case let .started(id, fromPool, queueMs): bytes = JSON.encode(Started(id: id, fromPool: fromPool, queueMs: queueMs))
        case let .output(stream, data):
            let text = String(decoding: data, as: UTF8.self)
            let exact = String(validating: data, as: UTF8.self) != nil
            bytes = JSON.encode(Output(event: stream, text: text, base64: exact ? nil : Data(data).base64EncodedString()))
        case let .exited(receipt): bytes = JSON.encode(Exited(receipt: receipt))
        case let .error(status, message, id): bytes = JSON.encode(Failure(status: status, error: message, id: id))
        }
        bytes.append(UInt8(ascii: "\n"))
        return bytes
    }
}

/// Splits a byte stream at UTF-8 character boundaries: a multi-byte character cut
/// by a chunk boundary waits for the rest, so each event's text is exact.
struct UTF8Boundary {
    private var pending: [UInt8] = []

    /// The bytes to send now; an incomplete character at the end is kept for the next call.
    mutating func take(_ bytes: [UInt8]) -> [UInt8] {
        var all = pending
        all.append(contentsOf: bytes)
        let keep = Self.incompleteTail(all)
        pending = Array(all.suffix(keep))
        all.removeLast(keep)
        return all
    }

    /// Whatever is left at the end of the stream (a truncated character, sent as it is).
    mutating func flush() -> [UInt8] {
        defer { pending = [] }
        return pending
    }

    /// How many bytes at the end start a character whose remaining bytes have not arrived.
    static func incompleteTail(_ bytes: [UInt8]) -> Int {
        var index = bytes.count - 1
        var continuations = 0
        while index >= 0, continuations < 4 {
            let byte = bytes[index]
            if byte & 0xC0 == 0x80 {
                continuations += 1
                index -= 1
                continue
            }
            let length = byte >= 0xF0 ? 4 : byte >= 0xE0 ? 3 : byte >= 0xC0 ? 2 : 1
            let have = bytes.count - index
            return have < length ? have : 0
        }
        return 0
    }
}

/// JSON out, as the service writes it: compact, keys sorted, slashes as they are.
enum JSON {
    static func encode(_ value: some Encodable) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Only strings, numbers, booleans and nulls: encoding cannot fail.
        return Array((try? encoder.encode(value)) ?? Data("{}".utf8))
    }
}

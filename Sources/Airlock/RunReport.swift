import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// The `--json` document (also the receipt `airlock serve` answers with).
public struct RunReport: Encodable, Sendable {
    let stdout: String
    let stderr: String
    /// The exact bytes, base64, when they are not valid UTF-8 (the text above
    /// then has U+FFFD in their place); null when the text is exact.
    let stdoutBase64: String?
    let stderrBase64: String?
    let exitCode: Int32
    let signal: Int32?
    let timedOut: Bool
    let outputTruncated: Bool
    let stdoutDroppedBytes: UInt64
    let stderrDroppedBytes: UInt64
    let failure: String?
    let systemEvent: String?
    let guestMode: String?
    let timings: RunTimings
    let artifacts: ArtifactsReport?
    let artifactsError: String?
    /// Whether the VM was restored from a snapshot (and how long that took) or saved one; null when neither.
    let snapshot: SnapshotUse?

    public init(_ r: RunResult) {
        stdout = r.stdoutText
        stderr = r.stderrText
        stdoutBase64 = Self.base64UnlessText(r.stdout)
        stderrBase64 = Self.base64UnlessText(r.stderr)
        exitCode = r.exitCode
        signal = r.signal
        timedOut = r.timedOut
        outputTruncated = r.outputTruncated
        stdoutDroppedBytes = r.stdoutDroppedBytes
        stderrDroppedBytes = r.stderrDroppedBytes
        failure = r.failure
        systemEvent = r.systemEvent
        guestMode = r.guestMode
        timings = r.timings
        artifacts = r.artifacts.map(ArtifactsReport.init)
        artifactsError = r.artifactsError
        snapshot = r.snapshot
    }

    static func base64UnlessText(_ bytes: [UInt8]) -> String? {
        String(validating: bytes, as: UTF8.self) == nil ? Data(bytes).base64EncodedString() : nil
    }

    // Explicit so that a nil signal or failure is written as null: readers see every key.
    enum CodingKeys: String, CodingKey {
        case stdout, stderr, stdoutBase64, stderrBase64, exitCode, signal, timedOut, outputTruncated, stdoutDroppedBytes,
             stderrDroppedBytes, failure, systemEvent, guestMode, timings
        case artifacts, artifactsError, snapshot
    }
    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(stdout, forKey: .stdout)
        try c.encode(stderr, forKey: .stderr)
        try c.encode(stdoutBase64, forKey: .stdoutBase64)
        try c.encode(stderrBase64, forKey: .stderrBase64)
        try c.encode(exitCode, forKey: .exitCode)
        try c.encode(signal, forKey: .signal)
        try c.encode(timedOut, forKey: .timedOut)
        try c.encode(outputTruncated, forKey: .outputTruncated)
        try c.encode(stdoutDroppedBytes, forKey: .stdoutDroppedBytes)
        try c.encode(stderrDroppedBytes, forKey: .stderrDroppedBytes)
        try c.encode(failure, forKey: .failure)
        try c.encode(systemEvent, forKey: .systemEvent)
        try c.encode(guestMode, forKey: .guestMode)
        try c.encode(timings, forKey: .timings)
        try c.encode(artifacts, forKey: .artifacts)
        try c.encode(artifactsError, forKey: .artifactsError)
        try c.encode(snapshot, forKey: .snapshot)
    }
}

/// `artifacts` in the `--json` document: the output directory, every entry
/// with its path, kind, size, SHA-256 (files), link target (links) and mode,
/// the bytes written, and the notes about what was neutralised.
struct ArtifactsReport: Encodable {
    struct Entry: Encodable {
        let artifact: Artifact
        enum CodingKeys: String, CodingKey { case path, kind, size, sha256, linkTarget, mode }
        func encode(to encoder: Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(artifact.path, forKey: .path)
            try c.encode(artifact.kind.rawValue, forKey: .kind)
            try c.encode(artifact.size, forKey: .size)
            try c.encode(artifact.sha256, forKey: .sha256)
            try c.encode(artifact.linkTarget, forKey: .linkTarget)
            try c.encode(String(artifact.mode, radix: 8), forKey: .mode)
        }
    }
    let directory: String
    let files: [Entry]
    let totalBytes: UInt64
    let notes: [String]

    init(_ r: ArtifactReport) {
        directory = r.directory
        files = r.artifacts.map(Entry.init)
        totalBytes = r.totalBytes
        notes = r.notes
    }
}

extension RunResult {
    /// The `airlock run --json` document: every key present (null where absent),
    /// output as text, plus its exact bytes in base64 where they are not UTF-8;
    /// timings in milliseconds.
    public func jsonDocument() -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        // Encoding plain strings, numbers and booleans cannot fail.
        return String(decoding: (try? encoder.encode(RunReport(self))) ?? Data(), as: UTF8.self)
    }
}

/// Sizes on the command line: a number with an optional K, M or G suffix (binary units).
public enum SizeArgument {
    public static func bytes(_ text: String, option: String) throws(SandboxError) -> Int {
        let t = Self.trimmed(text)
        var digits = Substring(t)
        var multiplier = 1
        let suffixes: [(String, Int)] = [("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("B", 1)]
        for (s, m) in suffixes where t.uppercased().hasSuffix(s.uppercased()) {
            digits = t.dropLast(s.count)
            multiplier = m
            break
        }
        guard let n = Int(digits), n >= 0 else {
            throw SandboxError.invalidConfiguration("\(option) '\(text)' is not a size: give a whole number, optionally with K, M or G (e.g. 512M)")
        }
        let (v, overflow) = n.multipliedReportingOverflow(by: multiplier)
        guard !overflow else { throw SandboxError.invalidConfiguration("\(option) '\(text)' is too large") }
        return v
    }

    /// `text` without leading and trailing spaces and tabs.
    static func trimmed(_ text: String) -> String {
        String(text.drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }.reversed())
    }

    /// A memory size in MiB: a bare number is MiB already.
    public static func mebibytes(_ text: String, option: String) throws(SandboxError) -> Int {
        if let n = Int(Self.trimmed(text)) {
            guard n > 0 else { throw SandboxError.invalidConfiguration("\(option) \(n) is not a positive size: give MiB (e.g. 256) or a size like 1G") }
            return n
        }
        let b = try bytes(text, option: option)
        guard b >= 1 << 20, b % (1 << 20) == 0 else {
            throw SandboxError.invalidConfiguration("\(option) '\(text)' is not a whole number of MiB: give e.g. 256 or 1G")
        }
        return b >> 20
    }
}

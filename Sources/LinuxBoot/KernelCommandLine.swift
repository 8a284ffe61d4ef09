/// A kernel command line, built up from parts that come from different places
/// (base line, host profile, devices, the user), checked as it grows.
///
/// The kernel silently truncates a command line longer than COMMAND_LINE_SIZE
/// and splits parameters at whitespace outside double quotes; both turn into
/// guest boot failures far from their cause, so they are refused here instead.
public struct KernelCommandLine: Sendable {
    /// x86's COMMAND_LINE_SIZE, terminating NUL included.
    public static let defaultCapacity = 2048

    /// The most bytes the line may take, terminating NUL included.
    public let capacity: Int
    public private(set) var string: String

    public init(_ initial: String = "", capacity: Int = defaultCapacity) throws(LinuxBootError) {
        precondition(capacity >= 1, "a command line needs room for at least its NUL")
        self.capacity = capacity
        self.string = ""
        try append(initial)
    }

    /// Appends one or more whitespace-separated parameters, joined to what is
    /// there with one space. Leading and trailing whitespace is dropped; an empty
    /// string is a no-op. On error the line is unchanged.
    public mutating func append(_ parameter: String) throws(LinuxBootError) {
        if parameter.utf8.contains(0) {
            throw .commandLineInvalid(parameter: parameter, reason: "contains a NUL byte, which would end the command line there: remove it")
        }
        let trimmed = Self.trimmed(parameter)
        if trimmed.isEmpty { return }
        if trimmed.utf8.count(where: { $0 == UInt8(ascii: "\"") }) % 2 != 0 {
            throw .commandLineInvalid(parameter: trimmed, reason: "has an unbalanced double quote, which would swallow the parameters after it: close the quote")
        }
        let candidate = string.isEmpty ? trimmed : string + " " + trimmed
        let length = candidate.utf8.count
        guard length < capacity else { throw .commandLineTooLong(length: length, capacity: capacity) }
        string = candidate
    }

    /// Appends `key=value`; a value with whitespace is double-quoted, as the kernel's parser expects.
    public mutating func append(key: String, value: String) throws(LinuxBootError) {
        if key.isEmpty || key.utf8.contains(where: { Self.isSpace($0) || $0 == UInt8(ascii: "=") || $0 == UInt8(ascii: "\"") || $0 == 0 }) {
            throw .commandLineInvalid(parameter: key, reason: "is not a valid parameter name (it must be non-empty, without whitespace, '=' or '\"')")
        }
        if value.utf8.contains(UInt8(ascii: "\"")) {
            throw .commandLineInvalid(parameter: "\(key)=\(value)", reason: "has a double quote in its value, which the kernel cannot escape: remove it")
        }
        if value.utf8.contains(0) {
            throw .commandLineInvalid(parameter: "\(key)=\(value)", reason: "contains a NUL byte, which would end the command line there: remove it")
        }
        try append(value.utf8.contains(where: Self.isSpace) ? "\(key)=\"\(value)\"" : "\(key)=\(value)")
    }

    /// Whether a parameter named `key` is present, as `key` or `key=...`.
    public func contains(key: String) -> Bool {
        parameters.contains { Self.name(of: $0) == key }
    }

    /// The parameters as the kernel splits them: at whitespace outside double quotes.
    public var parameters: [String] {
        var result: [String] = []
        var current: [UInt8] = []
        var inQuote = false
        for byte in string.utf8 {
            if Self.isSpace(byte), !inQuote {
                if !current.isEmpty { result.append(String(decoding: current, as: UTF8.self)); current = [] }
                continue
            }
            if byte == UInt8(ascii: "\"") { inQuote.toggle() }
            current.append(byte)
        }
        if !current.isEmpty { result.append(String(decoding: current, as: UTF8.self)) }
        return result
    }

    /// The bytes to copy into guest memory.
    public var bytesWithNUL: [UInt8] { Array(string.utf8) + [0] }

    /// A parameter's name: up to its first '=', quotes removed (the kernel allows "name=value" quoted whole).
    static func name(of parameter: String) -> String {
        let upToEquals = parameter.utf8.prefix { $0 != UInt8(ascii: "=") }
        return String(decoding: upToEquals.filter { $0 != UInt8(ascii: "\"") }, as: UTF8.self)
    }

    /// The kernel's isspace(): the separators its parser splits on.
    static func isSpace(_ b: UInt8) -> Bool { b == 0x20 || (0x09...0x0D).contains(b) }

    static func trimmed(_ s: String) -> String {
        let bytes = Array(s.utf8)
        guard let first = bytes.firstIndex(where: { !isSpace($0) }) else { return "" }
        let last = bytes.lastIndex(where: { !isSpace($0) })!
        return String(decoding: bytes[first...last], as: UTF8.self)
    }
}

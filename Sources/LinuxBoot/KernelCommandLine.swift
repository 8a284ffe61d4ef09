/// A kernel command line under construction, checked against the kernel's size limit.
public struct KernelCommandLine: Sendable {
    /// x86's COMMAND_LINE_SIZE, terminating NUL included.
    public static let defaultCapacity = 2048

    public let capacity: Int
    public private(set) var string: String

    public init(_ initial: String = "", capacity: Int = defaultCapacity) throws(LinuxBootError) {
        self.capacity = capacity
        self.string = ""
        if !initial.isEmpty { try append(initial) }
    }

    /// Appends one or more space-separated parameters.
    public mutating func append(_ parameter: String) throws(LinuxBootError) {
        guard !parameter.utf8.contains(0) else { throw .commandLineInvalid("a parameter contains a NUL byte") }
        let trimmed = parameter.trimmingSpaces
        guard !trimmed.isEmpty else { return }
        let candidate = string.isEmpty ? trimmed : string + " " + trimmed
        guard candidate.utf8.count + 1 <= capacity else {
            throw .commandLineTooLong(length: candidate.utf8.count, capacity: capacity)
        }
        string = candidate
    }

    /// Appends `key=value`, quoting a value that contains spaces.
    public mutating func append(key: String, value: String) throws(LinuxBootError) {
        guard !key.isEmpty, !key.contains(" "), !key.contains("="), !key.contains("\"") else {
            throw .commandLineInvalid("'\(key)' is not a valid parameter name")
        }
        guard !value.contains("\"") else { throw .commandLineInvalid("the value of \(key) contains a double quote") }
        try append(value.contains(" ") ? "\(key)=\"\(value)\"" : "\(key)=\(value)")
    }

    /// Whether a parameter named `key` (as `key` or `key=...`) is present.
    public func contains(key: String) -> Bool {
        string.split(separator: " ").contains { $0 == key || $0.hasPrefix(key + "=") }
    }

    public var bytesWithNUL: [UInt8] { Array(string.utf8) + [0] }
}

extension String {
    var trimmingSpaces: String {
        var s = Substring(self)
        while s.first == " " || s.first == "\t" || s.first == "\n" { s = s.dropFirst() }
        while s.last == " " || s.last == "\t" || s.last == "\n" { s = s.dropLast() }
        return String(s)
    }
}

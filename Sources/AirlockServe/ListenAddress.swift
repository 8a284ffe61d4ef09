/// Where the service listens: `HOST:PORT` (an IP literal or `localhost`) or `unix:PATH`.
public enum ListenAddress: Sendable, Equatable, CustomStringConvertible {
    case tcp(host: String, port: Int)
    case unix(path: String)

    /// Parses `--listen`: `127.0.0.1:8080`, `[::1]:8080`, `localhost:8080`, `0.0.0.0:8080`, `unix:/run/airlock.sock`.
    public static func parse(_ text: String) throws(ServeSetupError) -> ListenAddress {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty else {
                throw .invalid("--listen '\(text)': give the socket's path after unix:, e.g. unix:/run/airlock/serve.sock")
            }
            guard path.utf8.count < 108 else {
                throw .invalid("--listen '\(text)': a Unix socket path is limited to 107 bytes; use a shorter path")
            }
            return .unix(path: path)
        }
        let host: Substring, portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else {
                throw .invalid("--listen '\(text)': an IPv6 address goes in brackets with a port after, e.g. [::1]:8080")
            }
            host = text[text.index(after: text.startIndex)..<close]
            portText = text[text.index(close, offsetBy: 2)...]
        } else {
            guard let colon = text.lastIndex(of: ":") else {
                throw .invalid("--listen '\(text)': give HOST:PORT (e.g. 127.0.0.1:8080) or unix:PATH")
            }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
        }
        guard let port = Int(portText), (0...65535).contains(port) else {
            throw .invalid("--listen '\(text)': the port '\(portText)' is not a number from 0 to 65535 (0 picks a free one)")
        }
        let h = String(host)
        guard h == "localhost" || IPAddressText.isIPv4(h) || IPAddressText.isIPv6(h) else {
            throw .invalid("--listen '\(text)': '\(h)' is not an IP address; give one (127.0.0.1, ::1, 0.0.0.0) or localhost")
        }
        return .tcp(host: h, port: port)
    }

    /// Only this machine can connect: 127.0.0.0/8, ::1, localhost.
    public var isLoopback: Bool {
        switch self {
        case .unix: return true
        case let .tcp(host, _):
            return host == "localhost" || host == "::1" || host.hasPrefix("127.") && IPAddressText.isIPv4(host)
        }
    }

    public var description: String {
        switch self {
        case let .tcp(host, port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case let .unix(path): return "unix:\(path)"
        }
    }
}

/// Textual IP address checks, without resolving anything.
enum IPAddressText {
    static func isIPv4(_ s: String) -> Bool {
        let parts = s.split(separator: ".", omittingEmptySubsequences: false)
        return parts.count == 4 && parts.allSatisfy { p in
            !p.isEmpty && p.count <= 3 && p.allSatisfy(\.isASCIIDigit) && Int(p)! <= 255
        }
    }

    static func isIPv6(_ s: String) -> Bool {
        guard s.contains(":"), s.count <= 45, s.allSatisfy({ $0.isHexDigit || $0 == ":" || $0 == "." }) else { return false }
        // At most one "::" (the run of zero groups it stands for must be unambiguous).
        let chars = Array(s)
        let doubleColons = zip(chars, chars.dropFirst()).filter { $0 == ":" && $1 == ":" }.count
        return doubleColons <= 1 && !s.contains(":::")
    }
}

extension Character {
    var isASCIIDigit: Bool { ("0"..."9").contains(self) }
}

/// A service that cannot start as configured: says which option and what to do.
public enum ServeSetupError: Error, CustomStringConvertible, Sendable {
    case invalid(String)
    public var description: String {
        switch self { case let .invalid(m): return m }
    }
}

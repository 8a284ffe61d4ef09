import AirlockOS
import Crypto
#if canImport(Glibc)
import Glibc
#endif

/// Where installed guest images live, and what is there.
///
/// `$AIRLOCK_HOME/images/` (default `$XDG_DATA_HOME/airlock`, or
/// `~/.local/share/airlock`) holds `vmlinux`, `rootfs.ext4` and
/// `initramfs.cpio`, put there by `make images` (guest-kernel/build.sh and
/// rootfs/build.sh). The CLI finds them without flags.
public struct ImageStore: Sendable {
    public let home: String

    public static let kernelName = "vmlinux"
    public static let rootfsName = "rootfs.ext4"
    public static let initramfsName = "initramfs.cpio"

    public init(environment: [String: String] = ImageStore.processEnvironment()) {
        if let h = environment["AIRLOCK_HOME"], !h.isEmpty {
            home = h
        } else if let d = environment["XDG_DATA_HOME"], !d.isEmpty {
            home = d + "/airlock"
        } else {
            home = (environment["HOME"] ?? "/root") + "/.local/share/airlock"
        }
    }

    public var imagesDirectory: String { home + "/images" }
    public var kernelPath: String { imagesDirectory + "/" + Self.kernelName }
    public var rootfsPath: String { imagesDirectory + "/" + Self.rootfsName }
    public var initramfsPath: String { imagesDirectory + "/" + Self.initramfsName }

    public struct Image: Sendable {
        public let name: String
        public let path: String
        public let size: Int
        public let sha256: String
    }

    /// The known images that exist, with size and SHA-256.
    public func installedImages() -> [Image] {
        [Self.kernelName, Self.rootfsName, Self.initramfsName].compactMap { name in
            let path = imagesDirectory + "/" + name
            guard let bytes = try? readWholeFile(path, role: "image") else { return nil }
            let digest = SHA256.hash(data: bytes).map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
            return Image(name: name, path: path, size: bytes.count, sha256: digest)
        }
    }

    public static func exists(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0
    }

    public static func processEnvironment() -> [String: String] {
        var env: [String: String] = [:]
        var p = environ
        while let entry = p.pointee {
            let s = String(cString: entry)
            if let eq = s.firstIndex(of: "=") { env[String(s[..<eq])] = String(s[s.index(after: eq)...]) }
            p += 1
        }
        return env
    }
}

import AirlockOS
import COpenSSL
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

    /// The toolchain image (`make rootfs-build`): `airlock run --image build`.
    public static let toolchainImage = "build"

    /// The root filesystem `--image NAME` selects: `rootfs-NAME.ext4` beside the
    /// default `rootfs.ext4` (which `default` names).
    public func rootfsPath(image name: String) -> String {
        name == "default" ? rootfsPath : imagesDirectory + "/rootfs-\(name).ext4"
    }

    /// How to build the image `--image NAME` names.
    public static func buildHint(image name: String) -> String {
        switch name {
        case "default": return "make images"
        case toolchainImage: return "make rootfs-build"
        default: return "rootfs/build-debian.sh --name \(name) --agent .build/agent/airlock-init (after make agent)"
        }
    }

    /// Whether `name` can name an image (what build-debian.sh --name accepts).
    public static func isImageName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.allSatisfy { ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == UInt8(ascii: "-") }
    }

    public struct Image: Sendable {
        public let name: String
        public let path: String
        public let size: Int
        public let sha256: String
    }

    /// The known images that exist, with size and SHA-256.
    public func installedImages() -> [Image] {
        ([Self.kernelName, Self.rootfsName, Self.initramfsName] + otherRootFilesystems()).compactMap { name in
            let path = imagesDirectory + "/" + name
            guard let file = try? MappedFile(path: path, role: "image"), let digest = Self.sha256(file.bytes) else { return nil }
            return Image(name: name, path: path, size: file.size, sha256: digest)
        }
    }

    /// The optional root filesystems installed beside the default (rootfs-NAME.ext4), by name.
    public func otherRootFilesystems() -> [String] {
        guard let dir = opendir(imagesDirectory) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name.hasPrefix("rootfs-") && name.hasSuffix(".ext4") { names.append(name) }
        }
        return names.sorted()
    }

    /// Lower-case hex SHA-256 of `bytes` (OpenSSL), or nil if libcrypto fails.
    static func sha256(_ bytes: UnsafeRawBufferPointer) -> String? {
        guard let context = EVP_MD_CTX_new() else { return nil }
        defer { EVP_MD_CTX_free(context) }
        var digest = [UInt8](repeating: 0, count: Int(EVP_MAX_MD_SIZE))
        var length: UInt32 = 0
        guard EVP_DigestInit_ex(context, EVP_sha256(), nil) == 1,
              bytes.isEmpty || EVP_DigestUpdate(context, bytes.baseAddress, bytes.count) == 1,
              EVP_DigestFinal_ex(context, &digest, &length) == 1
        else { return nil }
        let hex = Array("0123456789abcdef".utf8)
        return String(decoding: digest.prefix(Int(length)).flatMap { [hex[Int($0 >> 4)], hex[Int($0 & 0xF)]] }, as: UTF8.self)
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

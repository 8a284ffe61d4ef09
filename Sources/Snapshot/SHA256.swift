import COpenSSL

/// Streaming SHA-256 (OpenSSL's libcrypto, as for the images).
struct SHA256 {
    private let context: OpaquePointer

    init() {
        // EVP_MD_CTX_new fails only when memory is exhausted.
        guard let c = EVP_MD_CTX_new(), EVP_DigestInit_ex(c, EVP_sha256(), nil) == 1 else {
            fatalError("libcrypto cannot start a SHA-256 digest")
        }
        context = c
    }

    func update(_ bytes: UnsafeRawBufferPointer) {
        guard !bytes.isEmpty else { return }
        EVP_DigestUpdate(context, bytes.baseAddress, bytes.count)
    }

    func update(_ bytes: [UInt8]) { bytes.withUnsafeBytes { update($0) } }

    /// The digest; the hasher must not be used afterwards.
    func finish() -> [UInt8] {
        var digest = [UInt8](repeating: 0, count: Int(EVP_MAX_MD_SIZE))
        var length: UInt32 = 0
        EVP_DigestFinal_ex(context, &digest, &length)
        EVP_MD_CTX_free(context)
        return Array(digest.prefix(Int(length)))
    }

    static func digest(_ bytes: [UInt8]) -> [UInt8] {
        let h = SHA256()
        h.update(bytes)
        return h.finish()
    }

    static func hex(_ digest: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        return String(decoding: digest.flatMap { [digits[Int($0 >> 4)], digits[Int($0 & 0xF)]] }, as: UTF8.self)
    }
}

/// SHA-256 of a byte string, in lower-case hex (manifest fields, keys).
public func sha256Hex(_ bytes: [UInt8]) -> String { SHA256.hex(SHA256.digest(bytes)) }
public func sha256Hex(_ bytes: UnsafeRawBufferPointer) -> String {
    let h = SHA256()
    h.update(bytes)
    return SHA256.hex(h.finish())
}

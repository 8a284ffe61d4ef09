import COpenSSL

/// A SHA-256 digest fed piece by piece (OpenSSL's EVP interface), for
/// artifacts hashed while they are written.
public final class SHA256Digest {
    private let context: OpaquePointer?

    public init() {
        context = EVP_MD_CTX_new()
        if let context, EVP_DigestInit_ex(context, EVP_sha256(), nil) != 1 { EVP_MD_CTX_free(context) }
    }

    deinit { EVP_MD_CTX_free(context) }

    public func update(_ bytes: UnsafeRawBufferPointer) {
        guard let context, !bytes.isEmpty else { return }
        _ = EVP_DigestUpdate(context, bytes.baseAddress, bytes.count)
    }

    /// `count` zero bytes (a hole in a sparse file), without a buffer of that size.
    public func updateZeros(_ count: UInt64) {
        let zeros = [UInt8](repeating: 0, count: Int(min(count, 64 << 10)))
        var left = count
        zeros.withUnsafeBytes { z in
            while left > 0 {
                let n = Int(min(left, UInt64(z.count)))
                update(UnsafeRawBufferPointer(rebasing: z[0..<n]))
                left -= UInt64(n)
            }
        }
    }

    /// Lower-case hex; nil when libcrypto failed (it does not, short of running out of memory).
    public func finish() -> String? {
        guard let context else { return nil }
        var digest = [UInt8](repeating: 0, count: Int(EVP_MAX_MD_SIZE))
        var length: UInt32 = 0
        guard EVP_DigestFinal_ex(context, &digest, &length) == 1 else { return nil }
        let hex = Array("0123456789abcdef".utf8)
        return String(decoding: digest.prefix(Int(length)).flatMap { [hex[Int($0 >> 4)], hex[Int($0 & 0xF)]] }, as: UTF8.self)
    }
}

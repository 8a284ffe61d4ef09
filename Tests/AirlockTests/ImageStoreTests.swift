import Foundation
import Testing
@testable import Airlock

/// `airlock doctor` lists each image with its SHA-256 (OpenSSL's libcrypto).
@Suite struct ImageStoreTests {
    @Test func sha256MatchesTheStandardVectors() {
        func digest(_ text: String) -> String? { Array(text.utf8).withUnsafeBytes { ImageStore.sha256($0) } }
        #expect(digest("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    }

    @Test func installedImagesAreListedWithSizeAndDigest() throws {
        let home = NSTemporaryDirectory() + "airlock-images-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: home + "/images", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: home) }
        try Data("abc".utf8).write(to: URL(fileURLWithPath: home + "/images/vmlinux"))
        try Data().write(to: URL(fileURLWithPath: home + "/images/rootfs.ext4"))
        let store = ImageStore(environment: ["AIRLOCK_HOME": home])
        let images = store.installedImages()
        #expect(images.map(\.name) == ["vmlinux", "rootfs.ext4"])
        #expect(images.first?.size == 3)
        #expect(images.first?.sha256 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(images.last?.sha256 == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    }
}

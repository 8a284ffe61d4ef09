import Foundation
import Testing

/// VM tests run wherever /dev/kvm is, and fail (never skip) where it is not,
/// unless the run asked to leave them out with AIRLOCK_SKIP_VM_TESTS=1.
enum VMTests {
    static var skipped: Bool { ProcessInfo.processInfo.environment["AIRLOCK_SKIP_VM_TESTS"] == "1" }
    static var enabled: Bool { !skipped }

    /// Where `make images` installed the guest images (ImageStore's rule).
    static var imagesDirectory: String {
        let env = ProcessInfo.processInfo.environment
        if let h = env["AIRLOCK_HOME"], !h.isEmpty { return h + "/images" }
        if let d = env["XDG_DATA_HOME"], !d.isEmpty { return d + "/airlock/images" }
        return (env["HOME"] ?? "/root") + "/.local/share/airlock/images"
    }

    static var repositoryRoot: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    }

    /// Builds a root filesystem whose /sbin/init is `script`, with rootfs/build.sh, in a fresh directory.
    static func rootfs(withInit script: String) throws -> (path: String, directory: URL) {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("airlock-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let initPath = dir.appendingPathComponent("init")
        try script.write(to: initPath, atomically: true, encoding: .utf8)
        try FileManager.default.setAttributes([.posixPermissions: 0o755], ofItemAtPath: initPath.path)
        let p = Process()
        p.executableURL = repositoryRoot.appendingPathComponent("rootfs/build.sh")
        p.arguments = ["--init", initPath.path, "--out", dir.path]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        try #require(p.terminationStatus == 0, "rootfs/build.sh failed for a test image")
        return (dir.appendingPathComponent("rootfs.ext4").path, dir)
    }
}

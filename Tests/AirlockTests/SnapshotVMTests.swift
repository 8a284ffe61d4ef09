import AirlockTestSupport
import AirlockOS
import Foundation
import Logging
import Snapshot
import Testing
@testable import Airlock

/// One cold boot, saved once, shared by the snapshot VM tests below: every
/// other VM in them is a restore (milliseconds of VMM work instead of a boot
/// that takes tens of seconds on a PVM host). Their time limits include
/// waiting for that boot, which beside the whole suite's other VMs on a
/// two-core host can take several minutes.
enum SharedSnapshot {
    static let config = SandboxConfig(memoryMiB: 128)

    /// A scratch directory for this test process's snapshots.
    static let directory: URL = {
        let d = FileManager.default.temporaryDirectory.appendingPathComponent("airlock-snapshot-vm-\(getpid())")
        try? FileManager.default.createDirectory(at: d, withIntermediateDirectories: true)
        return d
    }()

    struct Made: Sendable {
        let path: String
        /// What the original printed after the save: it ran on.
        let originalOutput: String
        let saved: SnapshotUse
    }

    static let made = Task<Made, Error> {
        let sandbox = try await Sandbox.boot(config)
        let path = directory.appendingPathComponent("shared.snap").path
        let saved = try await sandbox.saveSnapshot(to: path)
        let after = try await sandbox.runAndShutDown(Command(["echo", "the original runs on"]))
        return Made(path: path, originalOutput: after.stdoutText, saved: saved)
    }

    /// The kernel and root filesystem the snapshot was made from.
    static var images: (kernel: String, rootfs: String) { (ImageStore().kernelPath, ImageStore().rootfsPath) }

    static func descriptors() -> [String] {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return fds.compactMap { fd in try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)") }
    }
    static func snapshotMappings(_ path: String) -> Int {
        let maps = String(decoding: FileHandle(forReadingAtPath: "/proc/self/maps")?.readDataToEndOfFile() ?? Data(), as: UTF8.self)
        return maps.split(separator: "\n").filter { $0.hasSuffix(path) }.count
    }
}

/// The Swift API: save a booted sandbox, restore it several times, and the
/// guest in each restore is fresh (its own random numbers, the host's time).
@Suite(.enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct SnapshotRestoreVMTests {
    @Test(.timeLimit(.minutes(25)))
    func restoresRunCommandsWithTheirOutputAndStatusAndDifferentRandomNumbers() async throws {
        let made = try await SharedSnapshot.made.value
        #expect(made.originalOutput == "the original runs on\n")
        #expect(!made.saved.restored && made.saved.allocatedBytes > 0)
        #expect(made.saved.allocatedBytes < 64 << 20, "only touched, non-zero pages: \(made.saved.allocatedBytes) bytes for 128 MiB")

        var randoms: [String] = []
        for i in 0..<2 {
            let sandbox = try await Sandbox.restore(from: made.path, config: SharedSnapshot.config)
            let status = try await sandbox.run(Command(["sh", "-c", "echo restore \(i); echo to stderr >&2; exit \(3 + i)"]))
            #expect(status.stdoutText == "restore \(i)\n" && status.stderrText == "to stderr\n" && status.exitCode == 3 + Int32(i))
            #expect(status.snapshot?.restored == true && status.snapshot?.path == made.path)
            #expect(status.timings.restoreMs > 0 && status.timings.kernelBootMs == 0, "\(status.timings)")

            var cat = Command(["cat"])
            cat.stdin = .bytes(Array("piped into a restored guest\n".utf8))
            #expect(try await sandbox.run(cat).stdoutText == "piped into a restored guest\n")

            let random = try await sandbox.run(Command(["sh", "-c", "head -c 32 /dev/urandom | od -An -tx1"]))
            randoms.append(random.stdoutText)

            // The guest's clock is the host's, though the snapshot's guest stopped when it was saved.
            let before = Int(Date().timeIntervalSince1970)
            let date = try await sandbox.run(Command(["date", "+%s"]))
            let guest = Int(date.stdoutText.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
            #expect(guest >= before - 2 && guest <= Int(Date().timeIntervalSince1970) + 2, "guest \(guest), host \(before)")
            await sandbox.shutdown()
        }
        #expect(randoms[0].count > 40 && randoms[0] != randoms[1], "two restores drew \(randoms)")
    }

    /// A restore made "an hour after" the snapshot, with the host's clock faked
    /// an hour ahead: the guest's clock follows the host's, not the snapshot's.
    @Test(.timeLimit(.minutes(20)))
    func theGuestClockFollowsTheHostsClockAfterARestore() async throws {
        let made = try await SharedSnapshot.made.value
        let sandbox = try await Sandbox.restore(from: made.path, config: SharedSnapshot.config)
        let hourAhead = SessionClient.realtimeNanoseconds() + 3600 * 1_000_000_000
        let offset = hourAhead &- SessionClient.realtimeNanoseconds()
        sandbox.client.hostTime = { SessionClient.realtimeNanoseconds() &+ offset }
        let r = try await sandbox.run(Command(["date", "+%s"]))
        let guest = Int(r.stdoutText.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        // Between the (faked) host time the request carried and that time plus the run's own length.
        let earliest = Int(hourAhead / 1_000_000_000), latest = Int(Date().timeIntervalSince1970) + 3600
        #expect(guest >= earliest - 1 && guest <= latest + 1, "guest \(guest), host an hour ahead \(earliest)...\(latest)")
        await sandbox.destroy()
    }

    /// A byte changed in each part of a copy of the snapshot: the restore is
    /// refused before any VM exists, naming the file and what to do.
    @Test(.timeLimit(.minutes(20)), arguments: ["header", "manifest", "machine state", "guest memory image"])
    func aCorruptedByteInAnyPartIsRefusedBeforeAnyVM(part: String) async throws {
        let made = try await SharedSnapshot.made.value
        let copy = SharedSnapshot.directory.appendingPathComponent("corrupt-\(part.replacingOccurrences(of: " ", with: "-")).snap").path
        try? FileManager.default.removeItem(atPath: copy)
        #expect(try await offThread { copyfile(made.path, copy) })
        defer { try? FileManager.default.removeItem(atPath: copy) }
        let file = try SnapshotFile.open(copy)
        let offset: UInt64
        switch part {
        case "header": offset = 30
        case "manifest": offset = 4096 + 10
        case "machine state":
            // The state section's offset, from the header's table (second entry, after its kind and a reserved word).
            let h = FileHandle(forReadingAtPath: copy)!
            try h.seek(toOffset: 24 + 56 + 8)
            let raw = try h.read(upToCount: 8) ?? Data()
            offset = raw.reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) } + 100
        default:
            // A data page somewhere in the kernel's image.
            offset = file.memoryOffset + (16 << 20) + 123
        }
        try flip(copy, at: offset)
        // Refused by the supervisor's checks of the file, which come before any VMM is started:
        // the message is theirs, not a VMM's.
        await #expect { try await Sandbox.restore(from: copy, config: SharedSnapshot.config) } throws: { e in
            let text = "\(e)"
            return text.contains("snapshot \(copy) is corrupted: its \(part)") && text.contains("airlock snapshot rm")
        }
    }

    /// 100 restores, each running a request and destroyed: no descriptor,
    /// KVM object, thread or mapping of the snapshot outlives them.
    @Test(.timeLimit(.minutes(40)))
    func aHundredRestoreRunDestroyCyclesLeaveNothingBehind() async throws {
        let made = try await SharedSnapshot.made.value
        // A copy of its own: the other tests restore the shared file at the same time.
        let path = SharedSnapshot.directory.appendingPathComponent("cycles.snap").path
        try? FileManager.default.removeItem(atPath: path)
        #expect(try await offThread { copyfile(made.path, path) })
        defer { try? FileManager.default.removeItem(atPath: path) }
        // A warm-up cycle first, so one-time allocations (the digest cache, libcrypto) are not counted.
        let warm = try await Sandbox.restore(from: path, config: SharedSnapshot.config)
        await warm.destroy()
        let fdsBefore = Set(SharedSnapshot.descriptors())
        let threadsBefore = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task").count) ?? 0
        for i in 0..<100 {
            let sandbox = try await Sandbox.restore(from: path, config: SharedSnapshot.config)
            // A run the agent answers without a fork (a command that is not there): the request
            // and reply round trip, cheap even where guest kernel code is emulated.
            let r = try await sandbox.run(Command(["no-such-command-\(i)"]))
            #expect(r.exitCode == 127, "cycle \(i): \(r.failure ?? "")")
            await sandbox.destroy()
        }
        // The last VM's threads drop their references as they end: give them a moment.
        for _ in 0..<50 where SharedSnapshot.snapshotMappings(path) > 0 { try await Task.sleep(for: .milliseconds(100)) }
        // Other suites run in this process at once: only our own kinds of leftovers are counted.
        let leaked = Set(SharedSnapshot.descriptors()).subtracting(fdsBefore).filter {
            $0.hasPrefix("anon_inode:kvm") || $0.hasSuffix(".snap") || $0.hasSuffix("rootfs.ext4") || $0 == "/dev/kvm"
        }
        #expect(leaked.isEmpty, "\(leaked)")
        #expect(SharedSnapshot.snapshotMappings(path) == 0)
        let threadsAfter = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task").count) ?? 0
        #expect(threadsAfter <= threadsBefore + 8, "threads \(threadsBefore) -> \(threadsAfter)")
        let strays = ((try? FileManager.default.contentsOfDirectory(atPath: SharedSnapshot.directory.path)) ?? []).filter { $0.hasSuffix(".tmp") }
        #expect(strays.isEmpty)
    }
}

/// `airlock run` and `airlock snapshot`, jailed (the default), with a data
/// directory of their own holding the shared snapshot under its key. One at a
/// time: each waits on a child process, and the others need the threads.
@Suite(.serialized, .enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct SnapshotCLIVMTests {
    /// `airlock` as a child process, waited for on a thread of its own: the cooperative pool
    /// has a thread per core, and a test that holds one stalls every async test.
    static func airlock(_ arguments: [String], environment: [String: String]) async throws -> (status: Int32, stdout: String, stderr: String, pid: Int32) {
        try await offThread { try VMTests.airlock(arguments, environment: environment) }
    }

    /// A data directory whose store has the shared snapshot for `airlock run --memory 128`.
    static func home() async throws -> (home: String, environment: [String: String], arguments: [String], key: String) {
        let made = try await SharedSnapshot.made.value
        let home = SharedSnapshot.directory.appendingPathComponent("home-\(UUID().uuidString)").path
        let store = SnapshotStore(directory: home + "/snapshots")
        try store.makeDirectory()
        let (kernel, rootfs) = SharedSnapshot.images
        let inputs = try store.inputs(for: SharedSnapshot.config, kernelPath: kernel, rootfsPath: rootfs, hostProfile: .detect())
        let target = store.path(forKey: inputs.key)
        #expect(try await offThread { copyfile(made.path, target) })
        return (home, ["AIRLOCK_HOME": home], ["--memory", "128", "--kernel", kernel, "--rootfs", rootfs], inputs.key)
    }

    @Test(.timeLimit(.minutes(20)))
    func runRestoresTheStoresSnapshotAndSaysSoInItsReceipt() async throws {
        try JailProbe.requireRoot()
        let (home, env, images, key) = try await Self.home()
        defer { try? FileManager.default.removeItem(atPath: home) }
        let r = try await Self.airlock(["run", "--json"] + images + ["--", "sh", "-c", "echo from a snapshot; exit 5"], environment: env)
        #expect(r.status == 5, "\(r.stderr)")
        let receipt = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        #expect(receipt?["stdout"] as? String == "from a snapshot\n")
        let snapshot = receipt?["snapshot"] as? [String: Any]
        #expect(snapshot?["restored"] as? Bool == true, "\(r.stdout)")
        #expect((snapshot?["restoreMs"] as? Double ?? 0) > 0)
        #expect((snapshot?["path"] as? String)?.hasSuffix("/snapshots/\(key).snap") == true)
        #expect(JailProbe.leftovers(of: r.pid).isEmpty)

        let list = try await Self.airlock(["snapshot", "list"], environment: env)
        #expect(list.status == 0 && list.stdout.hasPrefix(key) && list.stdout.contains("128 MiB guest"), "\(list.stdout)")
        let removed = try await Self.airlock(["snapshot", "rm", String(key.prefix(6))], environment: env)
        #expect(removed.status == 0 && removed.stdout.contains(key), "\(removed.stderr)")
        #expect(try await Self.airlock(["snapshot", "list"], environment: env).stdout.hasPrefix("no snapshots"))
    }

    /// The save inside the jail (its filters on: KVM's state requests, mincore,
    /// ftruncate): `airlock snapshot create` into an empty store, which the next
    /// `airlock run` restores; and a run with --no-snapshot neither restores nor saves.
    @Test(.timeLimit(.minutes(25)))
    func aJailedCreateSavesWhatTheNextRunRestores() async throws {
        try JailProbe.requireRoot()
        let home = SharedSnapshot.directory.appendingPathComponent("home-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: home) }
        let env = ["AIRLOCK_HOME": home]
        let (kernel, rootfs) = SharedSnapshot.images
        let images = ["--memory", "128", "--kernel", kernel, "--rootfs", rootfs]
        let created = try await Self.airlock(["snapshot", "create"] + images, environment: env)
        #expect(created.status == 0, "\(created.stderr)")
        let path = created.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(path.hasPrefix(home + "/snapshots/") && path.hasSuffix(".snap"), "\(created.stdout)")
        #expect(JailProbe.leftovers(of: created.pid).isEmpty)
        let strays = ((try? FileManager.default.contentsOfDirectory(atPath: home + "/snapshots")) ?? []).filter { $0.hasSuffix(".tmp") }
        #expect(strays.isEmpty, "\(strays)")

        let restored = try await Self.airlock(["run", "--json"] + images + ["--", "echo", "restored"], environment: env)
        let receipt = try JSONSerialization.jsonObject(with: Data(restored.stdout.utf8)) as? [String: Any]
        #expect(receipt?["stdout"] as? String == "restored\n", "\(restored.stderr)")
        #expect((receipt?["snapshot"] as? [String: Any])?["path"] as? String == path)

        let cold = try await Self.airlock(["run", "--json", "--no-snapshot"] + images + ["--", "true"], environment: env)
        let coldReceipt = try JSONSerialization.jsonObject(with: Data(cold.stdout.utf8)) as? [String: Any]
        #expect(coldReceipt?["snapshot"] is NSNull, "\(cold.stdout)")
        #expect(((coldReceipt?["timings"] as? [String: Any])?["kernelBootMs"] as? Double ?? 0) > 0)
    }

    /// A restored VMM under the jail: every thread filtered and unprivileged, its
    /// root empty (the snapshot came as a descriptor, like the images, and its RAM
    /// image is mapped from it); nothing left after it.
    @Test(.timeLimit(.minutes(20)))
    func aRestoredJailedVMMHasSeccompOnEveryThread() async throws {
        try JailProbe.requireRoot()
        let (home, env, images, _) = try await Self.home()
        defer { try? FileManager.default.removeItem(atPath: home) }
        try await offThread { try Self.checkARestoredJailedVMM(environment: env, images: images) }
    }

    static func checkARestoredJailedVMM(environment env: [String: String], images: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try VMTests.airlockExecutable())
        p.arguments = ["run"] + images + ["--", "sleep", "60"]
        p.environment = ProcessInfo.processInfo.environment.merging(env) { $1 }
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        defer { if p.isRunning { p.terminate() } }
        let vmm = try #require(JailProbe.waitFor(seconds: 30) { () -> Int32? in
            guard let pid = JailProbe.vmm(of: p.processIdentifier),
                  let tasks = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task"), tasks.count >= 4 else { return nil }
            return pid
        }, "no restored VMM with its threads appeared")
        usleep(300_000)
        for tid in try FileManager.default.contentsOfDirectory(atPath: "/proc/\(vmm)/task") {
            let status = try String(contentsOfFile: "/proc/\(vmm)/task/\(tid)/status", encoding: .utf8)
            #expect(JailProbe.field("Seccomp", in: status) == "2", "thread \(tid)")
            #expect(JailProbe.field("NoNewPrivs", in: status) == "1", "thread \(tid)")
            #expect(JailProbe.field("CapEff", in: status) == "0000000000000000", "thread \(tid)")
        }
        let root = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(vmm)/root").sorted()
        #expect(root == [], "the VMM's root holds \(root): it should be empty (it gets descriptors, not files)")
        let fds = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(vmm)/fd").compactMap {
            try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(vmm)/fd/\($0)")
        }
        #expect(fds.contains { $0.hasSuffix(".snap") }, "the snapshot came as a descriptor: \(fds)")
        let maps = (try? String(contentsOfFile: "/proc/\(vmm)/maps", encoding: .utf8)) ?? ""
        #expect(maps.split(separator: "\n").contains { $0.hasSuffix(".snap") && $0.contains(" rw-p ") }, "guest RAM mapped private from the snapshot")
        p.terminate()
        p.waitUntilExit()
        #expect(JailProbe.leftovers(of: p.processIdentifier).isEmpty)
    }
}

func copyfile(_ from: String, _ to: String) -> Bool {
    // cp keeps the holes: the copy costs the data pages only.
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/bin/cp")
    p.arguments = ["--sparse=always", from, to]
    guard (try? p.run()) != nil else { return false }
    p.waitUntilExit()
    return p.terminationStatus == 0
}

func flip(_ path: String, at offset: UInt64) throws {
    let fd = open(path, O_RDWR | O_CLOEXEC)
    try #require(fd >= 0)
    defer { close(fd) }
    var b: UInt8 = 0
    #expect(pread(fd, &b, 1, off_t(offset)) == 1)
    b ^= 0x40
    #expect(pwrite(fd, &b, 1, off_t(offset)) == 1)
}

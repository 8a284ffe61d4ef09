import AgentProtocol
import AirlockOS
import SeededRandom
@testable import SessionProtocol
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite struct SessionMessageTests {
    static let boot = BootRequest(memoryMiB: 256, cpus: 1, bootTimeoutSeconds: 300, kernelCommandLine: "loglevel=8",
                                  agentPath: "/sbin/airlock-init", hostProfile: "pvm", kernelName: "/images/with space/vmlinux",
                                  rootfsName: "/r.ext4", disks: [.init(name: "/data.img", readOnly: true)],
                                  copyConsoleToStderr: true, logLevel: "debug", requestedAt: 123_456_789)
    static let run = RunSpec(runID: 7, arguments: ["sh", "-c", "echo hi"], environment: ["A=1"], workingDirectory: "/tmp",
                             user: "airlock:airlock", timeoutSeconds: 2.5, maxStdoutBytes: 1000, maxStderrBytes: nil,
                             hasStdin: true, shutdownAfter: true, hostTimeNanoseconds: 1_700_000_000_123_456_789,
                             entropy: Array(0..<32))
    static let save = SnapshotSave(name: "/var/lib/airlock/snapshots/.k.tmp", kernelSHA256: String(repeating: "a", count: 64),
                                   rootfsSHA256: String(repeating: "0", count: 64), createdAt: 1_700_000_000)

    func roundTrip(_ m: SupervisorMessage) throws -> SupervisorMessage {
        var d = FrameDecoder()
        d.feed(m.encoded())
        let f = try #require(try d.next())
        return try SupervisorMessage.decode(type: f.type, body: f.body)
    }

    func roundTrip(_ m: VMMMessage) throws -> VMMMessage {
        var d = FrameDecoder()
        d.feed(m.encoded())
        let f = try #require(try d.next())
        return try VMMMessage.decode(type: f.type, body: f.body)
    }

    @Test func everyMessageRoundTrips() throws {
        var restore = Self.boot
        restore.snapshotName = "/snapshots/k.snap"
        for m: SupervisorMessage in [.boot(Self.boot), .boot(restore), .run(Self.run), .signal(runID: 7, signal: 2), .shutdown, .snapshot(Self.save)] {
            #expect(try roundTrip(m) == m)
        }
        var o = RunOutcome()
        o.exitCode = 137; o.signal = 9; o.timedOut = true; o.stdoutBytes = 5; o.stderrBytes = 6
        o.stdoutDropped = 7; o.stderrDropped = 8; o.stderrEndsMidLine = true; o.failure = "it failed"
        o.systemEvent = "reset on vCPU 0"; o.timings.totalMs = 12.5; o.timings.commandMs = 3
        let failure = SessionFailure(kind: .agentDidNotStart, message: "no hello", console: "last lines", vmEnded: true)
        for m: VMMMessage in [.hello(version: SessionProtocol.version), .booted(BootReport(vmmStartMs: 9.5, kernelBootMs: 1000, agent: "airlock-init 1", guestMode: "pvm-native")),
                              .booted(BootReport(vmmStartMs: 3, kernelBootMs: 0, agent: "/k.snap", guestMode: "pvm-emulated", restored: true, restoreMs: 4.5)),
                              .snapshotSaved(Self.saved),
                              .started(runID: 7), .exited(runID: 7, o), .exited(runID: 8, RunOutcome()), .failed(failure),
                              .ended(systemEvent: nil), .ended(systemEvent: "shutdown")] {
            #expect(try roundTrip(m) == m)
        }
        #expect(SupervisorMessage.boot(Self.boot).descriptorCount == 4)
        #expect(SupervisorMessage.boot(restore).descriptorCount == 5, "the snapshot's descriptor follows the disks'")
        #expect(SupervisorMessage.snapshot(Self.save).descriptorCount == 1)
        #expect(SupervisorMessage.run(Self.run).descriptorCount == 3)
        #expect(SupervisorMessage.shutdown.descriptorCount == 0)
    }

    static var saved: SnapshotSaveReport {
        var s = SnapshotSaveReport()
        s.fileSize = 130 << 20; s.allocatedBytes = 12 << 20; s.dataPages = 3000; s.residentPages = 5000; s.totalPages = 32768
        s.pausedMs = 140; s.writeMs = 130
        return s
    }

    @Test func valuesThatCannotBeRightAreRefused() {
        func refused(_ type: UInt8, _ body: [UInt8], mentions: String) {
            do {
                _ = try SupervisorMessage.decode(type: type, body: body)
                Issue.record("accepted type \(type)")
            } catch {
                #expect(error.description.contains(mentions), "\(error)")
            }
        }
        func body(_ m: SupervisorMessage) -> (UInt8, [UInt8]) {
            let f = m.encoded()
            return (f[4], Array(f[5...]))
        }
        var b = Self.boot
        b.bootTimeoutSeconds = .infinity
        refused(body(.boot(b)).0, body(.boot(b)).1, mentions: "boot timeout")
        var r = Self.run
        r.timeoutSeconds = .nan
        refused(body(.run(r)).0, body(.run(r)).1, mentions: "timeout")
        r.timeoutSeconds = -1
        refused(body(.run(r)).0, body(.run(r)).1, mentions: "timeout")
        r = Self.run
        r.arguments = [""]
        refused(body(.run(r)).0, body(.run(r)).1, mentions: "no command")
        refused(body(.signal(runID: 1, signal: 99)).0, body(.signal(runID: 1, signal: 99)).1, mentions: "signal 99")
        let (t, full) = body(.shutdown)
        refused(t, full + [0], mentions: "unexpected bytes")
        refused(99, [], mentions: "unknown supervisor message")
        b = Self.boot
        b.disks = Array(repeating: .init(name: "/d", readOnly: false), count: SessionProtocol.Limits.disks + 1)
        refused(body(.boot(b)).0, body(.boot(b)).1, mentions: "disks")
        // A save's digests go into a manifest: 64 lowercase hex digits or nothing.
        for digest in ["abc", String(repeating: "A", count: 64), String(repeating: "g", count: 64)] {
            var save = Self.save
            save.kernelSHA256 = digest
            refused(body(.snapshot(save)).0, body(.snapshot(save)).1, mentions: "not a SHA-256")
        }
        r = Self.run
        r.entropy = [UInt8](repeating: 1, count: AgentProtocol.Limits.entropy + 1)
        refused(body(.run(r)).0, body(.run(r)).1, mentions: "entropy")
    }

    @Test func theSupervisorRefusesAVMMThatLies() {
        func refused(_ m: VMMMessage, patch: (inout [UInt8]) -> Void = { _ in }, mentions: String) {
            let f = m.encoded()
            var body = Array(f[5...])
            patch(&body)
            do {
                _ = try VMMMessage.decode(type: f[4], body: body)
                Issue.record("accepted \(m)")
            } catch {
                #expect(error.description.contains(mentions), "\(error)")
            }
        }
        refused(.hello(version: SessionProtocol.version + 1), mentions: "version")
        refused(.booted(BootReport(vmmStartMs: -1, kernelBootMs: 0, agent: "", guestMode: "hardware")), mentions: "not a duration")
        refused(.booted(BootReport(vmmStartMs: .infinity, kernelBootMs: 0, agent: "", guestMode: "hardware")), mentions: "not a duration")
        refused(.booted(BootReport(vmmStartMs: 1, kernelBootMs: 0, agent: "", guestMode: "hardware", restored: true, restoreMs: .nan)),
                mentions: "not a duration")
        var lying = Self.saved
        lying.dataPages = lying.totalPages + 1
        refused(.snapshotSaved(lying), mentions: "does not add up")
        lying = Self.saved
        lying.writeMs = -1
        refused(.snapshotSaved(lying), mentions: "not a duration")
        var o = RunOutcome()
        o.signal = 9
        // The signal field sits after the run id and exit code.
        refused(.exited(runID: 1, o), patch: { $0[8] = 200 }, mentions: "signal")
        refused(.exited(runID: 1, o), patch: { $0.removeLast() }, mentions: "needs")
        refused(.failed(SessionFailure(kind: .vmm, message: "x", vmEnded: false)), patch: { $0[0] = 77 }, mentions: "failure kind")
    }

    @Test func longTextIsClippedToTheLimitNotRefused() throws {
        let long = String(repeating: "é", count: SessionProtocol.Limits.text)  // twice the limit in bytes
        let back = try roundTrip(.failed(SessionFailure(kind: .vmm, message: long, vmEnded: true)))
        guard case let .failed(f) = back else { Issue.record("\(back)"); return }
        #expect(f.message.utf8.count <= SessionProtocol.Limits.text && f.message.allSatisfy { $0 == "é" })
    }

    /// Random bytes as bodies of every message type: errors, never a trap.
    @Test func randomBodiesNeverTrap() {
        var rng = SplitMix64(seed: 11)
        for _ in 0..<20_000 {
            let count = rng.below(64)
            let body = (0..<count).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            _ = try? SupervisorMessage.decode(type: UInt8(1 + rng.below(6)), body: body)
            _ = try? VMMMessage.decode(type: UInt8(0x81 + rng.below(8)), body: body)
        }
        // Valid frames with single bytes flipped: decoded or refused, nothing else.
        let frames = [SupervisorMessage.boot(Self.boot).encoded(), SupervisorMessage.run(Self.run).encoded(),
                      SupervisorMessage.snapshot(Self.save).encoded()]
        for _ in 0..<5_000 {
            var f = frames[rng.below(frames.count)]
            f[5 + rng.below(f.count - 5)] ^= UInt8(truncatingIfNeeded: 1 << rng.below(8))
            _ = try? SupervisorMessage.decode(type: f[4], body: Array(f[5...]))
        }
    }
}

@Suite struct SessionChannelTests {
    func pipe() throws -> (read: OwnedFileDescriptor, write: OwnedFileDescriptor) {
        var fds: [Int32] = [-1, -1]
        try #require(Glibc.pipe(&fds) == 0)
        return (OwnedFileDescriptor(adopting: fds[0]), OwnedFileDescriptor(adopting: fds[1]))
    }

    @Test func framesArriveWithTheirDescriptorsInOrder() throws {
        let (a, b) = try UnixSocket.pair()
        let sender = SessionChannel(socket: a), receiver = SessionChannel(socket: b)
        let p1 = try pipe(), p2 = try pipe(), p3 = try pipe()
        try sender.send(SupervisorMessage.signal(runID: 1, signal: 2).encoded())
        try sender.send(SupervisorMessage.run(SessionMessageTests.run).encoded(), descriptors: [p1.write.rawValue, p2.write.rawValue, p3.read.rawValue])
        try sender.send(SupervisorMessage.shutdown.encoded())

        guard case let .frame(t1, b1) = try receiver.receive(until: monotonicNanoseconds() + 2_000_000_000) else { Issue.record("no frame"); return }
        #expect(try SupervisorMessage.decode(type: t1, body: b1) == .signal(runID: 1, signal: 2))
        #expect(receiver.takeDescriptors(0)?.isEmpty == true)
        guard case let .frame(t2, b2) = try receiver.receive(until: monotonicNanoseconds() + 2_000_000_000) else { Issue.record("no frame"); return }
        let run = try SupervisorMessage.decode(type: t2, body: b2)
        let fds = try #require(receiver.takeDescriptors(run.descriptorCount))
        // The descriptors work: what is written to the first reaches p1's read end.
        var byte: UInt8 = 0x5A
        #expect(Glibc.write(fds[0].rawValue, &byte, 1) == 1)
        var got: UInt8 = 0
        #expect(Glibc.read(p1.read.rawValue, &got, 1) == 1 && got == 0x5A)
        guard case let .frame(t3, b3) = try receiver.receive(until: monotonicNanoseconds() + 2_000_000_000) else { Issue.record("no frame"); return }
        #expect(try SupervisorMessage.decode(type: t3, body: b3) == .shutdown)
        #expect(receiver.unclaimedDescriptors == 0)
    }

    @Test func closeTimeoutAndBrokenFramesAreTold() throws {
        let (a, b) = try UnixSocket.pair()
        let receiver = SessionChannel(socket: b)
        let start = monotonicNanoseconds()
        guard case .timedOut = try receiver.receive(until: monotonicNanoseconds() + 50_000_000) else { Issue.record("expected a timeout"); return }
        #expect(monotonicNanoseconds() - start >= 40_000_000)
        // A length over the frame limit: an error at once, before any of it is buffered.
        try a.send([0xFF, 0xFF, 0xFF, 0x7F, 1])
        #expect(throws: SessionChannelError.self) { _ = try receiver.receive(until: monotonicNanoseconds() + 1_000_000_000) }

        let (c, d) = try UnixSocket.pair()
        let other = SessionChannel(socket: d)
        try c.send(Array(SupervisorMessage.shutdown.encoded().prefix(3)))
        c.shutdownWrites()
        // The stream ends inside a frame.
        #expect(throws: SessionChannelError.self) { _ = try other.receive(until: monotonicNanoseconds() + 1_000_000_000) }

        let (e, f) = try UnixSocket.pair()
        let clean = SessionChannel(socket: f)
        e.shutdownWrites()
        guard case .closed = try clean.receive(until: monotonicNanoseconds() + 1_000_000_000) else { Issue.record("expected EOF"); return }
    }

    @Test func missingDescriptorsAreNotInvented() throws {
        let (a, b) = try UnixSocket.pair()
        let sender = SessionChannel(socket: a), receiver = SessionChannel(socket: b)
        let p = try pipe()
        try sender.send(SupervisorMessage.run(SessionMessageTests.run).encoded(), descriptors: [p.write.rawValue])
        guard case .frame = try receiver.receive(until: monotonicNanoseconds() + 2_000_000_000) else { Issue.record("no frame"); return }
        #expect(receiver.takeDescriptors(3) == nil, "a run that names 3 descriptors and brings 1")
        #expect(receiver.unclaimedDescriptors == 0, "the one that came is closed, not kept")
    }

    @Test func aSendToAPeerThatStoppedReadingTimesOut() throws {
        let (a, _b) = try UnixSocket.pair()
        try a.setSendTimeout(seconds: 1)
        let big = [UInt8](repeating: 0, count: 4 << 20)
        let start = monotonicNanoseconds()
        #expect(throws: SystemError.self) { try a.send(big) }
        #expect(monotonicNanoseconds() - start < 5_000_000_000)
        withExtendedLifetime(_b) {}
    }
}

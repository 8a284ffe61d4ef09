import AgentProtocol
import Dispatch
import Foundation
import Synchronization
import Testing
@testable import Airlock

/// The host side of a run without a VM: output routing and its bounds,
/// control-channel decoding, the controller's inbox, option parsing.
struct OutputPumpTests {
    func feed(_ pump: OutputPump, _ bytes: [UInt8]) {
        bytes.withUnsafeBytes { pump.write($0) }
    }

    @Test func captureKeepsUpToTheLimitAndFlagsTheRest() {
        let pump = OutputPump(name: "test")
        pump.begin(.capture, limit: 10)
        feed(pump, Array(repeating: 65, count: 6))
        feed(pump, Array(repeating: 66, count: 6))
        let (captured, truncated) = pump.finish()
        #expect(captured == Array(repeating: 65, count: 6) + Array(repeating: 66, count: 4))
        #expect(truncated)
        #expect(pump.received == 12, "the count matches what the guest sent, kept or not")
    }

    @Test func captureWithoutALimitIsStillBounded() {
        let pump = OutputPump(name: "test")
        pump.begin(.capture, limit: nil)
        feed(pump, Array(repeating: 1, count: 16))
        #expect(pump.finish() == (Array(repeating: 1, count: 16), false))
        pump.begin(.capture, limit: Int.max)
        feed(pump, [1])
        #expect(pump.finish().captured.count == 1)
    }

    @Test func bytesBeforeAnyRunAreCountedAndDropped() {
        let pump = OutputPump(name: "test")
        feed(pump, [1, 2, 3])
        #expect(pump.received == 3)
        pump.begin(.capture, limit: nil)
        #expect(pump.finish().captured.isEmpty)
    }

    @Test func aFileDescriptorGetsEveryByteInOrder() throws {
        var fds: [Int32] = [0, 0]
        try #require(pipe(&fds) == 0)
        defer { close(fds[0]) }
        let pump = OutputPump(name: "test")
        try pump.start()
        pump.begin(.fileDescriptor(fds[1]), limit: nil)
        let payload = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        let reader = Mutex<[UInt8]>([])
        let done = DispatchSemaphore(value: 0)
        let readFD = fds[0]
        try startThread {
            var buf = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = buf.withUnsafeMutableBytes { read(readFD, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                reader.withLock { $0 += buf[0..<n] }
            }
            done.signal()
        }
        for chunk in stride(from: 0, to: payload.count, by: 7000) {
            feed(pump, Array(payload[chunk..<min(payload.count, chunk + 7000)]))
        }
        while !pump.idle { usleep(1000) }
        close(fds[1])
        done.wait()
        pump.close()
        #expect(reader.withLock { $0 } == payload)
        #expect(pump.finish().truncated == false)
    }

    /// A consumer that is behind makes the device stop taking guest buffers
    /// (acceptsMore is false) and is told to resume once it has caught up.
    @Test func aSlowConsumerThrottlesTheGuestAndResumesIt() throws {
        let pump = OutputPump(name: "test")
        let gate = DispatchSemaphore(value: 0)
        let entered = DispatchSemaphore(value: 0)
        let resumed = Atomic<Int>(0)
        pump.resume = { resumed.add(1, ordering: .relaxed) }
        try pump.start()
        pump.begin(.handler({ _ in entered.signal(); gate.wait() }), limit: nil)
        feed(pump, [0])
        entered.wait()  // the writer holds the first chunk and blocks in the handler
        feed(pump, [UInt8](repeating: 1, count: OutputPump.highWater))
        #expect(pump.acceptsMore == false)
        gate.signal()  // the first chunk is delivered
        gate.signal()  // and the big one
        while !pump.idle { usleep(1000) }
        #expect(pump.acceptsMore)
        #expect(resumed.load(ordering: .relaxed) == 1)
        pump.close()
    }
}

struct ControlChannelTests {
    final class Sink: Sendable {
        let events = Mutex<[VMSession.Event]>([])
        func post(_ e: VMSession.Event) { events.withLock { $0.append(e) } }
        var messages: [GuestMessage] {
            events.withLock { $0.compactMap { if case let .guest(m) = $0 { return m } else { return nil } } }
        }
        var errors: Int { events.withLock { $0.filter { if case .protocolError = $0 { return true } else { return false } }.count } }
    }

    @Test func framesSplitAcrossWritesAreReassembled() {
        let sink = Sink()
        let channel = ControlChannel(post: sink.post)
        let stream = GuestMessage.hello(version: AgentProtocol.version, agent: "a").encoded()
            + GuestMessage.started(runID: 1, pid: 9).encoded()
        for b in stream { [b].withUnsafeBytes { channel.write($0) } }
        #expect(sink.messages == [.hello(version: AgentProtocol.version, agent: "a"), .started(runID: 1, pid: 9)])
    }

    @Test func aMalformedFrameIsReportedOnceAndTheRestIgnored() {
        let sink = Sink()
        let channel = ControlChannel(post: sink.post)
        let bad = Frame.encode(type: 0x99, body: [])
        (bad + GuestMessage.started(runID: 1, pid: 9).encoded()).withUnsafeBytes { channel.write($0) }
        GuestMessage.started(runID: 2, pid: 9).encoded().withUnsafeBytes { channel.write($0) }
        #expect(sink.errors == 1)
        #expect(sink.messages.isEmpty)
    }

    @Test func aFloodingGuestCannotGrowTheInbox() {
        let queue = EventQueue()
        for i in 0..<(VMSession.maxPendingEvents * 3) { queue.post(.guest(.started(runID: UInt32(i), pid: 1))) }
        queue.post(.progress)
        queue.post(.progress)
        var count = 0, errors = 0
        while let e = queue.next(until: 0) {
            count += 1
            if case .protocolError = e { errors += 1 }
        }
        #expect(count == VMSession.maxPendingEvents + 1)
        #expect(errors == 1)
    }
}

extension ControlChannelTests {
    @Test func progressWakeUpsCoalesce() {
        let queue = EventQueue()
        for _ in 0..<100 { queue.post(.progress) }
        var count = 0
        while queue.next(until: 0) != nil { count += 1 }
        #expect(count == 1)
        // Once the pending one is taken, the next progress wakes the controller again.
        queue.post(.progress)
        #expect(queue.next(until: 0) != nil)
    }

    /// One write packed with more messages than the event queue holds is stopped
    /// where it is decoded, not turned into millions of messages.
    @Test func oneWritePackedWithMessagesIsAFlood() {
        let sink = Sink()
        let channel = ControlChannel(post: sink.post)
        let frame = GuestMessage.started(runID: 1, pid: 9).encoded()
        let packed = [[UInt8]](repeating: frame, count: VMSession.maxPendingEvents + 10).flatMap { $0 }
        packed.withUnsafeBytes { channel.write($0) }
        #expect(sink.messages.count == VMSession.maxPendingEvents)
        #expect(sink.errors == 1)
    }
}

struct ConfigurationTests {
    @Test func sizesParseWithUnitsAndRejectTheRest() throws {
        #expect(try SizeArgument.mebibytes("256", option: "--memory") == 256)
        #expect(try SizeArgument.mebibytes("1G", option: "--memory") == 1024)
        #expect(try SizeArgument.mebibytes("512M", option: "--memory") == 512)
        #expect(try SizeArgument.bytes("4k", option: "--max-output") == 4096)
        #expect(try SizeArgument.bytes("100", option: "--max-output") == 100)
        for bad in ["lots", "-5", "1.5G", "", "0"] {
            #expect(throws: SandboxError.self) { try SizeArgument.mebibytes(bad, option: "--memory") }
        }
        do { _ = try SizeArgument.mebibytes("lots", option: "--memory") } catch {
            #expect(error.description.contains("--memory 'lots' is not a size"))
        }
        #expect(throws: SandboxError.self) { try SizeArgument.bytes("99999999999G", option: "--max-output") }
    }

    func message(_ config: SandboxConfig) -> String {
        do { try ImageResolution.validate(config); return "" } catch { return error.description }
    }

    @Test func badMachinesAreRefusedWithWhatToDo() {
        #expect(message(SandboxConfig(memoryMiB: 8)).contains("--memory 8 MiB is too small"))
        #expect(message(SandboxConfig(memoryMiB: 129)).contains("2 MiB"))
        #expect(message(SandboxConfig(cpus: 2)).contains("until SMP support lands"))
        var c = SandboxConfig()
        c.agentPath = "sbin/init"
        #expect(message(c).contains("must be absolute"))
        #expect(message(SandboxConfig()) == "")
    }

    @Test func missingImagesNameTheFileAndTheFix() {
        let store = ImageStore(environment: ["AIRLOCK_HOME": "/nonexistent-airlock-home"])
        do {
            _ = try ImageResolution.resolve(SandboxConfig(), store: store)
            Issue.record("resolved a missing kernel")
        } catch {
            #expect(error.description.contains("/nonexistent-airlock-home/images/vmlinux"))
            #expect(error.description.contains("make images"))
        }
        do {
            _ = try ImageResolution.resolve(SandboxConfig(kernelPath: "/etc/hostname", rootfsPath: "/no/such.ext4"), store: store)
            Issue.record("resolved a missing rootfs")
        } catch {
            #expect(error.description.contains("/no/such.ext4") && error.description.contains("--rootfs"))
        }
    }

    @Test func emptyOrBadCommandsAreRefused() {
        #expect(throws: SandboxError.self) { try Sandbox.validate(Command([])) }
        #expect(throws: SandboxError.self) { try Sandbox.validate(Command([""])) }
        var c = Command(["true"])
        c.environment = [("A=B", "x")]
        #expect(throws: SandboxError.self) { try Sandbox.validate(c) }
        c = Command(["true"])
        c.timeoutSeconds = 0
        #expect(throws: SandboxError.self) { try Sandbox.validate(c) }
    }

    /// Commands over the agent's limits are refused before any boot, with a
    /// message that says what is too big, instead of trapping or being refused
    /// by the agent after the boot.
    @Test func commandsOverTheAgentsLimitsAreRefusedBeforeBooting() {
        func problem(_ c: Command) -> String? {
            do { try Sandbox.validate(c); return nil } catch { return error.description }
        }
        let big = String(repeating: "x", count: AgentProtocol.Limits.stringBytes + 1)
        #expect(problem(Command(["echo", big]))?.contains("an argument of \(big.utf8.count) bytes") == true)
        #expect(problem(Command(["true"] + [String](repeating: "a", count: AgentProtocol.Limits.arguments)))?
            .contains("arguments are more than") == true)
        var env = Command(["true"])
        env.environment = [("A", big)]
        #expect(problem(env)?.contains("an environment variable") == true)
        // Each piece within its limit, together over one frame.
        let piece = String(repeating: "y", count: AgentProtocol.Limits.stringBytes)
        let total = problem(Command(["echo"] + [String](repeating: piece, count: 9)))
        #expect(total?.contains("one run request may hold") == true, "\(total ?? "accepted")")
        #expect(problem(Command(["echo"] + [String](repeating: piece, count: 7))) == nil)
    }

    @Test func theJSONDocumentHasEveryKey() throws {
        var r = RunResult()
        r.stdout = Array("out\n".utf8)
        r.exitCode = 7
        r.timings.commandMs = 1.5
        let object = try JSONSerialization.jsonObject(with: Data(r.jsonDocument().utf8)) as! [String: Any]
        #expect(Set(object.keys) == ["stdout", "stderr", "stdoutBase64", "stderrBase64", "exitCode", "signal", "timedOut",
                                     "outputTruncated", "failure", "systemEvent", "timings", "snapshot"])
        #expect(object["stdout"] as? String == "out\n" && object["exitCode"] as? Int == 7)
        #expect(object["signal"] is NSNull && object["stdoutBase64"] is NSNull && object["stderrBase64"] is NSNull)
        #expect(object["snapshot"] is NSNull, "no snapshot used: null, not missing")
        let timings = try #require(object["timings"] as? [String: Any])
        #expect(Set(timings.keys) == ["vmmStartMs", "kernelBootMs", "restoreMs", "agentReadyMs", "commandMs", "shutdownMs", "totalMs"])
        r.snapshot = SnapshotUse(path: "/s.snap", restored: true, restoreMs: 2.5)
        let restored = try JSONSerialization.jsonObject(with: Data(r.jsonDocument().utf8)) as! [String: Any]
        let snapshot = try #require(restored["snapshot"] as? [String: Any])
        #expect(snapshot["restored"] as? Bool == true && snapshot["restoreMs"] as? Double == 2.5 && snapshot["path"] as? String == "/s.snap")
    }
}

/// The jailed VMM's result reaches the root supervisor as bounded, framed bytes.
struct ResultWireTests {
    func roundTrip(_ write: @escaping @Sendable (Int32) -> Void, limit: Int = 1 << 20)
        -> (json: [UInt8], stdout: [UInt8], stderr: [UInt8])? {
        // The reader may stop early (that is the point); the writer then gets EPIPE, as the VMM does.
        signal(SIGPIPE, SIG_IGN)
        var fds: [Int32] = [-1, -1]
        #expect(pipe(&fds) == 0)
        let writer = fds[1]
        let done = DispatchSemaphore(value: 0)
        Thread { write(writer); close(writer); done.signal() }.start()
        let got = JailedRun.ResultWire.read(fd: fds[0], outputLimit: limit)
        close(fds[0])
        done.wait()
        return got
    }

    @Test func outputTravelsAsRawBytesBesideTheReply() throws {
        let out = (0..<300_000).map { UInt8(truncatingIfNeeded: $0) }
        let got = try #require(roundTrip { JailedRun.ResultWire.write(fd: $0, json: Array("{}".utf8), stdout: out, stderr: [0xFF]) })
        #expect(got.json == Array("{}".utf8) && got.stdout == out && got.stderr == [0xFF])
    }

    @Test func aClaimOverTheLimitsOrAShortStreamIsNoResult() {
        // stdout claims 2 MiB against a 1 MiB limit: refused before anything is read or allocated.
        #expect(roundTrip({ JailedRun.ResultWire.write(fd: $0, json: [], stdout: [UInt8](repeating: 1, count: 2 << 20), stderr: []) }) == nil)
        #expect(roundTrip({ fd in
            var header = [UInt8](repeating: 0, count: 24)
            header[7] = 0x80  // a JSON length of 2^63
            _ = header.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, 24) }
        }) == nil)
        // A stream that ends before the bytes it announced.
        #expect(roundTrip({ fd in
            var header = [UInt8](repeating: 0, count: 24)
            header[8] = 10
            _ = header.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, 24) }
        }) == nil)
    }
}

extension ConfigurationTests {
    /// Output that is not UTF-8 keeps its exact bytes in base64 beside the text.
    @Test func theJSONDocumentKeepsBytesThatAreNotText() throws {
        var r = RunResult()
        r.stdout = [0x68, 0x69, 0xFF, 0x00, 0x0A]
        r.stderr = Array("é\n".utf8)
        let object = try JSONSerialization.jsonObject(with: Data(r.jsonDocument().utf8)) as! [String: Any]
        #expect(object["stdout"] as? String == "hi\u{FFFD}\u{0}\n")
        let exact = try #require((object["stdoutBase64"] as? String).flatMap { Data(base64Encoded: $0) })
        #expect([UInt8](exact) == r.stdout)
        #expect(object["stderr"] as? String == "é\n" && object["stderrBase64"] is NSNull)
    }
}

func startThread(_ body: @escaping @Sendable () -> Void) throws {
    let t = Thread(block: body)
    t.start()
}

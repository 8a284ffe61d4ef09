import SeededRandom
import Testing
@testable import AgentProtocol

/// The host-guest protocol: every message survives encoding, a stream cut
/// anywhere reassembles, and every kind of lie is an error, never a trap.
struct ProtocolTests {
    static let run = RunRequest(runID: 7, arguments: ["sh", "-c", "echo ü; exit 3"], environment: ["A=1", "B="],
                                workingDirectory: "/tmp", user: "airlock:airlock", hasStdin: true, shutdownAfter: false)

    static let freshRun = RunRequest(runID: 8, arguments: ["true"], environment: [], workingDirectory: "/", user: "",
                                     hasStdin: false, shutdownAfter: true, hostTimeNanoseconds: 1_764_590_000_123_456_789,
                                     entropy: Array(0..<64))

    static let hostMessages: [HostMessage] = [
        .run(run), .run(freshRun), .stdin(runID: 7, data: Array(0...255)), .stdin(runID: 1, data: []), .stdinEOF(runID: 7), .shutdown,
    ]
    static let guestMessages: [GuestMessage] = [
        .hello(version: AgentProtocol.version, agent: "airlock-init 1"),
        .started(runID: 7, pid: 42),
        .exited(runID: 7, status: .exited(3), stdoutBytes: 1 << 40, stderrBytes: 0),
        .exited(runID: 8, status: .exited(-1), stdoutBytes: 0, stderrBytes: 5),
        .exited(runID: 9, status: .signaled(9), stdoutBytes: 1, stderrBytes: 2),
        .runFailed(runID: 9, reason: .commandNotFound, message: "nope: command not found", stdoutBytes: 3, stderrBytes: 4),
    ]

    static func decodeAll<M>(_ bytes: [UInt8], chunk: Int, _ decode: (UInt8, [UInt8]) throws(ProtocolError) -> M) throws -> [M] {
        var d = FrameDecoder()
        var out: [M] = []
        var i = 0
        while i < bytes.count {
            d.feed(bytes[i..<min(bytes.count, i + chunk)])
            i += chunk
            while let f = try d.next() { out.append(try decode(f.type, f.body)) }
        }
        #expect(d.pendingBytes == 0)
        return out
    }

    @Test func aRunRequestWithoutTheClockAndEntropyFieldsStillDecodes() throws {
        // The layout before they were added: the same body with its last two fields cut off.
        let (_, body) = HostMessage.run(Self.run).tagAndBody()
        let old = Array(body.dropLast(8 + 4))
        guard case let .run(r) = try HostMessage.decode(type: 1, body: old) else { Issue.record("not a run request"); return }
        #expect(r.hostTimeNanoseconds == 0 && r.entropy.isEmpty && r.arguments == Self.run.arguments)
    }

    @Test func entropyOverTheLimitIsRefused() {
        var r = Self.freshRun
        r.entropy = [UInt8](repeating: 7, count: AgentProtocol.Limits.entropy + 1)
        let (_, body) = HostMessage.run(r).tagAndBody()
        #expect(throws: ProtocolError.self) { try HostMessage.decode(type: 1, body: body) }
    }

    @Test(arguments: [1, 2, 3, 5, 64, 100_000])
    func hostMessagesRoundTripWhateverTheChunking(chunk: Int) throws {
        let stream = Self.hostMessages.flatMap { $0.encoded() }
        #expect(try Self.decodeAll(stream, chunk: chunk, HostMessage.decode) == Self.hostMessages)
    }

    @Test(arguments: [1, 4, 7, 100_000])
    func guestMessagesRoundTripWhateverTheChunking(chunk: Int) throws {
        let stream = Self.guestMessages.flatMap { $0.encoded() }
        #expect(try Self.decodeAll(stream, chunk: chunk, GuestMessage.decode) == Self.guestMessages)
    }

    @Test func aFrameIsLengthTypeBody() {
        #expect(HostMessage.shutdown.encoded() == [1, 0, 0, 0, 4])
        #expect(HostMessage.stdinEOF(runID: 0x0102_0304).encoded() == [5, 0, 0, 0, 3, 4, 3, 2, 1])
    }

    @Test func lengthsOutsideTheLimitPoisonTheStream() throws {
        for header in [[0, 0, 0, 0, 1], [1, 0, 16, 0, 1], [0xFF, 0xFF, 0xFF, 0xFF, 1]] as [[UInt8]] {
            var d = FrameDecoder()
            d.feed(header)
            #expect(throws: ProtocolError.self) { try d.next() }
            // Nothing after a lying length can be trusted: a valid frame is not accepted any more.
            d.feed(HostMessage.shutdown.encoded())
            #expect(throws: ProtocolError.self) { try d.next() }
            #expect(d.failure != nil)
        }
    }

    @Test func aFrameAtTheLimitIsAcceptedAndBufferedAtMostOnce() throws {
        var d = FrameDecoder()
        let body = [UInt8](repeating: 0xAB, count: Frame.maxLength - 1)
        let frame = Frame.encode(type: 99, body: body)
        d.feed(frame.prefix(Frame.maxLength))
        #expect(try d.next() == nil)
        d.feed(frame.dropFirst(Frame.maxLength))
        let f = try #require(try d.next())
        #expect(f.type == 99 && f.body.count == body.count)
        #expect(d.pendingBytes == 0)
    }

    func guestError(_ type: UInt8, _ body: [UInt8]) -> ProtocolError? {
        do { _ = try GuestMessage.decode(type: type, body: body); return nil } catch { return error }
    }
    func hostError(_ type: UInt8, _ body: [UInt8]) -> ProtocolError? {
        do { _ = try HostMessage.decode(type: type, body: body); return nil } catch { return error }
    }

    @Test func malformedBodiesAreErrorsThatSayWhat() {
        var w = WireWriter()
        w.u32(1)
        // Truncated: started needs a pid after the run id.
        #expect(guestError(0x82, w.bytes)?.description.contains("pid") == true)
        // Trailing bytes.
        #expect(guestError(0x82, w.bytes + [0, 0, 0, 0, 9]) != nil)
        // Unknown types on both sides.
        #expect(guestError(0x99, [])?.description.contains("unknown guest message") == true)
        #expect(hostError(0x42, [])?.description.contains("unknown host message") == true)
        // A status kind that is neither exited nor signaled, and a signal that is not one.
        var e = WireWriter(); e.u32(1); e.u8(2); e.i32(0); e.u64(0); e.u64(0)
        #expect(guestError(0x83, e.bytes) != nil)
        var s = WireWriter(); s.u32(1); s.u8(1); s.i32(65); s.u64(0); s.u64(0)
        #expect(guestError(0x83, s.bytes)?.description.contains("signal 65") == true)
        // An unknown failure reason.
        var f = WireWriter(); f.u32(1); f.u8(9); f.string("x"); f.u64(0); f.u64(0)
        #expect(guestError(0x84, f.bytes) != nil)
    }

    @Test func stringsAndCountsAreChecked() {
        func runBody(_ edit: (inout WireWriter) -> Void) -> [UInt8] {
            var w = WireWriter()
            w.u32(1)
            edit(&w)
            return w.bytes
        }
        // No arguments at all.
        #expect(hostError(1, runBody { $0.strings([]); $0.strings([]); $0.string("/"); $0.string(""); $0.bool(false); $0.bool(true) }) != nil)
        // Invalid UTF-8 and an embedded NUL in argv[0].
        #expect(hostError(1, runBody { $0.u32(1); $0.data([0xFF, 0xFE]); $0.strings([]); $0.string("/"); $0.string(""); $0.bool(false); $0.bool(true) })?
            .description.contains("UTF-8") == true)
        #expect(hostError(1, runBody { $0.strings(["a\u{0}b"]); $0.strings([]); $0.string("/"); $0.string(""); $0.bool(false); $0.bool(true) })?
            .description.contains("NUL") == true)
        // A count over the limit is refused before anything is allocated for it.
        #expect(hostError(1, runBody { $0.u32(UInt32.max) })?.description.contains("limit") == true)
        // A boolean that is 2.
        #expect(hostError(1, runBody { $0.strings(["a"]); $0.strings([]); $0.string("/"); $0.string(""); $0.u8(2); $0.bool(true) }) != nil)
        // A stdin chunk over its limit.
        var big = WireWriter(); big.u32(1); big.data([UInt8](repeating: 0, count: AgentProtocol.Limits.stdinChunk + 1))
        #expect(hostError(2, big.bytes) != nil)
    }

    @Test func anotherProtocolVersionIsRefusedWithWhatToDo() {
        var w = WireWriter()
        w.u16(AgentProtocol.version + 1)
        w.string("future agent")
        let e = guestError(0x81, w.bytes)
        #expect(e == .versionMismatch(theirs: AgentProtocol.version + 1, ours: AgentProtocol.version))
        #expect(e?.description.contains("make rootfs") == true)
    }

    /// Random bytes and mutated valid frames into both decoders: errors are fine, traps are not.
    @Test func randomAndMutatedStreamsNeverTrap() {
        var rng = SplitMix64(seed: 0xA1B2)
        let valid = Self.hostMessages.flatMap { $0.encoded() } + Self.guestMessages.flatMap { $0.encoded() }
        var decoded = 0
        for round in 0..<3000 {
            var bytes: [UInt8]
            if round % 2 == 0 {
                bytes = (0..<Int(rng.next() % 300)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            } else {
                bytes = valid
                for _ in 0..<(1 + Int(rng.next() % 8)) {
                    bytes[Int(rng.next() % UInt64(bytes.count))] = UInt8(truncatingIfNeeded: rng.next())
                }
            }
            var d = FrameDecoder()
            d.feed(bytes)
            while let f = try? d.next() {
                if (try? GuestMessage.decode(type: f.type, body: f.body)) != nil { decoded += 1 }
                if (try? HostMessage.decode(type: f.type, body: f.body)) != nil { decoded += 1 }
            }
            #expect(d.pendingBytes <= Frame.maxLength + Frame.headerSize)
        }
        #expect(decoded > 0, "the mutated streams should still hold some valid frames")
    }
}


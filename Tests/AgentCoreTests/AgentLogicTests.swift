import Glibc
import Testing
import AgentProtocol
@testable import AgentCore
import AgentProtocol

/// The agent's decisions that need no VM: who a command runs as, its
/// environment, and which file exec gets.
struct AccountsTests {
    let passwd = Accounts.parsePasswd("""
        root:x:0:0:root:/root:/bin/sh
        airlock:x:1000:1000:airlock:/home/airlock:/bin/sh
        broken line without fields
        nobody:x:65534:65534:nobody:/nonexistent:/bin/false
        """)
    let groups = Accounts.parseGroup("""
        root:x:0:
        airlock:x:1000:
        wheel:x:10:airlock,other
        nogroup:x:65534:
        """)

    @Test func malformedLinesAreSkipped() {
        #expect(passwd.map(\.name) == ["root", "airlock", "nobody"])
        #expect(groups.first { $0.name == "wheel" }?.members == ["airlock", "other"])
    }

    @Test func rootIsTheDefault() throws {
        #expect(try Accounts.resolve("", passwd: passwd, groups: groups).get() == .root)
        #expect(try Accounts.resolve("root", passwd: passwd, groups: groups).get() == .root)
    }

    @Test func aNameGetsItsGroupsAndHome() throws {
        let c = try Accounts.resolve("airlock", passwd: passwd, groups: groups).get()
        #expect(c == Credentials(uid: 1000, gid: 1000, groups: [1000, 10], home: "/home/airlock"))
    }

    @Test func numbersNeedNotExist() throws {
        #expect(try Accounts.resolve("4242", passwd: passwd, groups: groups).get() == Credentials(uid: 4242, gid: 4242, groups: [4242], home: "/"))
        #expect(try Accounts.resolve("4242:7", passwd: passwd, groups: groups).get() == Credentials(uid: 4242, gid: 7, groups: [7], home: "/"))
        #expect(try Accounts.resolve("1000:nogroup", passwd: passwd, groups: groups).get().gid == 65534)
    }

    @Test func unknownNamesSayWhatExists() {
        guard case let .failure(e) = Accounts.resolve("mallory", passwd: passwd, groups: groups) else { Issue.record("resolved"); return }
        #expect(e.description.contains("mallory") && e.description.contains("root, airlock, nobody"))
        guard case let .failure(g) = Accounts.resolve("airlock:nosuch", passwd: passwd, groups: groups) else { Issue.record("resolved"); return }
        #expect(g.description.contains("nosuch"))
        guard case .failure = Accounts.resolve(":10", passwd: passwd, groups: groups) else { Issue.record("resolved"); return }
        guard case let .failure(empty) = Accounts.resolve("root:", passwd: passwd, groups: groups) else { Issue.record("resolved"); return }
        #expect(empty.description.contains("empty group"))
    }
}

struct CommandLookupTests {
    let files: [String: PathKind] = [
        "/bin/sh": .executableFile, "/usr/bin/python3": .executableFile,
        "/usr/local/bin/tool": .notExecutable, "/usr/bin/tool": .executableFile,
        "/opt/data": .notExecutable, "/work/run.sh": .executableFile,
    ]
    func kind(_ p: String) -> PathKind { files[p] ?? .missing }

    @Test func pathSearchTakesTheFirstExecutable() throws {
        #expect(try CommandLookup.resolve("sh", path: "/usr/bin:/bin", workingDirectory: "/", kind: kind).get() == "/bin/sh")
        // A non-executable earlier match does not hide an executable later one.
        #expect(try CommandLookup.resolve("tool", path: "/usr/local/bin:/usr/bin", workingDirectory: "/", kind: kind).get() == "/usr/bin/tool")
        // An empty PATH entry is the working directory.
        #expect(try CommandLookup.resolve("run.sh", path: "/bin::/usr/bin", workingDirectory: "/work", kind: kind).get() == "/work/run.sh")
    }

    @Test func notFoundAndNotExecutableAreTold() {
        guard case let .failure(e) = CommandLookup.resolve("nope", path: "/bin", workingDirectory: "/", kind: kind) else { Issue.record("found"); return }
        #expect(e == .commandNotFound("nope: command not found in the guest (PATH=/bin)"))
        guard case .failure(.notExecutable) = CommandLookup.resolve("tool", path: "/usr/local/bin", workingDirectory: "/", kind: kind) else { Issue.record("wrong"); return }
        guard case .failure(.notExecutable) = CommandLookup.resolve("/opt/data", path: "/bin", workingDirectory: "/", kind: kind) else { Issue.record("wrong"); return }
        guard case .failure(.commandNotFound) = CommandLookup.resolve("", path: "/bin", workingDirectory: "/", kind: kind) else { Issue.record("wrong"); return }
    }

    @Test func slashesBypassPathAndResolveAgainstTheWorkingDirectory() throws {
        #expect(try CommandLookup.resolve("./run.sh", path: "/bin", workingDirectory: "/work", kind: { $0 == "/work/./run.sh" ? .executableFile : .missing }).get() == "/work/./run.sh")
        guard case .failure(.commandNotFound) = CommandLookup.resolve("/bin/nope", path: "/bin", workingDirectory: "/", kind: kind) else { Issue.record("wrong"); return }
    }

    @Test func environmentGetsDefaultsAndLaterEntriesWin() {
        let env = CommandLookup.environment(["A=1", "PATH=/x", "A=2", "EMPTY="], home: "/home/u")
        #expect(env == ["A=2", "PATH=/x", "EMPTY=", "HOME=/home/u"])
        #expect(CommandLookup.searchPath(in: env) == "/x")
        let defaults = CommandLookup.environment([], home: "/root")
        #expect(defaults == ["PATH=\(CommandLookup.defaultPath)", "HOME=/root"])
    }
}

/// The clock and entropy a run request brings, applied against a fake clock:
/// a guest restored an hour after its snapshot was taken wakes an hour slow.
struct FreshnessTests {
    final class FakeClock: WallClock {
        var time: UInt64
        var sets: [UInt64] = []
        var failWith: Int32 = 0
        init(_ time: UInt64) { self.time = time }
        func now() -> UInt64 { time }
        func set(_ nanoseconds: UInt64) -> Int32 {
            guard failWith == 0 else { return failWith }
            sets.append(nanoseconds)
            time = nanoseconds
            return 0
        }
    }

    static let snapshotTime: UInt64 = 1_764_590_000 * 1_000_000_000
    static let hour: UInt64 = 3600 * 1_000_000_000

    static func request(host: UInt64, entropy: [UInt8] = []) -> RunRequest {
        RunRequest(runID: 1, arguments: ["date"], environment: [], workingDirectory: "/", user: "", hasStdin: false,
                   shutdownAfter: true, hostTimeNanoseconds: host, entropy: entropy)
    }

    @Test func aGuestRestoredAnHourLaterIsMovedToTheHostsTime() {
        // The guest's clock stopped at the snapshot; the host's has gone on by an hour.
        let clock = FakeClock(Self.snapshotTime + 2_000_000)
        let problems = Freshness.apply(Self.request(host: Self.snapshotTime + Self.hour), clock: clock, addEntropy: { _ in 0 })
        #expect(problems.isEmpty)
        #expect(clock.sets == [Self.snapshotTime + Self.hour])
        #expect(clock.now() == Self.snapshotTime + Self.hour)
    }

    @Test func aClockAheadOfTheHostIsMovedBackToo() {
        let clock = FakeClock(Self.snapshotTime + Self.hour)
        _ = Freshness.apply(Self.request(host: Self.snapshotTime), clock: clock, addEntropy: { _ in 0 })
        #expect(clock.sets == [Self.snapshotTime])
    }

    @Test func aClockWithinTheToleranceIsLeftAlone() {
        let clock = FakeClock(Self.snapshotTime + Freshness.clockTolerance)
        _ = Freshness.apply(Self.request(host: Self.snapshotTime), clock: clock, addEntropy: { _ in 0 })
        #expect(clock.sets.isEmpty)
        // An older host that sends no time (0) changes nothing either.
        _ = Freshness.apply(Self.request(host: 0), clock: clock, addEntropy: { _ in 0 })
        #expect(clock.sets.isEmpty)
    }

    @Test func theHostsEntropyGoesToThePoolAndFailuresAreReported() {
        let clock = FakeClock(Self.snapshotTime)
        clock.failWith = EPERM
        var received: [[UInt8]] = []
        let problems = Freshness.apply(Self.request(host: Self.snapshotTime + Self.hour, entropy: [1, 2, 3]), clock: clock,
                                       addEntropy: { received.append($0); return ENOTTY })
        #expect(received == [[1, 2, 3]])
        #expect(problems.count == 2)
        // No entropy, no call.
        _ = Freshness.apply(Self.request(host: 0), clock: clock, addEntropy: { received.append($0); return 0 })
        #expect(received.count == 1)
    }
}

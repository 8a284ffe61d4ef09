@testable import Jailer
import Testing

struct JailSpecTests {
    static let sample = JailSpec(
        id: "vm-1", rootDirectory: "/run/airlock/jail/vm-1/root", uid: 2_000_000_000, gid: 2_000_000_001,
        keepFds: [0, 1, 2, 7],
        cgroups: ["/sys/fs/cgroup/memory/airlock/vm-1", "/sys/fs/cgroup/with space/%odd\nname"],
        rlimits: JailRlimits(openFiles: 128, fileSize: 1 << 30, processes: 64),
        userNamespace: true, lifelineFd: 9, hostname: "")

    @Test func theTextFormRoundTrips() throws {
        var spec = Self.sample
        spec.hostname = "airlock"
        #expect(try JailSpec(decoding: spec.encoded()) == spec)
        var minimal = JailSpec(id: "a", rootDirectory: "/r", uid: 1, gid: 1)
        minimal.keepFds = []
        #expect(try JailSpec(decoding: minimal.encoded()) == minimal)
    }

    @Test func escapingKeepsEveryByte() throws {
        for s in ["", "%", "%25", "a b", "tab\there", "new\nline", "ünïcödé", "100%"] {
            #expect(try JailSpec.unescape(JailSpec.escape(s)) == s)
            #expect(!JailSpec.escape(s).contains(" ") && !JailSpec.escape(s).contains("\n"))
        }
    }

    @Test func aBadTextFormIsRefusedWithAReason() {
        #expect(throws: JailError.self) { try JailSpec(decoding: "something else") }
        let text = JailSpec(id: "a", rootDirectory: "/r", uid: 1, gid: 1).encoded()
        for (broken, mentions) in [(text + "\nfrobnicate 1", "unknown key 'frobnicate'"),
                                   (text + "\nuid x", "bad number"),
                                   (text + "\nfile ro path /a /b", "unknown key 'file'"),
                                   (text + "\ndevice kvm", "unknown key 'device'"),
                                   (text.replacingFirst("uid 1", with: "uid 0"), "must not run as root")] {
            do {
                _ = try JailSpec(decoding: broken)
                Issue.record("accepted: \(broken)")
            } catch {
                #expect(error.description.contains(mentions), "\(error)")
            }
        }
    }

    @Test func validationNamesTheProblem() {
        func problem(_ change: (inout JailSpec) -> Void) -> String {
            var spec = Self.sample
            spec.hostname = "airlock"
            change(&spec)
            do { try spec.validate(); return "" } catch { return error.description }
        }
        #expect(problem { _ in } == "")
        #expect(problem { $0.id = "../x" }.contains("VM id '../x'"))
        #expect(problem { $0.rootDirectory = "relative" }.contains("not an absolute path"))
        #expect(problem { $0.keepFds = [-1] }.contains("negative"))
        #expect(problem { $0.lifelineFd = 7 }.contains("lifeline"))
        #expect(problem { $0.uid = 0 }.contains("root"))
    }

    @Test func exitStatusesSaySandboxFailure() {
        #expect(JailExit.exited(159).isSeccompViolation)
        #expect(!JailExit.exited(0).isSeccompViolation && !JailExit.signaled(31).isSeccompViolation)
        #expect(JailExit.exited(159).description.contains("sandbox failure"))
        #expect(JailExit.signaled(9).description.contains("signal 9"))
    }
}

extension String {
    /// The lines of the text form with one line swapped (no Foundation here).
    func replacingFirst(_ target: String, with replacement: String) -> String {
        var lines = split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        if let i = lines.firstIndex(of: target) { lines[i] = replacement }
        return lines.joined(separator: "\n")
    }
}

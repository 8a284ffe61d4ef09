import Testing
@testable import AgentProtocol

/// The mount list the host puts on the kernel command line and the agent reads.
@Suite struct GuestMountTests {
    @Test func aListRoundTrips() throws {
        let mounts = [
            GuestMount(source: .tmpfs, target: "/mnt", readOnly: false),
            GuestMount(source: .disk("vdb"), target: "/workspace", readOnly: false, ownedByRunUser: true),
            GuestMount(source: .disk("vdc"), target: "/mnt/disk0", readOnly: true),
            GuestMount(source: .disk("vdaa"), target: "/data/set-1_v2.0+x@y", readOnly: true),
        ]
        let text = GuestMount.encode(mounts)
        #expect(text == "tmpfs:/mnt:rw,vdb:/workspace:rw:own,vdc:/mnt/disk0:ro,vdaa:/data/set-1_v2.0+x@y:ro")
        #expect(try GuestMount.decode(text) == mounts)
        #expect(try GuestMount.decode("") == [])
    }

    @Test func diskNamesFollowTheGuestsOrder() {
        #expect((0..<4).map(GuestMount.diskName) == ["vda", "vdb", "vdc", "vdd"])
        #expect(GuestMount.diskName(index: 25) == "vdz" && GuestMount.diskName(index: 26) == "vdaa")
    }

    @Test(arguments: [
        ("/", "the root filesystem itself"), ("workspace", "absolute"), ("/a//b", "empty component"), ("/a/", "empty component"),
        ("/a/../etc", "'.' or '..' component"), ("/./a", "'.' or '..' component"), ("/with space", "only letters"), ("/a,b", "only letters"),
        ("/a:b", "only letters"), ("/a=b", "only letters"), ("/caf\u{e9}", "only letters"), ("/" + String(repeating: "x", count: 300), "longer than 255"),
    ])
    func targetsThatCannotTravelAreRefused(target: String, reason: String) {
        #expect(GuestMount.targetProblem(target)?.contains(reason) == true, "\(target): \(String(describing: GuestMount.targetProblem(target)))")
        #expect(throws: ProtocolError.self) { try GuestMount.decode("vdb:\(target):rw") }
    }

    @Test(arguments: ["vdb:/w", "vdb:/w:rx", "vdb:/w:ro:own", "vdb:/w:rw:mine", "sda:/w:rw", "vd:/w:rw", "vdB:/w:rw", "vdbbb:/w:rw", "vdb:/w:rw:x", ",", "vdb:/w:rw,"])
    func malformedListsAreRefused(text: String) {
        #expect(throws: ProtocolError.self) { try GuestMount.decode(text) }
    }

    @Test func theCountIsBounded() throws {
        let many = (0..<17).map { "vdb:/m\($0):ro" }.joined(separator: ",")
        #expect(throws: ProtocolError.self) { try GuestMount.decode(many) }
        #expect(try GuestMount.decode((0..<16).map { "vdb:/m\($0):ro" }.joined(separator: ",")).count == 16)
    }

    @Test func underIsByComponent() {
        #expect(GuestMount.path("/workspace/out", isUnder: "/workspace"))
        #expect(GuestMount.path("/workspace", isUnder: "/workspace"))
        #expect(!GuestMount.path("/workspace2/out", isUnder: "/workspace"))
    }
}

// Test-only: a VMM that enters its jail like airlock-vmm and then misbehaves on purpose, so
// the tests can check that a supervisor survives a hostile or broken VMM and leaves nothing
// behind. Never installed; AirlockTests start it through wrapper scripts.
//
//   airlock-fake-vmm --mode MODE [airlock-vmm's own arguments, ignored]
//
// MODE: garbage (hello, then a frame of an unknown type), oversized (hello, then a frame
// header claiming 16 MiB), descriptors (hello with a descriptor attached), silent (never says
// hello, never reads), exit-at-boot (hello, then exits when the boot request arrives),
// exit-mid-run (boots, then exits when the run request arrives), mute-run (boots, takes the
// run, never answers), flood (boots, then answers the run with thousands of 'started').
import AgentProtocol
import AirlockOS
import Jailer
import SessionProtocol
#if canImport(Glibc)
import Glibc
#endif

var mode = ""
var args = CommandLine.arguments.dropFirst()
while let a = args.popFirst() { if a == "--mode", let m = args.popFirst() { mode = m } }
do { _ = try Jail.enter() } catch {
    writeToStandardError("airlock-fake-vmm: \(error)\n")
    exit(JailExitCode.setupFailed)
}
let channel = SessionChannel(socket: UnixSocket(adopting: 3))
func send(_ m: VMMMessage) { try? channel.send(m.encoded()) }
func next() -> SupervisorMessage? {
    guard case let .frame(type, body)? = try? channel.receive() else { return nil }
    guard let m = try? SupervisorMessage.decode(type: type, body: body) else { return nil }
    _ = channel.takeDescriptors(m.descriptorCount)
    return m
}
func hang() -> Never { while true { sleep(1000) } }

switch mode {
case "silent":
    hang()
case "garbage":
    send(.hello(version: SessionProtocol.version))
    try? channel.send(Frame.encode(type: 0x7F, body: [1, 2, 3]))
    hang()
case "oversized":
    send(.hello(version: SessionProtocol.version))
    try? channel.socket.send([0x00, 0x00, 0x00, 0x01, 0x82])  // 16 MiB claimed, nothing follows
    hang()
case "descriptors":
    let fds: [Int32] = [0, 1]
    try? channel.socket.send(VMMMessage.hello(version: SessionProtocol.version).encoded(), descriptors: fds)
    hang()
case "exit-at-boot":
    send(.hello(version: SessionProtocol.version))
    _ = next()
    exit(0)
default:
    send(.hello(version: SessionProtocol.version))
    guard case .boot? = next() else { exit(1) }
    send(.booted(BootReport(vmmStartMs: 1, kernelBootMs: 1, agent: "fake", guestMode: "hardware")))
    guard case let .run(spec)? = next() else { exit(1) }
    switch mode {
    case "exit-mid-run":
        send(.started(runID: spec.runID))
        exit(3)
    case "flood":
        for _ in 0..<100_000 { send(.started(runID: spec.runID)) }
        hang()
    default:  // mute-run
        hang()
    }
}

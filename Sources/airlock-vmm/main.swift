// airlock-vmm: the jailed process that hosts one VM for its whole life and serves the session
// protocol to its supervisor (docs/architecture.md, "The process boundary"). A supervisor
// (the airlock CLI, or any program using `Sandbox`) starts it through the Jailer with the
// session socket on descriptor 3; it is not meant to be run by hand.
//
//   airlock-vmm [--log-level LEVEL]
import AirlockOS
import Jailer
import Logging
import SandboxEngine
import SessionProtocol
#if canImport(Glibc)
import Glibc
#endif

let sessionDescriptor: Int32 = 3

var level = Logger.Level.warning
#if DEBUG
var violation: TestViolation?
#endif
var arguments = CommandLine.arguments.dropFirst()
while let argument = arguments.popFirst() {
    switch argument {
    case "--log-level":
        guard let value = arguments.popFirst(), let parsed = Logger.Level(rawValue: value) else {
            writeToStandardError("airlock-vmm: --log-level needs one of trace, debug, info, notice, warning, error, critical\n")
            exit(2)
        }
        level = parsed
    #if DEBUG
    case "--test-violation":
        guard let value = arguments.popFirst(), let parsed = TestViolation(value) else {
            writeToStandardError("airlock-vmm: --test-violation needs ROLE:CALL (main or vcpu; execve, socket, open or ioctl)\n")
            exit(2)
        }
        violation = parsed
    #endif
    default:
        writeToStandardError("airlock-vmm: unknown argument '\(argument)': this program is started by Airlock's supervisor, not by hand\n")
        exit(2)
    }
}

signal(SIGPIPE, SIG_IGN)
// Jail.enter wants a single-threaded process: nothing else has run yet.
do { _ = try Jail.enter() } catch {
    writeToStandardError("airlock-vmm: the VMM cannot enter its jail: \(error)\n")
    exit(JailExitCode.setupFailed)
}
guard fcntl(sessionDescriptor, F_GETFD) >= 0 else {
    writeToStandardError("airlock-vmm: no session socket on descriptor \(sessionDescriptor): start it through Airlock's supervisor\n")
    exit(JailExitCode.setupFailed)
}
let chosenLevel = level
LoggingSystem.bootstrap { label in
    var h = StreamLogHandler.standardError(label: label)
    h.logLevel = chosenLevel
    return h
}

#if DEBUG
let testViolation = violation
#endif
let hooks = EngineHooks(
    beforeThreads: {
        try Seccomp.install(.main)
        #if DEBUG
        if let testViolation, testViolation.role == "main" { testViolation.commit() }
        #endif
    },
    vcpuThreadSetup: { _ in
        try Seccomp.install(.vcpu)
        #if DEBUG
        if let testViolation, testViolation.role == "vcpu" { testViolation.commit() }
        #endif
    })
let channel = SessionChannel(socket: UnixSocket(adopting: sessionDescriptor))
exit(SessionServer(channel: channel, hooks: hooks, logger: Logger(label: "airlock.vmm")).serve())

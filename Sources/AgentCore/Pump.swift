import AgentProtocol
import CAgentShim
import Glibc

/// One started command and the agent's ends of its pipes.
struct RunningCommand {
    let runID: UInt32
    let pid: pid_t
    var stdinFD: Int32
    var stdoutFD: Int32
    var stderrFD: Int32
    var status: CommandStatus?
    var stdinBuffer: [UInt8] = []
    var stdinEOF = false
    var pendingOut: [UInt8] = []
    var pendingErr: [UInt8] = []
    var exitedAt: Int?

    init(runID: UInt32, pid: pid_t, stdinFD: Int32, stdoutFD: Int32, stderrFD: Int32) {
        self.runID = runID
        self.pid = pid
        self.stdinFD = stdinFD
        self.stdoutFD = stdoutFD
        self.stderrFD = stderrFD
    }
}

extension Agent {
    /// Moves bytes until the command has exited and its output is on the
    /// ports: pipes to ports (reading a pipe only when that stream's previous
    /// chunk is written, so a slow host slows the command instead of growing
    /// the agent), control frames to the stdin pipe, SIGCHLD to statuses.
    /// Returns true when the control channel broke.
    func pump(_ run: inout RunningCommand) -> Bool {
        var broken = false
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        defer {
            for fd in [run.stdinFD, run.stdoutFD, run.stderrFD] where fd >= 0 { close(fd) }
        }
        while true {
            if run.status != nil {
                let outputDone = run.stdoutFD < 0 && run.stderrFD < 0 && run.pendingOut.isEmpty && run.pendingErr.isEmpty
                if outputDone { return broken }
                // Something the command left running (it survived kill -1) keeps a pipe open: stop
                // reading it. What was read is still flushed, however slowly the host takes it.
                if let at = run.exitedAt, Sys.monotonicMilliseconds() - at > Self.drainMilliseconds,
                   run.stdoutFD >= 0 || run.stderrFD >= 0 {
                    Self.console("run \(run.runID): output pipes still open \(Self.drainMilliseconds) ms after the command exited; closing them")
                    for fd in [run.stdoutFD, run.stderrFD] where fd >= 0 { close(fd) }
                    run.stdoutFD = -1
                    run.stderrFD = -1
                }
            }
            // Stdin frames and signals for this run are applied; anything else waits for `serve`.
            while let i = inbox.firstIndex(where: { $0.isForRun(run.runID) }) {
                switch inbox.remove(at: i) {
                case let .stdin(_, data) where run.stdinFD >= 0: run.stdinBuffer += data
                case .stdinEOF: run.stdinEOF = true
                // The command leads its own process group (setsid): the signal reaches what it started too.
                case let .signal(_, signo) where run.status == nil: _ = kill(-run.pid, signo)
                default: break
                }
            }
            if run.stdinFD >= 0 && run.stdinEOF && run.stdinBuffer.isEmpty {
                close(run.stdinFD)
                run.stdinFD = -1
            }

            var fds: [pollfd] = []
            func watch(_ fd: Int32, _ events: Int32) -> Int {
                fds.append(pollfd(fd: fd, events: Int16(events), revents: 0))
                return fds.count - 1
            }
            let sig = watch(signals, POLLIN)
            let ctl = !broken && run.stdinBuffer.count < Self.stdinBufferLimit ? watch(control, POLLIN) : -1
            let outPipe = run.stdoutFD >= 0 && run.pendingOut.isEmpty ? watch(run.stdoutFD, POLLIN) : -1
            let errPipe = run.stderrFD >= 0 && run.pendingErr.isEmpty ? watch(run.stderrFD, POLLIN) : -1
            let outPort = run.pendingOut.isEmpty ? -1 : watch(stdoutPort, POLLOUT)
            let errPort = run.pendingErr.isEmpty ? -1 : watch(stderrPort, POLLOUT)
            let inPipe = run.stdinFD >= 0 && !run.stdinBuffer.isEmpty ? watch(run.stdinFD, POLLOUT) : -1

            let timeout: Int32 = run.status == nil ? -1 : 100
            let r = fds.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t($0.count), timeout) }
            if r < 0 {
                if errno == EINTR { continue }
                Self.console("poll: \(Sys.errorText(errno))")
                return true
            }
            func ready(_ i: Int) -> Bool { i >= 0 && fds[i].revents != 0 }

            if ready(sig) { reap(&run) }
            if ready(ctl) && !readControl() { broken = true }
            if ready(outPipe) { drainPipe(&run.stdoutFD, into: &run.pendingOut, chunk: &chunk) }
            if ready(errPipe) { drainPipe(&run.stderrFD, into: &run.pendingErr, chunk: &chunk) }
            if ready(outPort) { stdoutTotal += flush(&run.pendingOut, to: stdoutPort) }
            if ready(errPort) { stderrTotal += flush(&run.pendingErr, to: stderrPort) }
            if ready(inPipe) { feedStdin(&run) }
        }
    }

    /// Collects every exited child (PID 1 inherits orphans); records the command's own status.
    func reap(_ run: inout RunningCommand) {
        var info = signalfd_siginfo()
        while read(signals, &info, MemoryLayout<signalfd_siginfo>.size) > 0 {}
        while true {
            var status: Int32 = 0
            let pid = waitpid(-1, &status, WNOHANG)
            guard pid > 0 else { break }
            guard pid == run.pid else { continue }
            // WIFEXITED / WTERMSIG, spelled out: the macros are not imported.
            let signal = status & 0x7f
            run.status = signal == 0 ? .exited((status >> 8) & 0xff) : .signaled(signal)
            run.exitedAt = Sys.monotonicMilliseconds()
            // What the command started dies with it, so its pipes reach EOF
            // and a later run starts with a clean process table.
            kill(-1, SIGKILL)
        }
    }

    func drainPipe(_ fd: inout Int32, into pending: inout [UInt8], chunk: inout [UInt8]) {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n > 0 {
            pending.append(contentsOf: chunk[0..<n])
        } else if n == 0 || (errno != EAGAIN && errno != EINTR) {
            close(fd)
            fd = -1
        }
    }

    /// Writes what the port takes now; returns how many bytes went out.
    func flush(_ pending: inout [UInt8], to port: Int32) -> UInt64 {
        let n = pending.withUnsafeBytes { write(port, $0.baseAddress, $0.count) }
        guard n > 0 else {
            // EAGAIN: the host is behind; poll again. Anything else: the port is gone and the output with it.
            if errno != EAGAIN && errno != EINTR { pending.removeAll() }
            return 0
        }
        pending.removeFirst(n)
        return UInt64(n)
    }

    func feedStdin(_ run: inout RunningCommand) {
        let n = run.stdinBuffer.withUnsafeBytes { write(run.stdinFD, $0.baseAddress, $0.count) }
        if n > 0 {
            run.stdinBuffer.removeFirst(n)
        } else if errno != EAGAIN && errno != EINTR {
            // EPIPE: the command closed its stdin; the rest is not wanted.
            run.stdinBuffer.removeAll()
            close(run.stdinFD)
            run.stdinFD = -1
        }
    }
}

extension HostMessage {
    /// Stdin frames and signals belong to the run they name.
    func isForRun(_ runID: UInt32) -> Bool {
        switch self {
        case let .stdin(id, _), let .stdinEOF(id), let .signal(id, _): return id == runID
        default: return false
        }
    }
}

import AgentProtocol
import Logging
import SandboxEngine
import VMM

/// The virtual machine a sandbox runs in.
public struct SandboxConfig: Sendable, Codable, Equatable {
    /// The guest kernel (vmlinux or bzImage); nil: the installed image (`make images`).
    public var kernelPath: String?
    /// The root filesystem (ext4 with the agent at `agentPath`), attached read-only as /dev/vda; nil: the installed image.
    public var rootfsPath: String?
    public var memoryMiB: Int = 256
    public var cpus: Int = 1
    /// How long the guest may take from the first instruction to the agent's
    /// hello. Generous because on a PVM host the kernel is emulated (~20 s).
    public var bootTimeoutSeconds: Double = 300
    /// Appended to the kernel command line.
    public var extraKernelCommandLine: String = ""
    /// Where the agent is in the root filesystem (passed as init=).
    public var agentPath: String = "/sbin/airlock-init"
    /// Copy the guest kernel's console to this host fd as it is written (debugging); nil keeps it
    /// in memory. A jailed VMM's own log lines go there too (its stderr is this fd, or 2).
    public var consoleFD: Int32?
    /// The host's KVM backend quirks; nil detects them, here in the caller's process (a jailed
    /// VMM could not: /sys is outside its jail).
    public var hostProfile: HostProfile?
    /// Whether `Sandbox.runBlocking` and `airlock run` restore from (and save
    /// into) the snapshot store; `Sandbox.restore` and `saveSnapshot` use files directly.
    public var snapshots: SnapshotPolicy = .none
    /// The KVM device the caller can open; the VMM gets this descriptor, never a node of its own.
    public var kvmPath: String = "/dev/kvm"
    /// Where the VMM runs. `.jailed` (the default) needs root.
    public var isolation: Isolation = .jailed
    /// The `airlock-vmm` executable that becomes the jailed VMM; nil: `$AIRLOCK_VMM`, else the
    /// `airlock-vmm` installed beside this program (`swift build` puts it beside `airlock`).
    public var vmmExecutable: String?
    /// The VMM's own log level (its lines go to its stderr).
    public var vmmLogLevel: Logger.Level = .warning
    /// The first part of the jail's name (vm-<pid>-<n>): tests tell their jails apart by it.
    var jailTag = "vm"
    /// Images attached after the root filesystem, as /dev/vdb, /dev/vdc, ... (BuildStepTypes.swift).
    public var disks: [Disk] = []
    #if DEBUG
    /// Tests only: a forbidden system call the jailed VMM makes once its filters are on
    /// ("main:execve"), to prove they hold. Not in release builds.
    public var testViolation: String?
    #endif

    public enum Isolation: String, Sendable, Codable, Equatable {
        /// A separate `airlock-vmm` process in its own namespaces, cgroup and seccomp filters,
        /// as an unprivileged uid with no capabilities (docs/security.md).
        case jailed
        /// UNSAFE, for debugging: the same VMM on a thread of this process, unconfined.
        case unjailed
    }
    /// On a PVM host with the paravirtual interface, run the guest kernel natively (the
    /// default); false forces the emulated path (as `airlock.pv=off` on the kernel command
    /// line or AIRLOCK_PV=off do), for comparison or a host whose interface differs.
    public var pvNative: Bool = true

    /// The host profile a sandbox with this configuration runs under: `hostProfile`, or the
    /// detected one, with the emulated path when `pvNative` is off. One rule for the boot and
    /// for the snapshot store's keys and checks.
    var effectiveHostProfile: HostProfile {
        var profile = hostProfile ?? .detect()
        if !pvNative { profile.pv = .off }
        return profile
    }

    public init(kernelPath: String? = nil, rootfsPath: String? = nil, memoryMiB: Int = 256, cpus: Int = 1) {
        self.kernelPath = kernelPath
        self.rootfsPath = rootfsPath
        self.memoryMiB = memoryMiB
        self.cpus = cpus
    }
}

/// Where a command's input comes from.
public enum StdinSource: Sendable, Equatable {
    /// /dev/null.
    case none
    case bytes([UInt8])
    /// Read until EOF from a host descriptor (the CLI's own stdin when it is not a terminal).
    case fileDescriptor(Int32)
}

/// Where a stream of the command's output goes.
public enum OutputDestination: Sendable {
    /// Kept in the `RunResult` (up to the command's `maxOutputBytes`).
    case capture
    /// Written to a host descriptor as it arrives; a slow reader slows the guest, nothing is dropped.
    case fileDescriptor(Int32)
    /// Handed to a closure as it arrives, on one thread per stream, in order.
    case handler(@Sendable ([UInt8]) -> Void)
}

/// One command to run in the guest.
public struct Command: Sendable {
    public var arguments: [String]
    /// Added to the guest's defaults (PATH, HOME); later entries win.
    public var environment: [(name: String, value: String)] = []
    public var workingDirectory: String = "/"
    /// "" for root, or NAME, UID, NAME:GROUP, UID:GID as in the guest's /etc/passwd.
    public var user: String = ""
    public var stdin: StdinSource = .none
    public var stdout: OutputDestination = .capture
    public var stderr: OutputDestination = .capture
    /// Seconds the command may run, counted from its start in the guest; then the VM is destroyed.
    public var timeoutSeconds: Double?
    /// Per stream: bytes beyond it are dropped and the result is flagged. nil: unlimited when
    /// streaming, `Command.captureLimit` when captured.
    public var maxOutputBytes: Int?
    /// A host directory copied into the guest (and the default working directory); one-shot runs only.
    public var workspace: Workspace?
    /// Files to bring back from the workspace after the command (BuildStepTypes.swift).
    public var artifacts: ArtifactRequest?

    /// The most a captured stream keeps when no `maxOutputBytes` is given.
    public static let captureLimit = 64 << 20

    /// What one captured stream keeps at most: `maxOutputBytes`, never over `captureLimit`.
    static func capturedBytesLimit(_ maxOutputBytes: Int?) -> Int { min(maxOutputBytes ?? captureLimit, captureLimit) }

    public init(_ arguments: [String]) { self.arguments = arguments }
}

/// How a command ended, as a process status a caller can exit with.
public struct RunResult: Sendable, Codable, Equatable {
    /// The captured output (empty for streams sent elsewhere).
    public var stdout: [UInt8] = []
    public var stderr: [UInt8] = []
    /// The command's status, or 128+N for signal N, 124 on timeout, 127 when
    /// the command was not found, 126 when not executable, 125 when the run
    /// could not be set up (user, working directory).
    public var exitCode: Int32 = 0
    public var signal: Int32?
    public var timedOut = false
    /// Some output went past `maxOutputBytes` and was dropped.
    public var outputTruncated = false
    /// How many bytes of each stream were dropped past `maxOutputBytes`.
    public var stdoutDroppedBytes: UInt64 = 0
    public var stderrDroppedBytes: UInt64 = 0
    /// The command's stderr ended without a newline (a notice printed after it needs one first).
    public var stderrEndsMidLine = false
    /// Why the command did not run, when it did not.
    public var failure: String?
    /// How the VM ended ("reset on vCPU 0: ..."), nil while it still runs (sessions) or when the host stopped it.
    public var systemEvent: String?
    /// How the guest kernel ran: "hardware", "pvm-emulated" or "pvm-native" (`HostProfile.GuestMode`); nil if no VM was built.
    public var guestMode: String?
    /// What the run did with a snapshot: restored its VM from one, or booted
    /// and saved one before the command; nil when it used none.
    public var snapshot: SnapshotUse?
    public var timings = RunTimings()
    /// What came back from the workspace (`Command.artifacts`); nil when nothing was asked or it was refused.
    public var artifacts: ArtifactReport?
    /// Why the artifacts were refused or not collected; nothing was kept in the output directory then.
    public var artifactsError: String?

    public init() {}

    public var stdoutText: String { String(decoding: stdout, as: UTF8.self) }
    public var stderrText: String { String(decoding: stderr, as: UTF8.self) }
}

/// A run's use of a snapshot, for `--json`.
public struct SnapshotUse: Sendable, Codable, Equatable {
    /// The snapshot file.
    public var path: String
    /// True: the VM was restored from it instead of booted. False: the VM
    /// booted and saved it before the command ran.
    public var restored: Bool
    /// The VMM's restore: from building the VM from the snapshot to its being
    /// ready to run (KVM objects, RAM mapped, every state set; 0 when saved).
    public var restoreMs: Double = 0
    /// Pausing the booted VM, writing the snapshot and checking it (0 when restored).
    public var saveMs: Double = 0
    /// Of `saveMs`, the write alone: the VM paused while its state and touched pages went to the file.
    public var writeMs: Double = 0
    /// Choosing and checking the snapshot before any VM: the images' digests
    /// (from the cache when unchanged), its header, manifest and state, and its
    /// RAM image when the file changed since it was last checked.
    public var checkMs: Double = 0
    /// The bytes the snapshot takes on disk.
    public var allocatedBytes: UInt64 = 0

    public init(path: String, restored: Bool, restoreMs: Double = 0, saveMs: Double = 0, checkMs: Double = 0, allocatedBytes: UInt64 = 0) {
        self.path = path; self.restored = restored; self.restoreMs = restoreMs; self.saveMs = saveMs; self.checkMs = checkMs
        self.allocatedBytes = allocatedBytes
    }
}

/// Where the time of one run went, in milliseconds.
public struct RunTimings: Sendable, Codable, Equatable {
    /// From the request (process start for the CLI) to the vCPU's first KVM_RUN.
    public var vmmStartMs: Double = 0
    /// From the first KVM_RUN to the agent's hello: the guest kernel's boot and init's start (0 when restored).
    public var kernelBootMs: Double = 0
    /// Building a VM from a snapshot, to ready to run (0 when it booted); `vmmStartMs` then covers the whole start.
    public var restoreMs: Double = 0
    /// From the hello to the command's start: the run request and the agent's set-up.
    public var agentReadyMs: Double = 0
    /// The command's own run time, as the host saw it (start report to exit report).
    public var commandMs: Double = 0
    /// From the exit report to the VM's end: output drained, disks synced, reboot.
    public var shutdownMs: Double = 0
    public var totalMs: Double = 0
    /// Building the workspace image from the host directory, before the VM (0 without a workspace).
    public var workspaceMs: Double = 0
    /// Copying the artifacts out of the workspace image, after the VM (0 without artifacts).
    public var artifactsMs: Double = 0
    public init() {}
}

/// Exit statuses with a meaning of their own, shared with the CLI (the VMM's `RunExitCode`).
public typealias SandboxExitCode = RunExitCode

/// Everything that makes a sandbox fail (as opposed to the command failing).
public enum SandboxError: Error, CustomStringConvertible, Sendable {
    /// Bad input: names the option or file and what to do.
    case invalidConfiguration(String)
    /// The VMM could not build or run the machine.
    case vmm(String)
    /// The guest did not bring the agent up; `console` is the end of the kernel's console.
    case agentDidNotStart(String, console: String)
    /// The agent broke the protocol (a hostile or mismatched guest).
    case protocolViolation(String)
    /// The sandbox was used after it ended.
    case ended(String)
    /// The jail around the VMM could not be set up or torn down.
    case jail(String)
    /// The VMM did something its seccomp filter forbids and was stopped.
    case sandboxViolation(String)

    public var description: String {
        switch self {
        case let .invalidConfiguration(m), let .vmm(m), let .protocolViolation(m), let .ended(m), let .jail(m),
             let .sandboxViolation(m): return m
        case let .agentDidNotStart(m, console):
            let tail = console.split(separator: "\n", omittingEmptySubsequences: false).suffix(25).joined(separator: "\n")
            return tail.isEmpty ? m : "\(m)\nlast lines of the guest console:\n\(tail)"
        }
    }
}

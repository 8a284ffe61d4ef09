import AirlockOS
import Logging
import SessionProtocol
import Snapshot
import VMM
#if canImport(Glibc)
import Glibc
#endif

extension Sandbox {
    /// Builds a sandbox from a snapshot file instead of booting one: the VM
    /// the snapshot saved, with this configuration's root filesystem
    /// (reopened read-only) and new console ports, ready to run commands; its
    /// clock and random pool are renewed before each command. The snapshot is
    /// checked whole here, before any VM exists: a damaged one, or one made
    /// from other images, another configuration or on another kind of host,
    /// throws naming the file and what to do. The VMM gets the file as a
    /// descriptor and maps its RAM image copy-on-write; it is jailed like any
    /// other (`config.isolation`). Cancelling the task stops the VM.
    public static func restore(from path: String, config: SandboxConfig, requestedAt: UInt64? = nil,
                               logger: Logger = Logger(label: "airlock.sandbox")) async throws(SandboxError) -> Sandbox {
        let start = requestedAt ?? monotonicNanoseconds()
        let handle = StopHandle()
        let client = try await cancellable(handle) { () throws(SandboxError) -> SessionClient in
            var c = config
            c.hostProfile = config.effectiveHostProfile
            let checked = try checkSnapshot(path, config: c, store: SnapshotStore())
            try handle.check()
            return try SessionClient.boot(c, requestedAt: start, logger: logger, stop: handle, snapshot: checked)
        }
        return Sandbox(client: client)
    }

    /// Opens `path` and checks it whole against what `config` would boot from on this host.
    static func checkSnapshot(_ path: String, config: SandboxConfig, store: SnapshotStore) throws(SandboxError) -> CheckedSnapshot {
        let started = monotonicNanoseconds()
        guard config.disks.isEmpty else {
            throw .invalidConfiguration("a sandbox with disks (a workspace or --disk) cannot be restored from a snapshot: a snapshot holds no disks; boot it cold")
        }
        let paths = ImagePaths(config)
        let inputs = try store.inputs(for: config, kernelPath: paths.kernel, rootfsPath: paths.rootfs, hostProfile: config.effectiveHostProfile)
        let file: SnapshotFile
        do throws(SnapshotError) { file = try store.openChecked(path, requirements: inputs.requirements(kvmPath: config.kvmPath)) } catch {
            throw .invalidConfiguration(error.description)
        }
        var info = stat()
        let allocated = fstat(file.file.rawValue, &info) == 0 ? UInt64(info.st_blocks) * 512 : 0
        return CheckedSnapshot(file: file, checkMs: Double(monotonicNanoseconds() - started) / 1e6, allocatedBytes: allocated)
    }

    /// Saves this sandbox as a snapshot file at `path` (replacing what is
    /// there), for `restore(from:)`: only a sandbox that booted and has run no
    /// command yet, so the snapshot holds nothing of any command. The file is
    /// made here, beside `path`, and its descriptor sent to the VMM, which
    /// pauses the VM while it writes its state and touched pages into it;
    /// the VM then goes on. What the VMM wrote is checked whole here before it
    /// is renamed into place.
    public func saveSnapshot(to path: String) async throws(SandboxError) -> SnapshotUse {
        let client = self.client
        return try await Self.onThread { () throws(SandboxError) -> SnapshotUse in
            let started = monotonicNanoseconds()
            let directory = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
            // The file is made beside `path`; the digest cache stays in the data directory.
            let store = SnapshotStore(directory: directory.isEmpty ? "/" : directory, cacheDirectory: SnapshotStore().directory)
            let inputs = try client.snapshotInputs(store: store)
            let temporary = try store.temporaryFile(forKey: inputs.key)
            let report: SnapshotSaveReport
            do throws(SandboxError) {
                report = try client.saveSnapshot(inputs.save(name: temporary.path), into: temporary.fd.rawValue)
            } catch {
                unlink(temporary.path)
                throw error
            }
            do throws(SnapshotError) {
                let installed = try store.install(temporary.path, key: inputs.key, requirements: inputs.requirements(kvmPath: client.config.kvmPath))
                guard installed == path || rename(installed, path) == 0 else {
                    throw .io(path: path, SystemError("rename", subject: installed, errno: errno))
                }
                if let file = try? SnapshotFile.open(path) { store.digestCache.markVerified(snapshot: path, file: file.file) }
                var info = stat()
                let allocated = stat(path, &info) == 0 ? UInt64(info.st_blocks) * 512 : report.allocatedBytes
                var use = SnapshotUse(path: path, restored: false, saveMs: Double(monotonicNanoseconds() - started) / 1e6, allocatedBytes: allocated)
                use.writeMs = report.writeMs
                return use
            } catch {
                throw .vmm("the snapshot written for \(path) did not check out: \(error)")
            }
        }
    }

    /// The snapshot store's file for `config`, made now (one boot, saved, shut down, as
    /// `airlock snapshot create` does) when the store has none that `config` can restore:
    /// what a service restores its sandboxes from. Blocking; throws, naming what to do, when
    /// the images are missing or the VM cannot boot.
    public static func storedSnapshot(for config: SandboxConfig, logger: Logger) throws(SandboxError) -> String {
        var c = config
        c.hostProfile = config.effectiveHostProfile
        c.snapshots = .none
        let store = SnapshotStore()
        let paths = ImagePaths(c)
        _ = try ImageResolution.resolve(c)
        let inputs = try store.inputs(for: c, kernelPath: paths.kernel, rootfsPath: paths.rootfs, hostProfile: c.hostProfile!)
        let path = store.path(forKey: inputs.key)
        if (try? checkSnapshot(path, config: c, store: store)) != nil { return path }
        logger.notice("no usable snapshot for this configuration: booting one VM to save \(path)")
        return try createSnapshotBlocking(config: c, requestedAt: monotonicNanoseconds(), logger: logger).path
    }

    /// Boots a VM, saves it into the snapshot store for its inputs (replacing
    /// what is there) and shuts it down: `airlock snapshot create`. Jailed or
    /// not as `config.isolation` says.
    public static func createSnapshotBlocking(config: SandboxConfig, requestedAt: UInt64, logger: Logger,
                                              stop: StopHandle = StopHandle()) throws(SandboxError) -> SnapshotUse {
        guard config.disks.isEmpty else {
            throw .invalidConfiguration("a snapshot holds no disks: give no --disk to 'airlock snapshot create'")
        }
        var c = config
        c.hostProfile = config.effectiveHostProfile
        c.snapshots = .none
        let store = SnapshotStore()
        let paths = ImagePaths(c)
        _ = try ImageResolution.resolve(c)  // a missing image is named before anything is hashed
        let inputs = try store.inputs(for: c, kernelPath: paths.kernel, rootfsPath: paths.rootfs, hostProfile: c.hostProfile!)
        let plan = SnapshotPlan(action: .bootAndSave, inputs: inputs, requirements: inputs.requirements(kvmPath: c.kvmPath), store: store)
        let client = try bootBlocking(c, requestedAt: requestedAt, logger: logger, stop: stop)
        defer { client.terminate() }
        let use = try plan.saveInto(client, logger: logger, warnOnly: false)
        client.shutdown()
        guard let use else { throw .vmm("the VM booted but no snapshot was saved") }
        return use
    }

    /// One command in a VM that is restored from, or saves into, the
    /// snapshot store (`SnapshotPolicy.automatic`): `airlock run`.
    static func runUsingSnapshotStore(_ command: Command, config: SandboxConfig, requestedAt: UInt64, logger: Logger,
                                      stop: StopHandle) throws(SandboxError) -> RunResult {
        var c = config
        c.hostProfile = config.effectiveHostProfile
        c.snapshots = .none
        let paths = ImagePaths(c)
        _ = try ImageResolution.resolve(c)  // a missing image is named before anything is hashed
        let planned = monotonicNanoseconds()
        var plan = try SnapshotPlan.make(c, kernelPath: paths.kernel, rootfsPath: paths.rootfs, hostProfile: c.hostProfile!, logger: logger)
        if let file = plan.checked {
            var info = stat()
            let allocated = fstat(file.file.rawValue, &info) == 0 ? UInt64(info.st_blocks) * 512 : 0
            let checked = CheckedSnapshot(file: file, checkMs: Double(monotonicNanoseconds() - planned) / 1e6, allocatedBytes: allocated)
            do throws(SandboxError) {
                let client = try bootBlocking(c, requestedAt: requestedAt, logger: logger, stop: stop, snapshot: checked)
                defer { client.terminate() }
                return try client.run(command, shutdownAfter: true)
            } catch let SandboxError.invalidConfiguration(why) where !stop.stopped {
                // The VMM refused it before building a VM (a CPU or TSC check the supervisor
                // cannot make): boot cold and replace it.
                logger.warning("\(why); booting without it, and replacing it")
                plan = plan.bootingCold()
            }
        }
        return try runSaving(command, config: c, plan: plan, requestedAt: requestedAt, logger: logger, stop: stop)
    }

    /// Boots cold, saves the idle VM into the store (a save that fails costs a warning, not
    /// the run), then runs the command.
    private static func runSaving(_ command: Command, config: SandboxConfig, plan: SnapshotPlan, requestedAt: UInt64, logger: Logger,
                                  stop: StopHandle) throws(SandboxError) -> RunResult {
        let client = try bootBlocking(config, requestedAt: requestedAt, logger: logger, stop: stop)
        defer { client.terminate() }
        let saved = try plan.saveInto(client, logger: logger, warnOnly: true)
        var result = try client.run(command, shutdownAfter: true)
        result.snapshot = saved
        return result
    }
}

/// The kernel and root filesystem paths a configuration boots from.
struct ImagePaths {
    let kernel: String, rootfs: String
    init(_ config: SandboxConfig, store: ImageStore = ImageStore()) {
        kernel = config.kernelPath ?? store.kernelPath
        rootfs = config.rootfsPath ?? store.rootfsPath
    }
}

extension SnapshotInputs {
    /// The save request for a snapshot of these inputs, written into the file named `name`.
    func save(name: String) -> SnapshotSave {
        SnapshotSave(name: name, kernelSHA256: kernelSHA256, rootfsSHA256: rootfsSHA256, createdAt: UInt64(max(0, time(nil))))
    }
}

extension SessionClient {
    /// The inputs of the snapshot this sandbox would be saved as.
    func snapshotInputs(store: SnapshotStore) throws(SandboxError) -> SnapshotInputs {
        guard config.disks.isEmpty else {
            throw .invalidConfiguration("a sandbox with disks (a workspace or --disk) cannot be saved as a snapshot: a snapshot holds no disks")
        }
        return try store.inputs(for: config, kernelPath: kernelPath, rootfsPath: rootfsPath, hostProfile: hostProfile)
    }
}

extension SnapshotPlan {
    /// The same inputs, booting cold and saving anew.
    func bootingCold() -> SnapshotPlan { SnapshotPlan(action: .bootAndSave, inputs: inputs, requirements: requirements, store: store) }

    /// Saves the booted, idle VM of `client` into a new file in the store, checks what its
    /// VMM wrote, and installs it; returns what the receipt says of it. With `warnOnly`, a
    /// save that fails is a warning and nil (the run goes on without a snapshot).
    func saveInto(_ client: SessionClient, logger: Logger, warnOnly: Bool) throws(SandboxError) -> SnapshotUse? {
        let temporary = try store.temporaryFile(forKey: inputs.key)
        defer { unlink(temporary.path) }
        let report: SnapshotSaveReport
        do throws(SandboxError) {
            report = try client.saveSnapshot(inputs.save(name: temporary.path), into: temporary.fd.rawValue)
        } catch {
            guard warnOnly else { throw error }
            logger.warning("no snapshot was saved: \(error)")
            return nil
        }
        let started = monotonicNanoseconds()
        do throws(SnapshotError) {
            let path = try store.install(temporary.path, key: inputs.key, requirements: requirements)
            let checkMs = Double(monotonicNanoseconds() - started) / 1e6
            var info = stat()
            let allocated = stat(path, &info) == 0 ? UInt64(info.st_blocks) * 512 : report.allocatedBytes
            var use = SnapshotUse(path: path, restored: false, saveMs: report.pausedMs + checkMs, checkMs: checkMs, allocatedBytes: allocated)
            use.writeMs = report.writeMs
            return use
        } catch {
            guard warnOnly else { throw .vmm("the snapshot the VMM wrote was not kept: \(error)") }
            logger.warning("the snapshot this run wrote was not kept: \(error)")
            return nil
        }
    }
}

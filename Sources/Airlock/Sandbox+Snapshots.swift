import AirlockOS
import Logging
import Snapshot
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// What a session does with a snapshot (the engine under `Sandbox` and the jailed VMM).
enum SessionSnapshot {
    case none
    /// Build the VM from this checked snapshot instead of booting it.
    case restore(SnapshotFile)
    /// Boot, then save the idle VM into `fd` (named `path`) before the first command.
    case save(fd: Int32, path: String, kernelSHA256: String, rootfsSHA256: String)
}

extension Sandbox {
    /// Builds a sandbox from a snapshot file instead of booting one: the VM
    /// the snapshot saved, with this configuration's root filesystem
    /// (reopened read-only) and new console ports, ready to run commands; its
    /// clock and random pool are renewed before each command. The snapshot is
    /// checked whole before any VM exists: a damaged one, or one made from
    /// other images, another configuration or on another kind of host, throws
    /// naming the file and what to do. Cancelling the task stops the VM.
    public static func restore(from path: String, config: SandboxConfig, requestedAt: UInt64? = nil,
                               logger: Logger = Logger(label: "airlock.sandbox")) async throws(SandboxError) -> Sandbox {
        let start = requestedAt ?? monotonicNanoseconds()
        let handle = SessionHandle()
        return try await cancellable(handle) { () throws(SandboxError) -> Sandbox in
            let images = try ImageResolution.resolve(config)
            let profile = config.hostProfile ?? .detect()
            var c = config
            c.hostProfile = profile
            let store = SnapshotStore()
            let requirements = try store.inputs(for: c, kernelPath: images.kernel, rootfsPath: images.rootfs, hostProfile: profile).requirements()
            let snapshot: SnapshotFile
            do throws(SnapshotError) { snapshot = try store.openChecked(path, requirements: requirements) } catch {
                throw .invalidConfiguration(error.description)
            }
            let session = try VMSession(config: c, kernelPath: images.kernel, rootfsPath: images.rootfs, requestedAt: start,
                                        logger: logger, snapshot: snapshot)
            handle.set(session)
            try session.start()
            return Sandbox(session: session)
        }
    }

    /// Saves this sandbox as a snapshot file at `path` (replacing what is
    /// there), for `restore(from:)`: only a sandbox that booted and has run no
    /// command yet, so the snapshot holds nothing of any command. The VM is
    /// paused while its memory is written, then goes on. The file is written
    /// beside `path` and renamed into place once it checks out whole.
    public func saveSnapshot(to path: String) async throws(SandboxError) -> SnapshotUse {
        let session = self.session
        return try await Self.onThread { () throws(SandboxError) -> SnapshotUse in
            let started = monotonicNanoseconds()
            let directory = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
            // The file is made beside `path`; the digest cache stays in the data directory.
            let store = SnapshotStore(directory: directory.isEmpty ? "/" : directory, cacheDirectory: SnapshotStore().directory)
            let cache = store.digestCache
            let inputs = try store.inputs(for: session.config, kernelPath: session.kernelPath, rootfsPath: session.rootfsPath,
                                          hostProfile: session.machine.config.hostProfile)
            let temporary = try store.temporaryFile(forKey: inputs.key)
            do throws(SandboxError) {
                _ = try session.saveSnapshot(into: temporary.fd.rawValue, path: temporary.path,
                                             kernelSHA256: inputs.kernelSHA256, rootfsSHA256: inputs.rootfsSHA256)
            } catch {
                unlink(temporary.path)
                throw error
            }
            do {
                let installed = try store.install(temporary.path, key: inputs.key, requirements: inputs.requirements())
                guard rename(installed, path) == 0 || installed == path else {
                    throw SandboxError.invalidConfiguration("cannot move the snapshot to \(path): \(String(cString: strerror(errno)))")
                }
                if let file = try? SnapshotFile.open(path) { cache.markVerified(snapshot: path, file: file.file) }
                var info = stat()
                let allocated = stat(path, &info) == 0 ? UInt64(info.st_blocks) * 512 : 0
                return SnapshotUse(path: path, restored: false, saveMs: Double(monotonicNanoseconds() - started) / 1e6, allocatedBytes: allocated)
            } catch let e as SandboxError {
                throw e
            } catch {
                throw .vmm("the snapshot written for \(path) did not check out: \(error)")
            }
        }
    }

    /// Boots a VM, saves it into the snapshot store for its inputs (replacing
    /// what is there) and shuts it down, in this process: `airlock snapshot
    /// create --no-jail`. `JailedRun.createSnapshot` is the jailed way.
    public static func createSnapshotBlocking(config: SandboxConfig, requestedAt: UInt64, logger: Logger,
                                              hooks: SessionHooks = SessionHooks()) throws(SandboxError) -> SnapshotUse {
        let images = try ImageResolution.resolve(config)
        var c = config
        c.hostProfile = config.hostProfile ?? .detect()
        c.snapshots = .none
        let store = SnapshotStore()
        let inputs = try store.inputs(for: c, kernelPath: images.kernel, rootfsPath: images.rootfs, hostProfile: c.hostProfile!)
        let plan = SnapshotPlan(action: .bootAndSave, inputs: inputs, requirements: inputs.requirements(), store: store)
        let temporary = try store.temporaryFile(forKey: inputs.key)
        let (_, report) = try runSession(nil, config: c, kernelPath: images.kernel, rootfsPath: images.rootfs, requestedAt: requestedAt,
                                         logger: logger, hooks: hooks,
                                         snapshot: .save(fd: temporary.fd.rawValue, path: temporary.path,
                                                         kernelSHA256: inputs.kernelSHA256, rootfsSHA256: inputs.rootfsSHA256))
        guard let use = plan.installWritten(temporary.path, report: report, logger: logger) else {
            throw .vmm("the VM booted but no snapshot was saved (the warning above says why)")
        }
        return use
    }

    /// One command in a VM that is restored from, or saves into, the
    /// snapshot store (`SnapshotPolicy.automatic`), in this process.
    static func runUsingSnapshotStore(_ command: Command, config: SandboxConfig, requestedAt: UInt64, logger: Logger,
                                      hooks: SessionHooks) throws(SandboxError) -> RunResult {
        let images = try ImageResolution.resolve(config)
        var c = config
        c.hostProfile = config.hostProfile ?? .detect()
        let planned = monotonicNanoseconds()
        guard let plan = try SnapshotPlan.make(c, kernelPath: images.kernel, rootfsPath: images.rootfs,
                                               hostProfile: c.hostProfile!, logger: logger) else {
            c.snapshots = .none
            return try runBlocking(command, config: c, requestedAt: requestedAt, logger: logger, hooks: hooks)
        }
        c.snapshots = .none
        switch plan.action {
        case let .restore(path):
            let snapshot: SnapshotFile
            do { snapshot = try SnapshotFile.open(path) } catch { throw .invalidConfiguration(error.description) }
            let checkMs = Double(monotonicNanoseconds() - planned) / 1e6
            var result = try runSession(command, config: c, kernelPath: images.kernel, rootfsPath: images.rootfs, requestedAt: requestedAt,
                                        logger: logger, hooks: hooks, snapshot: .restore(snapshot)).result
            result.snapshot?.checkMs = checkMs
            return result
        case .bootAndSave:
            let temporary = try plan.store.temporaryFile(forKey: plan.inputs.key)
            var (result, report) = try runSession(
                command, config: c, kernelPath: images.kernel, rootfsPath: images.rootfs, requestedAt: requestedAt, logger: logger,
                hooks: hooks, snapshot: .save(fd: temporary.fd.rawValue, path: temporary.path,
                                              kernelSHA256: plan.inputs.kernelSHA256, rootfsSHA256: plan.inputs.rootfsSHA256))
            result.snapshot = plan.installWritten(temporary.path, report: report, logger: logger)
            return result
        }
    }

    /// The session under every run: boot (saving a snapshot first when asked)
    /// or restore, then the command, then the VM's end. Returns the result
    /// and what the save wrote (nil when nothing was saved). A snapshot that
    /// cannot be saved costs a warning, not the run.
    static func runSession(_ command: Command?, config: SandboxConfig, kernelPath: String, rootfsPath: String, requestedAt: UInt64,
                           logger: Logger, hooks: SessionHooks, snapshot: SessionSnapshot) throws(SandboxError) -> (result: RunResult, saved: SnapshotWriteReport?) {
        var restoring: SnapshotFile?
        if case let .restore(file) = snapshot { restoring = file }
        let session = try VMSession(config: config, kernelPath: kernelPath, rootfsPath: rootfsPath, requestedAt: requestedAt,
                                    logger: logger, hooks: hooks, snapshot: restoring)
        var saved: SnapshotWriteReport?
        if restoring != nil {
            try session.start()
        } else {
            try session.boot()
            if case let .save(fd, path, kernelSHA256, rootfsSHA256) = snapshot {
                do {
                    saved = try session.saveSnapshot(into: fd, path: path, kernelSHA256: kernelSHA256, rootfsSHA256: rootfsSHA256)
                } catch {
                    logger.warning("no snapshot was saved: \(error)")
                }
            }
        }
        guard let command else {
            session.shutdown()
            return (RunResult(), saved)
        }
        return (try session.run(command, shutdownAfter: true), saved)
    }
}

extension SnapshotPlan {
    /// Checks the snapshot a run wrote into `temporaryPath` and puts it into
    /// the store; returns what the receipt says of it (nil, with a warning,
    /// when nothing usable was written).
    func installWritten(_ temporaryPath: String, report: SnapshotWriteReport?, logger: Logger) -> SnapshotUse? {
        guard let report else {
            unlink(temporaryPath)
            return nil
        }
        let started = monotonicNanoseconds()
        do {
            let path = try store.install(temporaryPath, key: inputs.key, requirements: requirements)
            let checkMs = Double(monotonicNanoseconds() - started) / 1e6
            var info = stat()
            let allocated = stat(path, &info) == 0 ? UInt64(info.st_blocks) * 512 : report.allocatedBytes
            var use = SnapshotUse(path: path, restored: false, saveMs: report.seconds * 1000 + checkMs, allocatedBytes: allocated)
            use.writeMs = report.seconds * 1000
            return use
        } catch {
            logger.warning("the snapshot this run wrote was not kept: \(error)")
            return nil
        }
    }
}

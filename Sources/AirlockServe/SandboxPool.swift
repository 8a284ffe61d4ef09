import Airlock
import AirlockOS
import Logging

/// A sandbox handed to one request, which alone uses it.
struct Lease: Sendable {
    let sandbox: any ReadySandbox
    /// It was ready before the request arrived: a warm start, no boot on the request's path.
    let fromPool: Bool
    /// When it became ready (monotonic ns).
    let readyAt: UInt64
    /// How long the request waited for it (a free slot, then a boot or a ready sandbox).
    let queueNanoseconds: UInt64
}

/// Why a request got no sandbox.
enum AcquireError: Error, Sendable {
    /// The queue is at --queue; try again after this many seconds.
    case queueFull(retryAfterSeconds: Int)
    /// The service is shutting down.
    case draining
    /// No sandbox became ready within --queue-timeout.
    case queueTimeout(seconds: Double)
    /// The boot (or restore) meant for this request failed.
    case prepareFailed(SandboxError)
    /// The request was cancelled while it waited (its client went away).
    case cancelled
}

/// What the pool is asked to keep.
public struct PoolSettings: Sendable {
    /// The machine of the pool's sandboxes; a request for another (a different memoryMiB) gets a VM of its own.
    public var config: SandboxConfig
    /// Warm sandboxes kept ready (--pool).
    public var size: Int
    /// VMs at once, in every state: booting, ready, running, being destroyed (--max-concurrent).
    public var maxConcurrent: Int
    /// Requests that may wait for a sandbox; beyond it, 429 (--queue).
    public var queueLimit: Int
    /// How long a request may wait for one (--queue-timeout).
    public var queueTimeoutSeconds: Double

    public init(config: SandboxConfig, size: Int, maxConcurrent: Int, queueLimit: Int, queueTimeoutSeconds: Double) {
        self.config = config
        self.size = size
        self.maxConcurrent = maxConcurrent
        self.queueLimit = queueLimit
        self.queueTimeoutSeconds = queueTimeoutSeconds
    }
}

/// The pool's state at one moment (`GET /v1/health`).
public struct PoolStatus: Sendable, Codable, Equatable {
    public var size: Int
    public var ready: Int
    public var booting: Int
    public var busy: Int
    public var queued: Int
    public var maxConcurrent: Int
    public var draining: Bool
}

/// Keeps `--pool` sandboxes ready, hands each to exactly one request, and bounds the
/// VMs alive at once (`--max-concurrent`) and the requests waiting (`--queue`).
///
/// One mechanism serves the warm and the cold path: boots are not tied to requests,
/// and a waiting request takes the first pool sandbox that becomes ready. The pool
/// boots for its target size plus one per waiting request not already covered by a
/// boot in flight, slots permitting; waiting requests come before refills. A request
/// for another machine (its own memoryMiB) gets a boot of its own. A sandbox is never
/// given to a second request: after its run it is gone, and the slot is free again.
actor SandboxPool {
    private struct Waiter {
        let id: UInt64
        let config: SandboxConfig
        let usesPool: Bool
        let arrivedAt: UInt64
        let continuation: CheckedContinuation<Result<Lease, AcquireError>, Never>
        /// The boot launched for it alone (a machine other than the pool's).
        var privateBoot: UInt64?
        var timeout: Task<Void, Never>?
    }

    private struct ReadyEntry {
        let sandbox: any ReadySandbox
        let readyAt: UInt64
    }

    let settings: PoolSettings
    private let provider: any SandboxProvider
    private let metrics: ServeMetrics
    private let logger: Logger

    private var ready: [ReadyEntry] = []
    private var waiters: [Waiter] = []
    private var poolBoots: Set<UInt64> = []
    private var privateBoots: [UInt64: UInt64] = [:]  // boot -> waiter
    private var bootTasks: [UInt64: Task<Void, Never>] = [:]
    /// Boots cancelled because nobody will need them (a drain); their VMs still count until they end.
    private var stoppingBoots: Set<UInt64> = []
    private var busy = 0
    private var destroying = 0
    private var draining = false
    private var aborted = false
    /// After a failed boot, boots pause (1 s, doubling to 30 s) so a broken set-up does not spin.
    private var backoffSeconds = 0.0
    private var backoffUntil: UInt64 = 0
    private var wakeScheduled = false
    private var nextID: UInt64 = 0
    private var idleContinuations: [CheckedContinuation<Void, Never>] = []
    /// Recent seconds per request in a sandbox, for Retry-After.
    private var serviceSeconds = 1.0

    init(settings: PoolSettings, provider: any SandboxProvider, metrics: ServeMetrics, logger: Logger) {
        self.settings = settings
        self.provider = provider
        self.metrics = metrics
        self.logger = logger
        metrics.poolSize.set(Double(settings.size))
    }

    private var slotsUsed: Int { ready.count + poolBoots.count + privateBoots.count + stoppingBoots.count + busy + destroying }

    var status: PoolStatus {
        PoolStatus(size: settings.size, ready: ready.count, booting: poolBoots.count + privateBoots.count + stoppingBoots.count,
                   busy: busy + destroying,
                   queued: waiters.count, maxConcurrent: settings.maxConcurrent, draining: draining)
    }

    /// Starts filling the pool.
    func start() { schedule() }

    // MARK: - Requests

    /// A sandbox for one request: a ready one at once, or the first that becomes ready
    /// while this waits in the queue. Cancelling the task gives up the place in the queue.
    func acquire(_ config: SandboxConfig) async -> Result<Lease, AcquireError> {
        let arrivedAt = monotonicNanoseconds()
        if draining { return .failure(.draining) }
        let usesPool = config == settings.config
        // A ready sandbox left over means no waiter wants one (schedule hands them out first).
        if usesPool, !ready.isEmpty {
            let entry = ready.removeFirst()
            busy += 1
            schedule()
            return .success(Lease(sandbox: entry.sandbox, fromPool: true, readyAt: entry.readyAt,
                                  queueNanoseconds: monotonicNanoseconds() &- arrivedAt))
        }
        guard waiters.count < settings.queueLimit else { return .failure(.queueFull(retryAfterSeconds: retryAfter)) }
        nextID += 1
        let id = nextID
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Result<Lease, AcquireError>, Never>) in
                var waiter = Waiter(id: id, config: config, usesPool: usesPool, arrivedAt: arrivedAt, continuation: continuation)
                let seconds = settings.queueTimeoutSeconds
                waiter.timeout = Task {
                    try? await Task.sleep(for: .seconds(seconds))
                    if !Task.isCancelled { self.dropWaiter(id, .queueTimeout(seconds: seconds)) }
                }
                waiters.append(waiter)
                schedule()
            }
        } onCancel: {
            Task { await self.dropWaiter(id, .cancelled) }
        }
    }

    /// A request's sandbox has ended (its run is over and the VM is gone).
    func finished(sandboxSeconds: Double) {
        busy -= 1
        serviceSeconds = 0.8 * serviceSeconds + 0.2 * max(0.001, sandboxSeconds)
        schedule()
    }

    /// A request gives its sandbox back unused (cancelled before its run): it is destroyed, never reused.
    func discard(_ lease: Lease) {
        busy -= 1
        destroyInBackground(lease.sandbox)
        schedule()
    }

    /// Seconds until a slot is likely free: the queue's length in recent run times, per slot.
    private var retryAfter: Int {
        let estimate = serviceSeconds * Double(waiters.count + 1) / Double(max(1, settings.maxConcurrent))
        return Int(min(3600, max(1, estimate.rounded(.up))))
    }

    private func dropWaiter(_ id: UInt64, _ reason: AcquireError) {
        guard let index = waiters.firstIndex(where: { $0.id == id }) else { return }  // served already
        let waiter = waiters.remove(at: index)
        waiter.timeout?.cancel()
        if let boot = waiter.privateBoot { bootTasks[boot]?.cancel() }
        waiter.continuation.resume(returning: .failure(reason))
        schedule()
    }

    private func hand(_ entry: ReadyEntry, to waiter: Waiter) {
        waiter.timeout?.cancel()
        busy += 1
        waiter.continuation.resume(returning: .success(Lease(
            sandbox: entry.sandbox, fromPool: entry.readyAt <= waiter.arrivedAt, readyAt: entry.readyAt,
            queueNanoseconds: monotonicNanoseconds() &- waiter.arrivedAt)))
    }

    // MARK: - Supply

    /// Hands ready sandboxes to waiters, then boots what the waiters and the pool's target need, slots permitting.
    private func schedule() {
        while !ready.isEmpty, let index = waiters.firstIndex(where: { $0.usesPool }) {
            hand(ready.removeFirst(), to: waiters.remove(at: index))
        }
        if draining {
            while let entry = ready.popLast() { destroyInBackground(entry.sandbox) }
        }
        defer {
            updateGauges()
            resumeIdleWaitersIfIdle()
        }
        guard !aborted else { return }
        let now = monotonicNanoseconds()
        guard now >= backoffUntil else {
            scheduleWake(at: backoffUntil)
            return
        }
        var free = settings.maxConcurrent - slotsUsed
        // Pool boots in flight not yet spoken for by a waiter.
        var spare = poolBoots.count
        for index in waiters.indices {
            if waiters[index].usesPool {
                if spare > 0 {
                    spare -= 1
                } else if free > 0 {
                    launchBoot(for: nil)
                    free -= 1
                }
            } else if waiters[index].privateBoot == nil, free > 0 {
                waiters[index].privateBoot = launchBoot(for: waiters[index])
                free -= 1
            }
        }
        if !draining {
            while free > 0, ready.count + spare < settings.size {
                launchBoot(for: nil)
                free -= 1
                spare += 1
            }
        } else {
            // Draining: a pool boot no waiting request needs is stopped rather than finished and destroyed.
            for id in poolBoots.prefix(spare) {
                poolBoots.remove(id)
                stoppingBoots.insert(id)
                bootTasks[id]?.cancel()
            }
        }
    }

    @discardableResult
    private func launchBoot(for waiter: Waiter?) -> UInt64 {
        nextID += 1
        let id = nextID
        let config = waiter?.config ?? settings.config
        if let waiter { privateBoots[id] = waiter.id } else { poolBoots.insert(id) }
        let provider = self.provider
        bootTasks[id] = Task {
            let result: Result<any ReadySandbox, SandboxError>
            do throws(SandboxError) { result = .success(try await provider.prepare(config)) } catch { result = .failure(error) }
            self.prepared(id, result, cancelled: Task.isCancelled)
        }
        return id
    }

    private func prepared(_ id: UInt64, _ result: Result<any ReadySandbox, SandboxError>, cancelled: Bool) {
        bootTasks[id] = nil
        let waiterID = privateBoots.removeValue(forKey: id)
        poolBoots.remove(id)
        let stopped = stoppingBoots.remove(id) != nil
        let cancelled = cancelled || stopped
        switch result {
        case let .success(sandbox):
            metrics.prepared(sandbox.origin, ok: true)
            backoffSeconds = 0
            let entry = ReadyEntry(sandbox: sandbox, readyAt: monotonicNanoseconds())
            if let waiterID {
                if let index = waiters.firstIndex(where: { $0.id == waiterID }) {
                    hand(entry, to: waiters.remove(at: index))
                } else {
                    destroyInBackground(sandbox)  // its request gave up
                }
            } else if cancelled || aborted {
                destroyInBackground(sandbox)
            } else {
                ready.append(entry)
            }
        case let .failure(error):
            if cancelled || aborted { break }  // stopped on purpose (drain, or its request gave up)
            metrics.prepared(provider.origin, ok: false)
            backoffSeconds = min(30, max(1, backoffSeconds * 2))
            backoffUntil = monotonicNanoseconds() &+ UInt64(backoffSeconds * 1e9)
            logger.error("a sandbox could not be made ready; boots pause for \(backoffSeconds) s",
                         metadata: ["error": "\(error)"])
            // The request it was for learns why, rather than waiting on a set-up that fails.
            let target = waiterID.flatMap { w in waiters.firstIndex { $0.id == w } } ?? waiters.firstIndex { $0.usesPool }
            if let target {
                let waiter = waiters.remove(at: target)
                waiter.timeout?.cancel()
                waiter.continuation.resume(returning: .failure(.prepareFailed(error)))
            }
        }
        schedule()
    }

    private func destroyInBackground(_ sandbox: any ReadySandbox) {
        destroying += 1
        Task {
            await sandbox.destroy()
            self.destroyed()
        }
    }

    private func destroyed() {
        destroying -= 1
        schedule()
    }

    private func scheduleWake(at time: UInt64) {
        guard !wakeScheduled else { return }
        wakeScheduled = true
        let delay = time > monotonicNanoseconds() ? time - monotonicNanoseconds() : 0
        Task {
            try? await Task.sleep(for: .nanoseconds(Int64(min(delay, UInt64(Int64.max)))))
            self.woke()
        }
    }

    private func woke() {
        wakeScheduled = false
        schedule()
    }

    private func updateGauges() {
        metrics.ready.set(Double(ready.count))
        metrics.booting.set(Double(poolBoots.count + privateBoots.count + stoppingBoots.count))
        metrics.busy.set(Double(busy + destroying))
    }

    // MARK: - Drain

    /// No more refills; ready sandboxes that no waiting request needs are destroyed.
    /// Requests already waiting are still served.
    func beginDrain() {
        draining = true
        schedule()
    }

    /// The drain's time is up: waiting requests are refused and boots in flight stopped.
    func abort() {
        draining = true
        aborted = true
        for waiter in waiters {
            waiter.timeout?.cancel()
            waiter.continuation.resume(returning: .failure(.draining))
        }
        waiters.removeAll()
        for task in bootTasks.values { task.cancel() }
        schedule()
    }

    /// Waits until no VM is left: nothing ready, booting, running or being destroyed, and nobody waiting.
    func waitUntilEmpty() async {
        if slotsUsed == 0 && waiters.isEmpty { return }
        await withCheckedContinuation { idleContinuations.append($0) }
    }

    private func resumeIdleWaitersIfIdle() {
        guard !idleContinuations.isEmpty, slotsUsed == 0, waiters.isEmpty else { return }
        let waiting = idleContinuations
        idleContinuations.removeAll()
        for c in waiting { c.resume() }
    }
}

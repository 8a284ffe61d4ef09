import Foundation

/// Runs blocking work (waiting for a process or a VM) on a thread of its own and awaits it,
/// so that it never holds one of the cooperative pool's threads, of which there is one per
/// core: two on the CI machine, where one test blocked on a boot stalls every async test.
/// The work stays in the test's task (a task executor preference, not a bare thread), so
/// its expectations are recorded against its test. At most one such test per core runs at
/// once, as when they held the pool's threads: more VMs at once than cores only make every
/// timing in the suite a matter of luck.
public func offThread<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
    await BlockingSlots.shared.acquire()
    let executor = ThreadExecutor()
    defer {
        executor.finish()
        Task { await BlockingSlots.shared.release() }
    }
    return try await withTaskExecutorPreference(executor) { try work() }
}

/// A counting semaphore for `offThread`, one slot per core.
actor BlockingSlots {
    static let shared = BlockingSlots(ProcessInfo.processInfo.activeProcessorCount)
    private var free: Int
    private var waiting: [CheckedContinuation<Void, Never>] = []

    init(_ slots: Int) { free = max(1, slots) }

    func acquire() async {
        if free > 0 {
            free -= 1
            return
        }
        await withCheckedContinuation { waiting.append($0) }
    }

    func release() {
        if waiting.isEmpty { free += 1 } else { waiting.removeFirst().resume() }
    }
}

/// A task executor with one thread of its own, for `offThread`.
final class ThreadExecutor: TaskExecutor, @unchecked Sendable {
    // @unchecked: `jobs` and `finished` are only touched under `condition`.
    private let condition = NSCondition()
    private var jobs: [UnownedJob] = []
    private var finished = false

    init() {
        Thread { [self] in serve() }.start()
    }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        condition.lock()
        jobs.append(job)
        condition.signal()
        condition.unlock()
    }

    /// Once the preference has ended nothing is enqueued here again: the thread may end.
    func finish() {
        condition.lock()
        finished = true
        condition.signal()
        condition.unlock()
    }

    private func serve() {
        while true {
            condition.lock()
            while jobs.isEmpty && !finished { condition.wait() }
            if jobs.isEmpty {
                condition.unlock()
                return
            }
            let job = jobs.removeFirst()
            condition.unlock()
            job.runSynchronously(on: asUnownedTaskExecutor())
        }
    }
}

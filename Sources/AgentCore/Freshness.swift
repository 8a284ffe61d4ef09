import AgentProtocol
import CAgentShim
import Glibc

/// The guest's wall clock, as the agent reads and sets it. A protocol so the
/// clock logic is tested with a fake one.
protocol WallClock: AnyObject {
    /// CLOCK_REALTIME in ns since the epoch.
    func now() -> UInt64
    /// Sets CLOCK_REALTIME; returns an errno, or 0.
    func set(_ nanoseconds: UInt64) -> Int32
}

/// Makes a guest fresh before each command: its clock moved to the host's
/// and its random pool reseeded with the host's bytes. A VM restored from a
/// snapshot wakes with the clock and the random pool of the moment it was
/// saved; without this every restore of one snapshot would hand out the
/// same "random" numbers, and report the snapshot's time.
enum Freshness {
    /// Leave a clock closer to the host's than this alone: setting it is a
    /// step for every timer in the guest, and the request's own trip takes a
    /// few milliseconds.
    static let clockTolerance: UInt64 = 100_000_000

    /// The time to set the guest's clock to, or nil to leave it: the host's
    /// time when it is known and the guest's differs from it by more than the tolerance.
    static func clockAdjustment(guestNow: UInt64, hostNow: UInt64) -> UInt64? {
        guard hostNow != 0 else { return nil }
        let off = guestNow > hostNow ? guestNow - hostNow : hostNow - guestNow
        return off > clockTolerance ? hostNow : nil
    }

    /// Applies a run request's clock and entropy; returns what went wrong, for the console.
    static func apply(_ request: RunRequest, clock: WallClock, addEntropy: ([UInt8]) -> Int32) -> [String] {
        var problems: [String] = []
        if let target = clockAdjustment(guestNow: clock.now(), hostNow: request.hostTimeNanoseconds) {
            let e = clock.set(target)
            if e != 0 { problems.append("cannot set the clock to the host's: \(Sys.errorText(e))") }
        }
        if !request.entropy.isEmpty {
            let e = addEntropy(request.entropy)
            if e != 0 { problems.append("cannot reseed the random pool: \(Sys.errorText(e))") }
        }
        return problems
    }
}

/// CLOCK_REALTIME.
final class SystemWallClock: WallClock {
    func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(max(0, ts.tv_sec)) * 1_000_000_000 + UInt64(max(0, ts.tv_nsec))
    }

    func set(_ nanoseconds: UInt64) -> Int32 {
        var ts = timespec(tv_sec: Int(nanoseconds / 1_000_000_000), tv_nsec: Int(nanoseconds % 1_000_000_000))
        return clock_settime(CLOCK_REALTIME, &ts) == 0 ? 0 : errno
    }
}

extension Freshness {
    /// The kernel's pool, through the C shim (RNDADDENTROPY, RNDRESEEDCRNG).
    static func addKernelEntropy(_ bytes: [UInt8]) -> Int32 {
        bytes.withUnsafeBytes { airlock_add_entropy($0.baseAddress, $0.count) }
    }
}

import Dispatch
import NIOCore
import NIOHTTPTypes
import Synchronization

/// One connection's end, as the service's runs see it: a client that closes its
/// side (or whose connection breaks) while its run is going ends that run's VM.
final class ConnectionState: Sendable {
    private let state = Mutex<(closed: Bool, next: UInt64, callbacks: [UInt64: @Sendable () -> Void])>((false, 0, [:]))

    /// Calls `callback` once when the connection ends (at once if it has); the token removes it.
    func onClose(_ callback: @escaping @Sendable () -> Void) -> UInt64? {
        let token = state.withLock { s -> UInt64? in
            guard !s.closed else { return nil }
            s.next += 1
            s.callbacks[s.next] = callback
            return s.next
        }
        if token == nil { callback() }
        return token
    }

    func remove(_ token: UInt64?) {
        guard let token else { return }
        _ = state.withLock { $0.callbacks.removeValue(forKey: token) }
    }

    var isClosed: Bool { state.withLock { $0.closed } }

    func close() {
        let callbacks = state.withLock { s -> [@Sendable () -> Void] in
            guard !s.closed else { return [] }
            s.closed = true
            defer { s.callbacks.removeAll() }
            return Array(s.callbacks.values)
        }
        for c in callbacks { c() }
    }
}

/// Sits in each connection's pipeline (after HTTP decoding) and tells the
/// connection's `ConnectionState` when the client's side closes or the channel goes.
///
/// Hummingbird's `consumeWithCancellationOnInboundClose` does this by reading the
/// request stream, which ends keep-alive after the response; watching the
/// channel's events keeps the connection reusable.
final class ConnectionWatcher: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart

    let state = ConnectionState()

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed { state.close() }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        state.close()
        context.fireChannelInactive()
    }

    /// The state of `channel`'s watcher (nil where there is none).
    static func state(of channel: any Channel) async -> ConnectionState? {
        try? await channel.eventLoop.submit {
            try channel.pipeline.syncOperations.handler(type: ConnectionWatcher.self).state
        }.get()
    }
}

/// The runs in flight, so the drain can end them when its time is up.
final class RunRegistry: Sendable {
    private let state = Mutex<(closed: Bool, next: UInt64, cancels: [UInt64: @Sendable () -> Void])>((false, 0, [:]))

    /// Registers a run's cancel; after `cancelAll` a new run is cancelled at once.
    func add(_ cancel: @escaping @Sendable () -> Void) -> UInt64? {
        let token = state.withLock { s -> UInt64? in
            guard !s.closed else { return nil }
            s.next += 1
            s.cancels[s.next] = cancel
            return s.next
        }
        if token == nil { cancel() }
        return token
    }

    func remove(_ token: UInt64?) {
        guard let token else { return }
        _ = state.withLock { $0.cancels.removeValue(forKey: token) }
    }

    var count: Int { state.withLock { $0.cancels.count } }

    func cancelAll() {
        let cancels = state.withLock { s -> [@Sendable () -> Void] in
            s.closed = true
            defer { s.cancels.removeAll() }
            return Array(s.cancels.values)
        }
        for c in cancels { c() }
    }
}

/// Events from a run's output threads to the task writing the answer.
///
/// Bounded: when the client reads slower than the command writes, the output
/// threads wait here, which makes the guest's writes wait (as on a full pipe);
/// the service never holds more than `limit` bytes of one run's output.
final class EventStream: Sendable {
    private struct State {
        var queue: [(event: RunEvent, size: Int)] = []
        var bytes = 0
        var finished = false
        var closed = false
        var consumer: CheckedContinuation<RunEvent?, Never>?
        var blockedProducers = 0
    }

    private let state = Mutex(State())
    private let space = DispatchSemaphore(value: 0)
    let limit: Int

    init(limit: Int = 1 << 20) { self.limit = limit }

    /// Adds an event; blocks the calling (output) thread while the reader is `limit` bytes behind.
    /// After `close` the event is dropped: nobody reads any more.
    func push(_ event: RunEvent, size: Int) {
        enum Step { case deliver(CheckedContinuation<RunEvent?, Never>), queued, wait, drop }
        while true {
            let step = state.withLock { s -> Step in
                if s.closed || s.finished { return .drop }
                if let consumer = s.consumer {
                    s.consumer = nil
                    return .deliver(consumer)
                }
                if s.bytes > 0 && s.bytes + size > limit {
                    s.blockedProducers += 1
                    return .wait
                }
                s.queue.append((event, size))
                s.bytes += size
                return .queued
            }
            switch step {
            case let .deliver(consumer): consumer.resume(returning: event); return
            case .queued, .drop: return
            case .wait: space.wait()
            }
        }
    }

    /// The next event, or nil after `finish` (everything delivered) or `close`.
    func next() async -> RunEvent? {
        await withCheckedContinuation { (continuation: CheckedContinuation<RunEvent?, Never>) in
            let (ready, wake) = state.withLock { s -> (RunEvent??, Int) in
                if !s.queue.isEmpty {
                    let first = s.queue.removeFirst()
                    s.bytes -= first.size
                    defer { s.blockedProducers = 0 }
                    return (.some(first.event), s.blockedProducers)
                }
                if s.finished || s.closed { return (.some(nil), 0) }
                s.consumer = continuation
                return (nil, 0)
            }
            for _ in 0..<wake { space.signal() }
            if let ready { continuation.resume(returning: ready) }
        }
    }

    /// No more events will come; the reader gets what is queued, then nil.
    func finish() { end(closing: false) }

    /// The reader has gone: waiting output threads are released and later events dropped.
    func close() { end(closing: true) }

    private func end(closing: Bool) {
        let (consumer, wake) = state.withLock { s -> (CheckedContinuation<RunEvent?, Never>?, Int) in
            if closing { s.closed = true } else { s.finished = true }
            if closing { s.queue.removeAll(); s.bytes = 0 }
            let c = s.consumer
            s.consumer = nil
            defer { s.blockedProducers = 0 }
            return (c, s.blockedProducers)
        }
        for _ in 0..<wake { space.signal() }
        consumer?.resume(returning: nil)
    }
}

import Prometheus

/// The service's counters, gauges and histograms, in one registry per server (so
/// that servers in one process, as in the tests, never share numbers), exported
/// as Prometheus text on `GET /metrics`.
public final class ServeMetrics: Sendable {
    let registry = PrometheusCollectorRegistry()

    /// How a run request ended, one label value each (docs/serve.md lists them).
    public enum Outcome: String, Sendable, CaseIterable {
        /// The command ran and exited 0.
        case succeeded
        /// The command ran and exited non-zero (or was killed by a signal, or not found).
        case failed
        /// The command ran past its timeout; the VM was destroyed.
        case timedOut = "timed_out"
        /// Refused before it ran: bad request (400), too large (413), queue full (429), draining (503).
        case refused
        /// Airlock itself failed: boot, VMM or protocol error (500).
        case error
        /// The client went away, or the service shut down, before the answer was written.
        case cancelled
    }

    /// Why a request was turned away before it got a sandbox.
    public enum Refusal: String, Sendable, CaseIterable {
        case unauthorized, badRequest = "bad_request", bodyTooLarge = "body_too_large", queueFull = "queue_full", draining
    }

    private static var runsDescriptor: MetricNameDescriptor { MetricNameDescriptor(
        namespace: "airlock", subsystem: "serve", metricName: "runs", unitName: "total",
        helpText: "Run requests by how they ended.") }
    private static var refusalsDescriptor: MetricNameDescriptor { MetricNameDescriptor(
        namespace: "airlock", subsystem: "serve", metricName: "refusals", unitName: "total",
        helpText: "Requests turned away before they got a sandbox, by reason.") }
    private static var bootsDescriptor: MetricNameDescriptor { MetricNameDescriptor(
        namespace: "airlock", subsystem: "serve", metricName: "boots", unitName: "total",
        helpText: "Sandboxes booted, by result.") }
    private static var restoresDescriptor: MetricNameDescriptor { MetricNameDescriptor(
        namespace: "airlock", subsystem: "serve", metricName: "restores", unitName: "total",
        helpText: "Sandboxes restored from a snapshot, by result.") }

    let runDuration: DurationHistogram
    let queueWait: DurationHistogram
    let poolSize: Gauge
    let ready: Gauge
    let busy: Gauge
    let booting: Gauge

    /// Seconds: from a few milliseconds (a warm run on fast hardware) to a slow boot here.
    static let durationBuckets: [Duration] = [
        .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
        .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10),
        .seconds(30), .seconds(60), .seconds(120), .seconds(300),
    ]

    public init() {
        runDuration = registry.makeDurationHistogram(
            descriptor: MetricNameDescriptor(namespace: "airlock", subsystem: "serve", metricName: "run_duration", unitName: "seconds",
                                             helpText: "Time a request spent in its sandbox (boot included when it had to wait for one), by outcome."),
            labels: [], buckets: Self.durationBuckets)
        queueWait = registry.makeDurationHistogram(
            descriptor: MetricNameDescriptor(namespace: "airlock", subsystem: "serve", metricName: "queue_wait", unitName: "seconds",
                                             helpText: "Time a request waited for a sandbox (a free slot and a ready VM)."),
            labels: [], buckets: Self.durationBuckets)
        poolSize = registry.makeGauge(descriptor: MetricNameDescriptor(
            namespace: "airlock", subsystem: "serve", metricName: "pool_size", unitName: "sandboxes",
            helpText: "Warm sandboxes the pool keeps ready (--pool)."))
        ready = registry.makeGauge(descriptor: MetricNameDescriptor(
            namespace: "airlock", subsystem: "serve", metricName: "ready", unitName: "sandboxes",
            helpText: "Sandboxes booted and waiting for a request."))
        busy = registry.makeGauge(descriptor: MetricNameDescriptor(
            namespace: "airlock", subsystem: "serve", metricName: "busy", unitName: "sandboxes",
            helpText: "Sandboxes running a request (or being destroyed after one)."))
        booting = registry.makeGauge(descriptor: MetricNameDescriptor(
            namespace: "airlock", subsystem: "serve", metricName: "booting", unitName: "sandboxes",
            helpText: "Sandboxes being booted or restored."))
        // Every label value exists from the start, so a scraper sees zeros rather than gaps.
        for o in Outcome.allCases { _ = registry.makeCounter(descriptor: Self.runsDescriptor, labels: [("outcome", o.rawValue)]) }
        for r in Refusal.allCases { _ = registry.makeCounter(descriptor: Self.refusalsDescriptor, labels: [("reason", r.rawValue)]) }
        for r in ["ok", "failed"] {
            _ = registry.makeCounter(descriptor: Self.bootsDescriptor, labels: [("result", r)])
            _ = registry.makeCounter(descriptor: Self.restoresDescriptor, labels: [("result", r)])
        }
    }

    func run(_ outcome: Outcome) {
        registry.makeCounter(descriptor: Self.runsDescriptor, labels: [("outcome", outcome.rawValue)]).increment()
    }

    func refusal(_ reason: Refusal) {
        registry.makeCounter(descriptor: Self.refusalsDescriptor, labels: [("reason", reason.rawValue)]).increment()
    }

    func prepared(_ origin: SandboxOrigin?, ok: Bool) {
        let descriptor = origin == .restored ? Self.restoresDescriptor : Self.bootsDescriptor
        registry.makeCounter(descriptor: descriptor, labels: [("result", ok ? "ok" : "failed")]).increment()
    }

    /// The Prometheus text exposition of everything above.
    public func exposition() -> String { registry.emitToString() }
}

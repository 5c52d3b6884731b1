//! The gateway's Prometheus series (connections, subscriptions, deliveries, latency, slow
//! consumers, replays, database reads waiting).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Counters of the gateway, shared by its tasks. Cheap to clone (every field is an `Arc`).
#[derive(Clone, Debug)]
pub struct GatewayMetrics {
    pub(crate) events: Counter,
    pub(crate) frames: Counter,
    pub(crate) latency: Histogram,
    pub(crate) connections: Gauge,
    pub(crate) subscriptions: Gauge,
    pub(crate) slow_closes: Counter,
    /// The memory of every connection's queued entries together (the hub's [`crate::outbox`]
    /// total is kept in it).
    pub(crate) queued_bytes: Gauge,
    pub(crate) auth_failures: Counter,
    pub(crate) replays_from_window: Counter,
    pub(crate) replays_from_log: Counter,
    pub(crate) reads_waiting: Gauge,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        GatewayMetrics {
            events: Counter::default(),
            frames: Counter::default(),
            latency: Histogram::new([
                0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            connections: Gauge::default(),
            subscriptions: Gauge::default(),
            slow_closes: Counter::default(),
            queued_bytes: Gauge::default(),
            auth_failures: Counter::default(),
            replays_from_window: Counter::default(),
            replays_from_log: Counter::default(),
            reads_waiting: Gauge::default(),
        }
    }
}

impl GatewayMetrics {
    /// Adds every series to `registry` (names get the `pgcast_` prefix from the caller's
    /// registry or are used as they are).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "pgcast_events_dispatched",
            "Events handed by the listener to the gateway for fan-out",
            self.events.clone(),
        );
        registry.register(
            "pgcast_frames_delivered",
            "Event frames written to WebSocket connections",
            self.frames.clone(),
        );
        registry.register(
            "pgcast_delivery_latency_seconds",
            "From the writing transaction's commit (database clock) to the frame's write; one sample per write batch, its oldest frame",
            self.latency.clone(),
        );
        registry.register(
            "pgcast_connections",
            "Open WebSocket connections",
            self.connections.clone(),
        );
        registry.register(
            "pgcast_subscriptions",
            "Active subscriptions",
            self.subscriptions.clone(),
        );
        registry.register(
            "pgcast_slow_consumer_closes",
            "Connections closed with 4008 because their outgoing queue overflowed (its own budget, or its share of --outbound-bytes-total while every queue together was over it)",
            self.slow_closes.clone(),
        );
        registry.register(
            "pgcast_outbound_queued_bytes",
            "Memory of every connection's queued outgoing entries together (about 70 bytes each; the frames they share are not counted), held to --outbound-bytes-total",
            self.queued_bytes.clone(),
        );
        registry.register(
            "pgcast_auth_failures",
            "Connections refused for a missing, invalid or late token",
            self.auth_failures.clone(),
        );
        registry.register(
            "pgcast_replays_from_window",
            "since replays served from the in-memory replay window, without a database read",
            self.replays_from_window.clone(),
        );
        registry.register(
            "pgcast_replays_from_log",
            "since replays read from the event log (older than the replay window)",
            self.replays_from_log.clone(),
        );
        registry.register(
            "pgcast_database_reads_waiting",
            "Subscribes waiting their turn for a database read (snapshot, replay, access check)",
            self.reads_waiting.clone(),
        );
    }
}

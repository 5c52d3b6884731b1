//! The database side's series of `/metrics`: the listener's counters and gauges, read from
//! its [`ListenerStatus`] at scrape time, and the gauges read from the database itself
//! (`pg_notification_queue_usage()`, the log head), read in the background so that a scrape
//! never waits on the database.
//!
//! ```text
//!   ListenerStatus (atomics) ──at scrape──▶ pgcast_listener_*, pgcast_events_received
//!   ListenerMetrics::read_database: every 5 s ──▶ pgcast_notification_queue_usage,
//!        pgcast_log_head_position, pgcast_database_gauges_age_seconds (last good reading)
//! ```

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::{ListenerError, ListenerStatus, LogHead};

/// `pg_notification_queue_usage()`, the query `pgcast doctor` checks too.
const QUEUE_USAGE_SQL: &str = include_str!("../../../sql/doctor_notify_queue.sql");
/// How often the database gauges are read; a scrape serves the last reading.
const READ_EVERY: Duration = Duration::from_secs(5);
/// Longest wait for one reading of the database gauges.
const READ_TIMEOUT: Duration = Duration::from_secs(4);

/// The listener's and the database's series, registered with [`ListenerMetrics::register`]
/// and kept up to date by [`ListenerMetrics::read_database`]. Cheap to clone: the gauges are
/// shared.
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    status: Arc<ListenerStatus>,
    queue_usage: Gauge<f64, AtomicU64>,
    log_head: Gauge,
    /// Seconds since the database gauges were last read successfully: a stale reading shows
    /// here instead of hanging the scrape.
    age: Gauge<f64, AtomicU64>,
}

impl ListenerMetrics {
    /// The series of the listener whose status is `status`.
    pub fn new(status: Arc<ListenerStatus>) -> Self {
        ListenerMetrics {
            status,
            queue_usage: Gauge::default(),
            log_head: Gauge::default(),
            age: Gauge::default(),
        }
    }

    /// Adds every series to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "pgcast_notification_queue_usage",
            "pg_notification_queue_usage() of the database (0..1), read every 5 s",
            self.queue_usage.clone(),
        );
        registry.register(
            "pgcast_log_head_position",
            "Highest position in pgcast.assignment_events (read every 5 s)",
            self.log_head.clone(),
        );
        registry.register(
            "pgcast_database_gauges_age_seconds",
            "Seconds since the database gauges (queue usage, log head) were last read successfully",
            self.age.clone(),
        );
        registry.register_collector(Box::new(StatusCollector(self.status.clone())));
    }

    /// Reads the database gauges through `pool` every 5 s until `stop`; a failed or slow
    /// reading keeps the last values, and their age shows it.
    pub async fn read_database(self, pool: Pool, stop: CancellationToken) {
        // Before the first reading, the age counts from the start.
        let mut last_read = Instant::now();
        let mut tick = tokio::time::interval(READ_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let result = tokio::select! {
                r = tokio::time::timeout(READ_TIMEOUT, read_gauges(&pool)) => r,
                () = stop.cancelled() => return,
            };
            match result {
                Ok(Ok((usage, head))) => {
                    self.queue_usage.set(usage);
                    self.log_head.set(head.head);
                    last_read = Instant::now();
                }
                Ok(Err(error)) => tracing::debug!(%error, "reading the database gauges failed"),
                Err(_) => tracing::debug!("reading the database gauges timed out"),
            }
            self.age.set(last_read.elapsed().as_secs_f64());
        }
    }
}

/// One reading: the notification queue's usage and the log head.
async fn read_gauges(pool: &Pool) -> Result<(f64, LogHead), ListenerError> {
    let client = pool.get().await?;
    let usage: f64 = client.query_one(QUEUE_USAGE_SQL, &[]).await?.try_get(0)?;
    let head = LogHead::read(&client).await?;
    Ok((usage, head))
}

/// Listener state as metrics, read from its atomics at scrape time.
#[derive(Debug)]
struct StatusCollector(Arc<ListenerStatus>);

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let s = self.0.snapshot();
        let counters = [
            (
                "pgcast_listener_notifications",
                "Doorbells (notifications) received on the LISTEN connection",
                s.notifications,
            ),
            (
                "pgcast_listener_ignored_payloads",
                "Notifications that carried a payload (pgcast's doorbell is empty): forged, \
                 garbled or from an older trigger; ignored, they only woke the listener",
                s.ignored_payloads,
            ),
            (
                "pgcast_events_received",
                "Events the listener read from the log and emitted",
                s.events,
            ),
            (
                "pgcast_listener_decode_errors",
                "Log rows that could not be decoded and were skipped",
                s.decode_errors,
            ),
            (
                "pgcast_listener_reconnects",
                "Times the LISTEN connection was lost and re-established",
                s.reconnects,
            ),
            (
                "pgcast_listener_gaps",
                "Times the stream had to start again: the log was pruned past the listener's \
                 position, or its head was behind it (a restore, a lossy failover); live \
                 subscribers were closed to resume and resync",
                s.gaps,
            ),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let gauges = [
            (
                "pgcast_listener_connected",
                "1 while the LISTEN connection is up and caught up",
                i64::from(s.caught_up),
            ),
            (
                "pgcast_listener_position",
                "Position of the last event the listener emitted",
                s.last_position,
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let g = ConstGauge::new(last_event_age(s.last_committed_micros));
        g.encode(encoder.encode_descriptor(
            "pgcast_listener_last_event_age_seconds",
            "Seconds since the commit of the last event the listener emitted",
            None,
            g.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Seconds from the commit at `committed_micros` (since the Unix epoch) until now; 0 before
/// the first event, and for a commit stamped ahead of this machine's clock.
fn last_event_age(committed_micros: i64) -> f64 {
    if committed_micros <= 0 {
        return 0.0;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    now.saturating_sub(committed_micros).max(0) as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_event_age_is_zero_before_the_first_event_and_never_negative() {
        assert_eq!(last_event_age(0), 0.0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or_default();
        let age = last_event_age(now - 2_000_000);
        assert!((2.0..3.0).contains(&age), "{age}");
        assert_eq!(last_event_age(now + 60_000_000), 0.0, "clock skew");
    }

    #[test]
    fn every_listener_series_is_exposed() {
        let mut registry = Registry::default();
        ListenerMetrics::new(Arc::default()).register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for name in [
            "pgcast_notification_queue_usage",
            "pgcast_log_head_position",
            "pgcast_database_gauges_age_seconds",
            "pgcast_listener_notifications_total",
            "pgcast_listener_ignored_payloads_total",
            "pgcast_events_received_total",
            "pgcast_listener_decode_errors_total",
            "pgcast_listener_reconnects_total",
            "pgcast_listener_gaps_total",
            "pgcast_listener_connected",
            "pgcast_listener_position",
            "pgcast_listener_last_event_age_seconds",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name} "))),
                "{name} missing:\n{text}"
            );
        }
    }
}

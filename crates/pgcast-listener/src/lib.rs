//! pgcast's database side: it owns everything that talks to PostgreSQL about events.
//!
//! ```text
//!   migrations/ ──migrate()──▶ pgcast schema: log table, sequence, deferred trigger
//!                                         │ pg_notify('pgcast_assignments', '')  (a doorbell)
//!                                         ▼
//!   Listener::run: 1 dedicated connection, LISTEN; every doorbell (and every reconnect) reads
//!        │  EventLog::read_range after the last position, via its pool ──▶ mpsc of
//!        ▼                                              Arc<AssignmentEvent> (position order,
//!   ListenerStatus (connected, caught up, last position, reconnects, errors)   no duplicates)
//! ```
//!
//! Events come only from the log. The notification carries nothing: PostgreSQL lets any role
//! that can connect LISTEN and NOTIFY on any channel, so a payload can be neither private nor
//! trusted. A forged or garbled notification makes the listener read the log early, nothing
//! more.
//!
//! The LISTEN connection is driven through `Connection::poll_message` inside the listener's own
//! task: a spawned `Connection` future (or a pooled connection) would drop notifications. It is
//! read even while the consumer is slow (doorbells collapse into one pending wake-up), so
//! pgcast never leaves notifications in PostgreSQL's queue. Log reads go through the deadpool
//! pool, so a slow catch-up never stalls the notification socket into a deadlock.
//!
//! Beside the stream, the crate owns the rest of the product's database work: the query pools
//! ([`pool`]: connect, wait and statement timeouts), retention ([`prune`]) and the database
//! side's series of `/metrics` ([`ListenerMetrics`]). Every query is a file of the top-level
//! `sql/` directory; the log head has one query, [`LogHead::read`].
//!
//! ```text
//!   pool() ──▶ EventLog (log_read_range, log_head, log_window_start) ──▶ Listener, gateway, tail
//!          ──▶ prune(): pgcast.prune_events() every minute
//!          ──▶ ListenerMetrics::read_database(): queue usage + log head every 5 s
//! ```

mod backoff;
mod error;
mod listener;
mod log;
mod metrics;
mod pool;
mod prune;
mod schema;

pub use backoff::Backoff;
pub use error::{describe_pg, ListenerError};
pub use listener::{
    Listener, ListenerStatus, Output, Start, StatusSnapshot, APPLICATION_NAME, CHANNEL,
};
pub use log::{EventLog, LogHead, LogPage, Undecodable};
pub use metrics::ListenerMetrics;
pub use pool::{pool, CONNECT_TIMEOUT};
pub use prune::prune;
pub use schema::{
    installed_version, migrate, migrate_within, MigrationScope, MIGRATION_LOCK_WAIT, SCHEMA_VERSION,
};

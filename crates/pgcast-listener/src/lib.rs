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

mod backoff;
mod error;
mod listener;
mod log;
mod schema;

pub use backoff::Backoff;
pub use error::{describe_pg, ListenerError};
pub use listener::{Listener, ListenerStatus, Start, StatusSnapshot, APPLICATION_NAME, CHANNEL};
pub use log::{EventLog, LogHead, LogPage};
pub use schema::{installed_version, migrate, MigrationScope, SCHEMA_VERSION};

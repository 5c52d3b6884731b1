//! pgcast's database side: it owns everything that talks to PostgreSQL about events.
//!
//! ```text
//!   migrations/ ──migrate()──▶ pgcast schema: log table, sequence, deferred trigger
//!                                         │ pg_notify('pgcast_assignments', …)
//!                                         ▼
//!   Listener::run: 1 dedicated connection, LISTEN, decode ──▶ mpsc of Arc<AssignmentEvent>
//!        │  on connect / reconnect / gap: EventLog::read_range via the pool     (ordered by
//!        ▼                                                                      position, no
//!   ListenerStatus (connected, caught up, last position, reconnects, errors)    duplicates)
//! ```
//!
//! The LISTEN connection is driven through `Connection::poll_message` inside the listener's own
//! task: a spawned `Connection` future (or a pooled connection) would drop notifications. Every
//! other query (catch-up, references, gap filling) goes through the deadpool pool, so a slow
//! catch-up never stalls the notification socket into a deadlock.

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

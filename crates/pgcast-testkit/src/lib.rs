//! Everything pgcast's tests share, in one crate: throwaway PostgreSQL (real servers from the
//! machine's own binaries, no mocks, isolated per test), cleanup that survives a killed test
//! process, and — behind features — the clients and references the tests judge pgcast with.
//!
//! ```text
//! PgCluster::shared()  one cluster per test process ─┐
//! PgCluster::start()   a private one (fault tests)  ─┴─▶ create_database() ─▶ TestDb ─▶ connect()
//!                                                        t_<pid>_<n>_<random>        └▶ pool()   [pool]
//! Watchdog             kill on parent exit: process groups, pids, a stop command, a directory
//! base64url            the JWT alphabet, both ways
//! http                 HTTP/1.0 GET from any 127/8 address; one Prometheus sample
//! legacy               SQL leaving a database as an incomplete upgrade would (version 2's trigger)
//! ws::Ws               the wire-protocol client: auth, subscribe, frames, markers   [protocol]
//! token                principals, HS256 tokens minted independently, claims        [protocol]
//! oracle               who sees what, written from the README, not from pgcast-events [protocol]
//! ```
//!
//! Features: `pool` (deadpool-postgres) and `protocol` (tokio-tungstenite, jsonwebtoken,
//! serde_json, pgcast-events); the rest needs only tokio and tokio-postgres.
//!
//! Clusters are copies of a template made once per PostgreSQL version, start in well under a
//! second, listen on a free port of 127.0.0.1 and are removed when dropped or, at the latest,
//! when the test process ends (see [`PgCluster`]). Works as root (PostgreSQL then runs as the
//! `postgres` OS user) and as a regular user. Without PostgreSQL installed, every entry point
//! returns an error saying how to install it.
//!
//! ```no_run
//! # async fn example() -> Result<(), pgcast_testkit::TestkitError> {
//! let db = pgcast_testkit::PgCluster::shared()?.create_database().await?;
//! let client = db.connect().await?;
//! let one: i32 = client.query_one("SELECT 1", &[]).await.expect("query").get(0);
//! assert_eq!(one, 1);
//! # Ok(())
//! # }
//! ```

pub mod base64url;
mod cluster;
mod database;
mod error;
pub mod http;
pub mod legacy;
#[cfg(feature = "protocol")]
pub mod oracle;
#[cfg(feature = "pool")]
mod pool;
#[cfg(feature = "protocol")]
pub mod token;
mod watchdog;
#[cfg(feature = "protocol")]
pub mod ws;

pub use cluster::{ClusterOptions, PgCluster};
pub use database::TestDb;
pub use error::TestkitError;
pub use watchdog::{Watchdog, WatchdogPlan};

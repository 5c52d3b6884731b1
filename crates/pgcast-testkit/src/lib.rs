//! Throwaway PostgreSQL for pgcast's tests: real servers from the machine's own binaries, no
//! mocks, isolated per test.
//!
//! ```text
//! PgCluster::shared()  one cluster per test process ─┐
//! PgCluster::start()   a private one (fault tests)  ─┴─▶ create_database() ─▶ TestDb ─▶ connect()
//!                                                        t_<pid>_<n>_<random>
//! ```
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

mod cluster;
mod database;
mod error;
mod watchdog;

pub use cluster::{ClusterOptions, PgCluster};
pub use database::TestDb;
pub use error::TestkitError;

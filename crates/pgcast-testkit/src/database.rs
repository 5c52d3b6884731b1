//! A database of its own per test on a [`PgCluster`](crate::PgCluster): unique names,
//! connection settings, connections.

use std::hash::{BuildHasher, RandomState};
use std::process;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_postgres::{Client, Config, NoTls};

use crate::{PgCluster, TestkitError};

/// Bounds every connection attempt, so a test against a stopped server fails instead of
/// hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A database of its own for one test, on a [`PgCluster`].
///
/// It is not dropped when this value is: the cluster, and every database in it, goes away with
/// the cluster.
#[derive(Debug, Clone)]
pub struct TestDb {
    name: String,
    url: String,
    port: u16,
}

impl TestDb {
    /// The database name, `t_<pid>_<counter>_<random>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection URL, `postgres://postgres@127.0.0.1:<port>/<name>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connection settings, for code that takes a `tokio_postgres::Config`.
    pub fn pg_config(&self) -> Config {
        pg_config(self.port, &self.name)
    }

    /// Opens a connection; its connection task runs on the current tokio runtime.
    pub async fn connect(&self) -> Result<Client, TestkitError> {
        connect(self.port, &self.name).await
    }
}

impl PgCluster {
    /// Creates a new, empty database with a name unique to this call, so that tests can share
    /// a cluster and run in parallel.
    pub async fn create_database(&self) -> Result<TestDb, TestkitError> {
        let name = unique_name();
        let admin = connect(self.port(), "postgres").await?;
        // Identifiers cannot be bind parameters; the name is ours and only `[a-z0-9_]`.
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(|source| TestkitError::Postgres {
                action: "create a test database",
                source,
            })?;
        Ok(TestDb {
            url: self.url(&name),
            port: self.port(),
            name,
        })
    }
}

fn pg_config(port: u16, dbname: &str) -> Config {
    let mut config = Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname(dbname)
        .connect_timeout(CONNECT_TIMEOUT);
    config
}

async fn connect(port: u16, dbname: &str) -> Result<Client, TestkitError> {
    let (client, connection) = pg_config(port, dbname)
        .connect(NoTls)
        .await
        .map_err(|source| TestkitError::Postgres {
            action: "connect",
            source,
        })?;
    // A connection error also fails the client's next call, which is where a test sees it.
    tokio::spawn(connection);
    Ok(client)
}

/// The pid separates test processes sharing a machine, the counter separates calls in one
/// process, and the random part guards against a reused pid.
fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Each `RandomState` has fresh random keys: randomness without another dependency.
    let random = RandomState::new().hash_one(n) as u32;
    format!("t_{}_{n}_{random:08x}", process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_valid_identifiers() {
        let a = unique_name();
        let b = unique_name();
        assert_ne!(a, b);
        for name in [a, b] {
            assert!(name.len() <= 63, "{name}");
            assert!(name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        }
    }
}

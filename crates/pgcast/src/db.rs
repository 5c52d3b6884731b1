//! One-off database connections of the operator commands.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::{Client, NoTls};

use crate::config::DatabaseUrl;
use crate::PgcastError;

/// Used when the connection string sets no `connect_timeout`: a command against an unreachable
/// host fails instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a pooled connection.
const POOL_WAIT: Duration = Duration::from_secs(5);
/// Longest statement on a pooled connection (snapshots, replay pages, log reads, pruning,
/// metrics): a stuck query fails instead of holding a connection, and the task waiting on it,
/// indefinitely. Set as a session default, so it covers every statement the pool runs.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection named `application_name` (visible in `pg_stat_activity`); its connection
/// task runs on the current tokio runtime and ends when the client is dropped.
pub async fn connect(url: &DatabaseUrl, application_name: &str) -> Result<Client, PgcastError> {
    connect_config(url.pg_config(), application_name).await
}

/// [`connect`] with a parsed configuration.
pub async fn connect_config(
    pg: &tokio_postgres::Config,
    application_name: &str,
) -> Result<Client, PgcastError> {
    let mut config = pg.clone();
    config.application_name(application_name);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let (client, connection) = config.connect(NoTls).await.map_err(PgcastError::Connect)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            // The client's next call fails with the same error; this only leaves a trace.
            tracing::debug!(%error, "database connection ended");
        }
    });
    Ok(client)
}

/// A query pool of at most `max_size` connections to `pg`, every statement bounded by a
/// statement timeout.
pub fn pool(pg: &tokio_postgres::Config, max_size: usize) -> Result<Pool, PgcastError> {
    let mut pg = pg.clone();
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(CONNECT_TIMEOUT);
    }
    // Added to the `options` of the connection string unless the operator set their own.
    let timeout = format!("-c statement_timeout={}", STATEMENT_TIMEOUT.as_millis());
    let options = match pg.get_options() {
        Some(o) if o.contains("statement_timeout") => o.to_owned(),
        Some(o) if !o.is_empty() => format!("{o} {timeout}"),
        _ => timeout,
    };
    pg.options(&options);
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    // A query never waits forever for a connection: under overload it fails (the gateway
    // answers `unavailable`, the listener reconnects) instead of parking its task.
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .build()
        .map_err(PgcastError::Pool)
}

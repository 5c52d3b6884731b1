//! One-off database connections of the operator commands.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::config::DatabaseUrl;
use crate::PgcastError;

/// Used when the connection string sets no `connect_timeout`: a command against an unreachable
/// host fails instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection named `application_name` (visible in `pg_stat_activity`); its connection
/// task runs on the current tokio runtime and ends when the client is dropped.
pub async fn connect(url: &DatabaseUrl, application_name: &str) -> Result<Client, PgcastError> {
    let mut config = url.pg_config().clone();
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

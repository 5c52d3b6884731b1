//! [`ListenerError`], the one error type of the database side, and [`describe_pg`].

/// Errors of the database side.
///
/// Each message already contains its cause (no `source()`), so `%error` in a log line shows the
/// whole story once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenerError {
    /// A query or the connection failed.
    #[error("database error: {}", describe_pg(.0))]
    Db(tokio_postgres::Error),
    /// No connection could be taken from the pool.
    #[error("database pool: {0}")]
    Pool(deadpool_postgres::PoolError),
    /// A pool could not be set up.
    #[error("could not set up the connection pool: {0}")]
    PoolBuild(deadpool_postgres::BuildError),
    /// Applying migrations failed.
    #[error("migration failed: {}", describe_chain(.0))]
    Migration(refinery::Error),
    /// `migrate` had something to do and another session held the migration lock for longer
    /// than it waits.
    #[error(
        "the migration lock (advisory key 7277017000) is still held by {holder} after {wait:?}: \
         another `pgcast migrate` still running, or a session that took the key; once it is \
         not a migration, end it with SELECT pg_terminate_backend(pid) and run migrate again"
    )]
    MigrationLockHeld {
        /// Who holds it, from `pg_locks` and `pg_stat_activity`.
        holder: String,
        /// How long `migrate` waited.
        wait: std::time::Duration,
    },
    /// The LISTEN connection closed without an error from the server.
    #[error("listener connection closed")]
    ConnectionClosed,
}

impl From<tokio_postgres::Error> for ListenerError {
    fn from(e: tokio_postgres::Error) -> Self {
        ListenerError::Db(e)
    }
}

impl From<deadpool_postgres::PoolError> for ListenerError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ListenerError::Pool(e)
    }
}

impl From<refinery::Error> for ListenerError {
    fn from(e: refinery::Error) -> Self {
        ListenerError::Migration(e)
    }
}

/// An error with every cause in its `source()` chain on one line, each once.
fn describe_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
}

/// A PostgreSQL client error with its causes on one line ("db error: ERROR: relation … does
/// not exist"): `tokio_postgres::Error` shows only its kind and keeps the server's message in
/// `source()`, which a `%error` log line would drop.
pub fn describe_pg(error: &tokio_postgres::Error) -> String {
    describe_chain(error)
}

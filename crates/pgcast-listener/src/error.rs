/// Errors of the database side.
///
/// Each message already contains its cause (no `source()`), so `%error` in a log line shows the
/// whole story once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenerError {
    /// A query or the connection failed.
    #[error("database error: {0}")]
    Db(tokio_postgres::Error),
    /// No connection could be taken from the pool.
    #[error("database pool: {0}")]
    Pool(deadpool_postgres::PoolError),
    /// Applying migrations failed.
    #[error("migration failed: {0}")]
    Migration(refinery::Error),
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

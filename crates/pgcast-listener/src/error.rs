/// Errors of the database side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenerError {
    /// A query or the connection failed.
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// No connection could be taken from the pool.
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// Applying migrations failed.
    #[error("migration failed: {0}")]
    Migration(#[from] refinery::Error),
    /// The LISTEN connection closed without an error from the server.
    #[error("listener connection closed")]
    ConnectionClosed,
    /// A log row that should exist is missing or undecodable.
    #[error("event log: {0}")]
    Log(String),
}

impl ListenerError {
    /// True for failures that a reconnect may cure (as opposed to bugs or bad schema).
    pub fn is_connection(&self) -> bool {
        match self {
            ListenerError::Db(e) => e.is_closed() || e.as_db_error().is_none(),
            ListenerError::Pool(_) | ListenerError::ConnectionClosed => true,
            ListenerError::Migration(_) | ListenerError::Log(_) => false,
        }
    }
}

/// Errors of the gateway. Clients only ever see a short code; these carry the detail for logs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// A query failed.
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// No database connection available.
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// Reading the event log failed.
    #[error("event log: {0}")]
    Log(#[from] pgcast_listener::ListenerError),
    /// A snapshot would exceed the configured limit.
    #[error("snapshot has more than {0} rows")]
    SnapshotTooLarge(usize),
    /// A row of `session_assignments` could not be decoded.
    #[error("undecodable row: {0}")]
    Row(serde_json::Error),
    /// A token could not be verified or minted.
    #[error("token: {0}")]
    Token(#[from] jsonwebtoken::errors::Error),
}

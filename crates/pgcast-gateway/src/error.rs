//! The gateway's error type.

/// Errors of the gateway. Clients only ever see a short code; these carry the detail for logs.
///
/// Each message already contains its cause (no `source()`), so `%error` in a log line shows the
/// whole story once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// A query failed.
    #[error("database error: {}", pgcast_listener::describe_pg(.0))]
    Db(tokio_postgres::Error),
    /// No database connection available.
    #[error("database pool: {0}")]
    Pool(deadpool_postgres::PoolError),
    /// Reading the event log (its head) failed.
    #[error(transparent)]
    Log(pgcast_listener::ListenerError),
    /// A snapshot would exceed the configured limit.
    #[error("snapshot has more than {0} rows")]
    SnapshotTooLarge(usize),
    /// A row of `session_assignments` could not be decoded.
    #[error("undecodable row: {0}")]
    Row(serde_json::Error),
    /// A token could not be verified or minted.
    #[error("token: {0}")]
    Token(jsonwebtoken::errors::Error),
    /// The HS256 secret is too short to resist an offline brute force of any one token.
    #[error("the JWT secret is {len} bytes long; at least {min} bytes are required")]
    SecretTooShort {
        /// Length of the refused secret, in bytes.
        len: usize,
        /// [`MIN_SECRET_BYTES`](crate::MIN_SECRET_BYTES).
        min: usize,
    },
    /// A token setting (issuer, audience, lifetime) that cannot work.
    #[error("{0}")]
    InvalidConfig(&'static str),
    /// A public key, JWKS URL or algorithm the gateway cannot verify tokens with.
    #[error("{0}")]
    KeyConfig(String),
    /// No configured key may verify this token (unknown `kid`, another algorithm).
    #[error("token key: {0}")]
    KeyNotFound(String),
    /// The token's claims do not name a user, a role or a workshop as the mapping expects.
    #[error("token claims: {0}")]
    Claims(String),
    /// The identity provider's keys could not be read (the last good keys stay in use).
    #[error("JWKS: {0}")]
    Jwks(String),
}

impl GatewayError {
    /// True when the error is a configuration the gateway refuses to run with (rather than a
    /// bad token or a failure at run time).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            GatewayError::SecretTooShort { .. }
                | GatewayError::InvalidConfig(_)
                | GatewayError::KeyConfig(_)
        )
    }
}

impl From<tokio_postgres::Error> for GatewayError {
    fn from(e: tokio_postgres::Error) -> Self {
        GatewayError::Db(e)
    }
}

impl From<pgcast_listener::ListenerError> for GatewayError {
    fn from(e: pgcast_listener::ListenerError) -> Self {
        GatewayError::Log(e)
    }
}

impl From<deadpool_postgres::PoolError> for GatewayError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        GatewayError::Pool(e)
    }
}

impl From<jsonwebtoken::errors::Error> for GatewayError {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        GatewayError::Token(e)
    }
}

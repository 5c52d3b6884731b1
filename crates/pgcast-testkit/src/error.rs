//! The test kit's one error type.

use std::sync::Arc;

use pgcast_localpg::LocalPgError;

/// Everything that can go wrong while providing a test cluster or database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// Finding, creating, starting or stopping the cluster failed.
    #[error(transparent)]
    LocalPg(#[from] LocalPgError),

    /// A filesystem or process operation of the test kit itself failed.
    #[error("could not {action}")]
    Io {
        /// What we were doing.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A statement or connection on the test cluster failed.
    #[error("could not {action} on the test cluster")]
    Postgres {
        /// What we were doing.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// The per-process shared cluster failed to start; every caller gets this error.
    #[error("the shared test cluster failed to start")]
    SharedCluster(#[source] Arc<TestkitError>),
}

impl TestkitError {
    /// True when no PostgreSQL binaries were found on this machine.
    pub fn is_binaries_not_found(&self) -> bool {
        match self {
            Self::LocalPg(err) => err.is_binaries_not_found(),
            Self::SharedCluster(err) => err.is_binaries_not_found(),
            _ => false,
        }
    }
}

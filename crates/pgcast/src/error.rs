//! [`PgcastError`], the error of the `pgcast` library functions: what failed, with the cause in
//! `source()` (only the command functions wrap it in `anyhow`).

use pgcast_listener::ListenerError;

/// Errors of the `pgcast` library functions (the command functions wrap them in `anyhow`).
///
/// Each variant names what failed in its message and keeps the cause in `source()`, so a chain
/// printer shows every cause once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgcastError {
    /// The database could not be reached or refused the connection.
    #[error("could not connect to the database")]
    Connect(#[source] tokio_postgres::Error),
    /// A TLS connection to the database failed (the server's certificate did not verify, or
    /// the server offers no TLS), or TLS could not be set up: one line naming the host, the
    /// `sslmode` and the reason. Also `serve`'s own certificate or key (`--tls-cert`,
    /// `--tls-key`) that cannot be loaded: one line naming the flag and the file.
    #[error("TLS: {0}")]
    Tls(String),
    /// A diagnostic query failed.
    #[error("query failed: {what}")]
    Query {
        /// Which query.
        what: &'static str,
        /// The database's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Reading the event log or running migrations failed.
    #[error(transparent)]
    Listener(#[from] ListenerError),
    /// The event log could not be read at start (unreachable database, or the realtime objects
    /// are not installed).
    #[error("could not read the event log (`pgcast doctor` tells what is wrong)")]
    LogUnavailable(#[source] ListenerError),
    /// A combination of options that cannot work, found after clap's parsing.
    #[error("{0}")]
    Usage(&'static str),
    /// Writing to the output failed (other than the reader going away).
    #[error("could not write the output")]
    Output(#[source] std::io::Error),
    /// The realtime objects are not installed in the database.
    #[error("the pgcast schema is not installed; run `pgcast migrate` (or serve with --migrate)")]
    NotInstalled,
    /// The installed realtime objects are older than this binary.
    #[error(
        "pgcast.version() is {installed} but this binary needs {expected}; run `pgcast migrate`"
    )]
    SchemaTooOld {
        /// `pgcast.version()` in the database.
        installed: i32,
        /// [`pgcast_listener::SCHEMA_VERSION`].
        expected: i32,
    },
    /// The HTTP address could not be bound.
    #[error("could not listen on {addr}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The bound socket has no local address.
    #[error("could not read the bound address")]
    Bind(#[source] std::io::Error),
    /// The demo's local PostgreSQL could not be set up.
    #[error("local PostgreSQL")]
    LocalPg(#[source] pgcast_localpg::LocalPgError),
    /// Another `pgcast demo` runs on the same data directory (it holds the directory's lock).
    #[error(
        "another `pgcast demo` is running on {}; stop it, or give this one a data directory of \
         its own (--data-dir)",
        data_dir.display()
    )]
    DemoInUse {
        /// The data directory.
        data_dir: std::path::PathBuf,
    },
    /// The demo's lock file in its data directory could not be opened or locked.
    #[error("could not lock {}", path.display())]
    DemoLock {
        /// The lock file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A background task of the demo failed to run.
    #[error("{0}")]
    Task(&'static str),
    /// A token could not be signed.
    #[error("could not sign the token")]
    Token(#[source] pgcast_gateway::GatewayError),
    /// The gateway refused its configuration (e.g. a JWT secret shorter than 32 bytes).
    #[error("invalid gateway configuration")]
    Gateway(#[source] pgcast_gateway::GatewayError),
}

impl PgcastError {
    /// True when the error is a usage mistake rather than a failure of the environment.
    pub fn is_usage(&self) -> bool {
        matches!(self, PgcastError::Usage(_))
    }
}

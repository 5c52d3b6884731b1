//! [`LocalPgError`]: everything that can go wrong finding, creating, starting or stopping a
//! local cluster, each with what to do about it.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

/// Everything that can go wrong while finding, creating, starting or stopping a local cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalPgError {
    /// No usable `initdb`/`pg_ctl`/`postgres` was found.
    #[error(
        "PostgreSQL server binaries not found ({detail}); install PostgreSQL \
         (`apt-get install -y postgresql`) or set PGCAST_PG_BIN to the directory holding \
         initdb, pg_ctl and postgres"
    )]
    BinariesNotFound {
        /// Where we looked, or why the directory given in `PGCAST_PG_BIN` was rejected.
        detail: String,
    },

    /// We are root, PostgreSQL refuses to run as root, and there is no user to run it as.
    #[error(
        "running as root, but PostgreSQL refuses to run as root and there is no `postgres` OS \
         user to run it as; create one (`useradd --system postgres`) or run as a regular user"
    )]
    NoPostgresUser,

    /// We are root and the `postgres` OS user cannot reach the data directory.
    #[error(
        "the `postgres` OS user cannot write to {path}; PostgreSQL refuses to run as root, so \
         its data directory must be somewhere that user can reach (not under /root, for example)"
    )]
    NotAccessible {
        /// The data directory.
        path: PathBuf,
    },

    /// The data directory holds files but no cluster: initdb would refuse it, and pgcast
    /// changes nothing in a directory it did not make.
    #[error(
        "{path} holds files but no PostgreSQL cluster (no PG_VERSION); pgcast neither \
         initialises nor changes it: give a new or empty directory for the cluster"
    )]
    NotACluster {
        /// The directory.
        path: PathBuf,
    },

    /// The cluster was made by another major version of PostgreSQL than the binaries found.
    #[error(
        "the cluster in {path} was made by PostgreSQL {cluster_version}, but the binaries in \
         {bin_dir} are {binaries}: install PostgreSQL {cluster_version}'s server (or set \
         PGCAST_PG_BIN to its bin directory), or remove {path} to start afresh"
    )]
    VersionMismatch {
        /// The data directory.
        path: PathBuf,
        /// Its `PG_VERSION`.
        cluster_version: String,
        /// The binaries' directory.
        bin_dir: PathBuf,
        /// What `postgres --version` says.
        binaries: String,
    },

    /// A cluster can only be copied from a template into a new or empty directory.
    #[error("{path} is not empty; a cluster can only be copied into a new or empty directory")]
    NotEmpty {
        /// The directory that already holds files.
        path: PathBuf,
    },

    /// A filesystem operation failed.
    #[error("could not {action} {path}")]
    Io {
        /// What we were doing, e.g. "create directory".
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// No free TCP port could be reserved on 127.0.0.1.
    #[error("could not find a free TCP port on 127.0.0.1")]
    NoFreePort(#[source] io::Error),

    /// A program could not be run at all.
    #[error("could not run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A program ran and reported failure.
    #[error("`{command}` failed ({status}): {output}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// Its stdout and stderr, trimmed.
        output: String,
    },

    /// `pg_ctl start` failed; the server log usually says why.
    #[error(
        "PostgreSQL in {data_dir} did not start on port {port}: {pg_ctl_output}\n\
         last lines of {log}:\n{log_tail}"
    )]
    StartFailed {
        /// The cluster's data directory.
        data_dir: PathBuf,
        /// The port it was asked to listen on.
        port: u16,
        /// What `pg_ctl` printed.
        pg_ctl_output: String,
        /// The server log.
        log: PathBuf,
        /// The last lines of the server log.
        log_tail: String,
    },
}

impl LocalPgError {
    /// True when no PostgreSQL binaries were found on this machine.
    pub fn is_binaries_not_found(&self) -> bool {
        matches!(self, Self::BinariesNotFound { .. })
    }

    /// True when the server could not start because its port was taken, so a caller that
    /// picked the port itself may retry with another one.
    pub fn is_address_in_use(&self) -> bool {
        // The cluster is initialised with `--locale=C`, so the log is in English.
        match self {
            Self::StartFailed { log_tail, .. } => log_tail.contains("Address already in use"),
            _ => false,
        }
    }
}

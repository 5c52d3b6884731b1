//! Where the database is: `--database-url` (and the listener's own URL) and the JWT secret.

use std::fmt;

use clap::Args;

use crate::config::{DatabaseUrl, Secret};
use crate::Database;

/// The database to use.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection string, URL (postgres://user:password@host:port/db) or key=value
    /// form. Required. TLS as libpq's sslmode says (disable, prefer: the default, require,
    /// verify-ca, verify-full) with sslrootcert (a PEM file of CA certificates, or system);
    /// PGSSLMODE and PGSSLROOTCERT apply where the string sets neither.
    #[arg(
        long = "database-url",
        env = "DATABASE_URL",
        hide_env_values = true,
        value_name = "URL",
        value_parser = DatabaseUrl::parse
    )]
    pub database_url: DatabaseUrl,
    /// Connection string for the connections that need a session of their own: the LISTEN
    /// connection, and migrations (they hold a session lock). Set it when --database-url goes
    /// through a transaction pooler (e.g. PgBouncer in transaction mode), where LISTEN hears
    /// nothing: point it at PostgreSQL itself or at a session-mode pool. Default:
    /// --database-url.
    #[arg(
        long = "listen-database-url",
        env = "PGCAST_LISTEN_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL",
        value_parser = DatabaseUrl::parse
    )]
    pub listen_database_url: Option<DatabaseUrl>,
}

impl DatabaseArgs {
    /// Where the connections go.
    pub fn database(&self) -> Database {
        Database::new(self.database_url.clone()).with_listen_url(self.listen_database_url.clone())
    }
}

/// `postgres://…[ listen_database=postgres://…]`, passwords redacted.
impl fmt::Display for DatabaseArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.database_url)?;
        if let Some(listen) = &self.listen_database_url {
            write!(f, " listen_database={listen}")?;
        }
        Ok(())
    }
}

/// The JWT signing secret.
#[derive(Debug, Clone, Args)]
pub struct SecretArgs {
    /// HS256 secret that signs and verifies client tokens, at least 32 bytes (e.g. the output
    /// of `openssl rand -hex 32`). Required.
    #[arg(
        long = "jwt-secret",
        env = "PGCAST_JWT_SECRET",
        hide_env_values = true,
        value_name = "SECRET",
        value_parser = Secret::parse
    )]
    pub jwt_secret: Secret,
}

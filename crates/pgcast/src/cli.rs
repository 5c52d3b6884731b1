//! The command line (design §6): one typed struct per subcommand, each flag also readable from
//! the environment where the design names a variable. Parsing validates every value, so a bad
//! one is reported before anything connects or binds.
//!
//! Each struct's `Display` is the configuration summary printed at start: secrets and database
//! passwords show as `<redacted>`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use pgcast_events::{Position, Role, Topic};
use uuid::Uuid;

use crate::config::{
    format_duration, parse_duration, parse_rate, parse_role, parse_tail_topic, DatabaseUrl, Secret,
};

/// pgcast: PostgreSQL changes of session_assignments, delivered as typed events to WebSocket
/// clients, with nothing lost.
#[derive(Debug, Parser)]
#[command(name = "pgcast", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the listener and the WebSocket gateway against a database.
    Serve(ServeArgs),
    /// Start a local PostgreSQL with demo data and serve it (the quickest way to try pgcast).
    Demo(DemoArgs),
    /// Apply pending migrations.
    Migrate(MigrateArgs),
    /// Check the realtime objects, the NOTIFY queue, the event log and listeners; exits
    /// non-zero when unhealthy.
    Doctor(DoctorArgs),
    /// Print typed events as JSON lines (the wire `event` frame), from a position or live.
    Tail(TailArgs),
    /// Mint a JWT for a user (prints only the token).
    Token(TokenArgs),
}

/// The database to use.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection string, URL (postgres://user:password@host:port/db) or key=value
    /// form. Required. TLS is not supported.
    #[arg(
        long = "database-url",
        env = "DATABASE_URL",
        hide_env_values = true,
        value_name = "URL",
        value_parser = DatabaseUrl::parse
    )]
    pub database_url: DatabaseUrl,
}

/// The JWT signing secret.
#[derive(Debug, Clone, Args)]
pub struct SecretArgs {
    /// HS256 secret that signs and verifies client tokens. Required.
    #[arg(
        long = "jwt-secret",
        env = "PGCAST_JWT_SECRET",
        hide_env_values = true,
        value_name = "SECRET",
        value_parser = Secret::parse
    )]
    pub jwt_secret: Secret,
}

/// `pgcast serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Database to serve.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Address for HTTP and WebSocket (`GET /ws`, `/healthz`, `/readyz`, `/metrics`).
    #[arg(
        long,
        env = "PGCAST_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,
    /// Token secret.
    #[command(flatten)]
    pub secret: SecretArgs,
    /// How long events stay in the log for clients resuming with `since` (e.g. 24h, 90m).
    #[arg(
        long,
        env = "PGCAST_RETENTION",
        default_value = "24h",
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    pub retention: Duration,
    /// Apply pending migrations (app tables and realtime objects) before serving.
    #[arg(long, env = "PGCAST_MIGRATE")]
    pub migrate: bool,
}

/// `pgcast demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Address for HTTP and WebSocket.
    #[arg(
        long,
        env = "PGCAST_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,
    /// How long events stay in the log (e.g. 24h, 90m).
    #[arg(
        long,
        env = "PGCAST_RETENTION",
        default_value = "24h",
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    pub retention: Duration,
    /// Keep writing realistic assignment changes at this many events per second.
    #[arg(long, env = "PGCAST_SIMULATE", value_name = "EVENTS_PER_SEC", value_parser = parse_rate)]
    pub simulate: Option<f64>,
    /// Where the demo's PostgreSQL keeps its data (reused on the next run). Default: chosen by
    /// the demo and printed at start.
    #[arg(long, env = "PGCAST_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// `pgcast migrate`.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Database to migrate.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Install only the realtime objects (schema pgcast) onto an application that owns its
    /// session_assignments table; skip the demo application tables.
    #[arg(long)]
    pub realtime_only: bool,
}

/// `pgcast doctor`.
#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// Database to check.
    #[command(flatten)]
    pub database: DatabaseArgs,
}

/// `pgcast tail`.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// Database to read.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Print every retained event after this position first, then continue live. Without it,
    /// start with the next event committed.
    #[arg(long, value_name = "POSITION", value_parser = clap::value_parser!(i64).range(0..))]
    pub since: Option<Position>,
    /// Only events visible on this topic: assignments (default), mechanic:<uuid>,
    /// session:<uuid> or workshop:<uuid>.
    #[arg(long, value_name = "TOPIC", value_parser = parse_tail_topic)]
    pub topic: Option<Topic>,
}

/// `pgcast token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Secret to sign with.
    #[command(flatten)]
    pub secret: SecretArgs,
    /// User id (`sub` claim).
    #[arg(long, value_name = "UUID")]
    pub sub: Uuid,
    /// Role: mechanic, customer or service.
    #[arg(long, value_name = "ROLE", value_parser = parse_role)]
    pub role: Role,
    /// Workshop of a mechanic (`workshop_id` claim).
    #[arg(long, value_name = "UUID")]
    pub workshop: Option<Uuid>,
    /// How long the token is valid (e.g. 1h, 30m, 7d).
    #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Duration,
}

impl fmt::Display for ServeArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "serve listen={} database={} jwt_secret={} retention={} migrate={}",
            self.listen,
            self.database.database_url,
            self.secret.jwt_secret,
            format_duration(self.retention),
            self.migrate
        )
    }
}

impl fmt::Display for DemoArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "demo listen={} retention={}",
            self.listen,
            format_duration(self.retention)
        )?;
        if let Some(rate) = self.simulate {
            write!(f, " simulate={rate}/s")?;
        }
        if let Some(dir) = &self.data_dir {
            write!(f, " data_dir={}", dir.display())?;
        }
        Ok(())
    }
}

impl fmt::Display for MigrateArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "migrate database={} realtime_only={}",
            self.database.database_url, self.realtime_only
        )
    }
}

impl fmt::Display for DoctorArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "doctor database={}", self.database.database_url)
    }
}

impl fmt::Display for TailArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tail database={}", self.database.database_url)?;
        match self.since {
            Some(p) => write!(f, " since={p}")?,
            None => f.write_str(" since=live")?,
        }
        write!(f, " topic={}", self.topic.unwrap_or(Topic::Assignments))
    }
}

impl fmt::Display for TokenArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "token sub={} role={} ttl={} jwt_secret={}",
            self.sub,
            self.role.as_str(),
            format_duration(self.ttl),
            self.secret.jwt_secret
        )?;
        if let Some(w) = self.workshop {
            write!(f, " workshop={w}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Serve(a) => a.fmt(f),
            Command::Demo(a) => a.fmt(f),
            Command::Migrate(a) => a.fmt(f),
            Command::Doctor(a) => a.fmt(f),
            Command::Tail(a) => a.fmt(f),
            Command::Token(a) => a.fmt(f),
        }
    }
}

/// Renders a clap error as one line (`error: … for '--retention <DURATION>': …`), without the
/// usage block and the "try --help" hint that clap appends.
pub fn one_line_error(err: &clap::Error) -> String {
    let text = err.to_string();
    let first_paragraph = text.split("\n\n").next().unwrap_or_default();
    first_paragraph
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn summaries_redact_secrets() {
        let cli = Cli::try_parse_from([
            "pgcast",
            "serve",
            "--database-url",
            "postgres://app:hunter2@db/shop",
            "--jwt-secret",
            "s3cret",
        ])
        .unwrap();
        let shown = cli.command.to_string();
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert!(shown.contains("listen=127.0.0.1:8080"), "{shown}");
        assert!(shown.contains("retention=1day"), "{shown}");
        assert!(!format!("{cli:?}").contains("hunter2"));
        assert!(!format!("{cli:?}").contains("s3cret"));
    }

    #[test]
    fn errors_fit_on_one_line() {
        let err = Cli::try_parse_from(["pgcast", "token", "--jwt-secret", "x", "--role", "admin"])
            .unwrap_err();
        let line = one_line_error(&err);
        assert!(!line.contains('\n'));
        assert!(line.starts_with("error:"), "{line}");
        // (No flag here has an environment variable, so the outcome does not depend on it.)
        let err =
            Cli::try_parse_from(["pgcast", "token", "--jwt-secret", "x", "--role", "service"])
                .unwrap_err();
        let line = one_line_error(&err);
        assert!(line.contains("--sub"), "{line}");
    }
}

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
    format_bytes, format_duration, parse_claim, parse_duration, parse_frame_bytes, parse_origin,
    parse_outbound_bytes, parse_rate, parse_role, parse_tail_topic, parse_timeout, parse_ttl,
    DatabaseUrl, Secret,
};
use crate::{Database, EdgeLimits, Limits};
use pgcast_gateway::GatewayConfig;

/// pgcast: PostgreSQL changes of session_assignments, delivered as typed events to WebSocket
/// clients, with nothing lost.
#[derive(Debug, Parser)]
#[command(name = "pgcast", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr: `text` (for people; coloured only when stderr is a terminal) or
    /// `json` (one object per line with timestamp, level, target, message, fields and spans,
    /// for log shippers).
    #[arg(
        long,
        global = true,
        env = "PGCAST_LOG_FORMAT",
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands. Parsed once per process, so `serve`'s many flags making one variant large
/// costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
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
    /// Accept only tokens whose `iss` claim is exactly this. Default: the issuer is not
    /// checked.
    #[arg(
        long = "jwt-issuer",
        env = "PGCAST_JWT_ISSUER",
        value_name = "ISSUER",
        value_parser = parse_claim
    )]
    pub jwt_issuer: Option<String>,
    /// Accept only tokens whose `aud` claim is (or lists) this. Default: no audience, and a
    /// token that names one is refused (it was minted for another service).
    #[arg(
        long = "jwt-audience",
        env = "PGCAST_JWT_AUDIENCE",
        value_name = "AUDIENCE",
        value_parser = parse_claim
    )]
    pub jwt_audience: Option<String>,
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
    /// Limits against slow and flooding clients.
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Edge limits of `serve` (see [`Limits`]); the defaults here are [`Limits::default`].
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Time a client has to send a complete HTTP request head (a `GET /ws` upgrade included);
    /// also the longest an idle keep-alive connection stays open. At most 1h.
    #[arg(
        long = "header-timeout",
        env = "PGCAST_HEADER_TIMEOUT",
        default_value = "10s",
        value_name = "DURATION",
        value_parser = parse_timeout
    )]
    pub header_timeout: Duration,
    /// Open TCP connections per client address (IPv6: per /64), WebSockets included; more are
    /// closed at accept. 0 = no limit (behind a proxy every client has the proxy's address).
    #[arg(
        long = "max-connections-per-ip",
        env = "PGCAST_MAX_CONNECTIONS_PER_IP",
        default_value = "1000",
        value_name = "N"
    )]
    pub max_connections_per_ip: u32,
    /// New connections per second per client address, on average; faster ones are closed at
    /// accept. 0 = no limit.
    #[arg(
        long = "connection-rate-per-ip",
        env = "PGCAST_CONNECTION_RATE_PER_IP",
        default_value = "20",
        value_name = "PER_SECOND"
    )]
    pub connection_rate_per_ip: u32,
    /// New connections a client address may open at once before the rate applies (at least 1).
    #[arg(
        long = "connection-burst-per-ip",
        env = "PGCAST_CONNECTION_BURST_PER_IP",
        default_value = "100",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub connection_burst_per_ip: u32,
    /// WebSockets upgraded but not yet authenticated, per process; further upgrades get 503.
    #[arg(
        long = "max-unauthenticated",
        env = "PGCAST_MAX_UNAUTHENTICATED",
        default_value = "5000",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_unauthenticated: u32,
    /// WebSockets upgraded but not yet authenticated, per client address; further upgrades get
    /// 503. Must be below --max-unauthenticated, so that no address can take every slot.
    #[arg(
        long = "max-unauthenticated-per-ip",
        env = "PGCAST_MAX_UNAUTHENTICATED_PER_IP",
        default_value = "250",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_unauthenticated_per_ip: u32,
    /// Largest client frame (e.g. 65536, 64KiB, 1MiB; 16KiB to 16MiB); larger ones close the
    /// connection with 1009.
    #[arg(
        long = "max-frame-bytes",
        env = "PGCAST_MAX_FRAME_BYTES",
        default_value = "64KiB",
        value_name = "BYTES",
        value_parser = parse_frame_bytes
    )]
    pub max_frame_bytes: usize,
    /// Time one client frame has to arrive in full once it started; a trickled frame closes
    /// the connection. At most 1h.
    #[arg(
        long = "frame-timeout",
        env = "PGCAST_FRAME_TIMEOUT",
        default_value = "10s",
        value_name = "DURATION",
        value_parser = parse_timeout
    )]
    pub frame_timeout: Duration,
    /// Bytes of event frames queued for one WebSocket before it is closed with 4008 (slow
    /// consumer; the client resumes with `since`), e.g. 16MiB; 64KiB to 1GiB. Bounds the
    /// memory one reader can hold; a steady reader on a slow link takes bursts below it.
    #[arg(
        long = "outbound-bytes",
        env = "PGCAST_OUTBOUND_BYTES",
        default_value = "16MiB",
        value_name = "BYTES",
        value_parser = parse_outbound_bytes
    )]
    pub outbound_bytes: usize,
    /// Newest events kept in memory so that clients resuming with `since` (after a restart or
    /// a network blip) need no database read; 0 to 1,000,000. Older positions are read from
    /// the log (`queue` takes a snapshot instead).
    #[arg(
        long = "replay-window",
        env = "PGCAST_REPLAY_WINDOW",
        default_value = "10000",
        value_name = "EVENTS",
        value_parser = clap::value_parser!(u32).range(0..=1_000_000)
    )]
    pub replay_window: u32,
    /// Database reads of the gateway (snapshots, replays older than the window, access
    /// checks) running at once, and its pool's size; more subscribes wait their turn, first
    /// come first served. 1 to 256.
    #[arg(
        long = "max-concurrent-reads",
        env = "PGCAST_MAX_CONCURRENT_READS",
        default_value = "8",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=256)
    )]
    pub max_concurrent_reads: u32,
    /// Browser origins allowed to open a WebSocket, comma-separated (e.g.
    /// `https://app.example,https://admin.example`); others get 403. Empty: any origin (a
    /// token is still required). Clients that send no `Origin` (not browsers) are let through.
    #[arg(
        long = "allowed-origins",
        env = "PGCAST_ALLOWED_ORIGINS",
        value_name = "ORIGINS",
        value_delimiter = ',',
        value_parser = parse_origin
    )]
    pub allowed_origins: Vec<String>,
    /// Open WebSocket connections per process; further upgrades get 503. 1 to 1,000,000.
    #[arg(
        long = "max-connections",
        env = "PGCAST_MAX_CONNECTIONS",
        default_value = "20000",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    pub max_connections: u32,
    /// Subscriptions per connection; more are refused with `too_many_subscriptions`. 1 to 1024.
    #[arg(
        long = "max-subscriptions",
        env = "PGCAST_MAX_SUBSCRIPTIONS",
        default_value = "32",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=1024)
    )]
    pub max_subscriptions: u32,
    /// Client frames per second per connection on average (bursts of twice that); more are
    /// answered with `rate_limited` and ignored. 1 to 10,000.
    #[arg(
        long = "client-frames-per-second",
        env = "PGCAST_CLIENT_FRAMES_PER_SECOND",
        default_value = "50",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    pub client_frames_per_second: u32,
    /// Time a new WebSocket has to send its `auth` frame. At most 1h.
    #[arg(
        long = "auth-timeout",
        env = "PGCAST_AUTH_TIMEOUT",
        default_value = "10s",
        value_name = "DURATION",
        value_parser = parse_timeout
    )]
    pub auth_timeout: Duration,
    /// The server pings every interval; a peer silent for two intervals is closed. Keep it
    /// below half the idle timeout of any proxy in front. At most 1h.
    #[arg(
        long = "heartbeat-interval",
        env = "PGCAST_HEARTBEAT_INTERVAL",
        default_value = "20s",
        value_name = "DURATION",
        value_parser = parse_timeout
    )]
    pub heartbeat_interval: Duration,
    /// Most rows one snapshot may hold; a larger one fails with `unavailable`. 1 to 1,000,000.
    #[arg(
        long = "snapshot-limit",
        env = "PGCAST_SNAPSHOT_LIMIT",
        default_value = "10000",
        value_name = "ROWS",
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    pub snapshot_limit: u32,
}

impl LimitArgs {
    /// The limits, or why they do not go together (one line).
    pub fn limits(&self) -> Result<Limits, String> {
        if self.max_unauthenticated_per_ip >= self.max_unauthenticated {
            return Err(format!(
                "--max-unauthenticated-per-ip ({}) must be below --max-unauthenticated ({}), \
                 so that one address cannot take every unauthenticated slot",
                self.max_unauthenticated_per_ip, self.max_unauthenticated
            ));
        }
        if self.max_unauthenticated > self.max_connections {
            return Err(format!(
                "--max-unauthenticated ({}) must not exceed --max-connections ({})",
                self.max_unauthenticated, self.max_connections
            ));
        }
        let mut gateway = GatewayConfig::new(Vec::new());
        gateway.max_unauthenticated = self.max_unauthenticated as usize;
        gateway.max_unauthenticated_per_ip = self.max_unauthenticated_per_ip as usize;
        gateway.max_frame_bytes = self.max_frame_bytes;
        gateway.frame_timeout = self.frame_timeout;
        gateway.outbound_bytes = self.outbound_bytes;
        gateway.replay_window = self.replay_window as usize;
        gateway.max_concurrent_reads = self.max_concurrent_reads as usize;
        gateway.allowed_origins = self.allowed_origins.clone();
        gateway.max_connections = self.max_connections as usize;
        gateway.max_subscriptions = self.max_subscriptions as usize;
        gateway.client_frames_per_second = self.client_frames_per_second;
        gateway.auth_timeout = self.auth_timeout;
        gateway.heartbeat_interval = self.heartbeat_interval;
        gateway.snapshot_limit = self.snapshot_limit as usize;
        Ok(Limits {
            edge: EdgeLimits {
                header_timeout: self.header_timeout,
                max_connections_per_ip: self.max_connections_per_ip,
                connection_rate_per_ip: self.connection_rate_per_ip,
                connection_burst_per_ip: self.connection_burst_per_ip,
            },
            gateway,
        })
    }
}

impl fmt::Display for LimitArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_off = |n: u32| {
            if n == 0 {
                "off".to_owned()
            } else {
                n.to_string()
            }
        };
        write!(
            f,
            "header_timeout={} max_connections_per_ip={} connection_rate_per_ip={} \
             connection_burst_per_ip={} max_unauthenticated={} max_unauthenticated_per_ip={} \
             max_frame_bytes={} frame_timeout={} outbound_bytes={} replay_window={} \
             max_concurrent_reads={} allowed_origins={} max_connections={} max_subscriptions={} \
             client_frames_per_second={} auth_timeout={} heartbeat_interval={} snapshot_limit={}",
            format_duration(self.header_timeout),
            or_off(self.max_connections_per_ip),
            or_off(self.connection_rate_per_ip),
            self.connection_burst_per_ip,
            self.max_unauthenticated,
            self.max_unauthenticated_per_ip,
            format_bytes(self.max_frame_bytes),
            format_duration(self.frame_timeout),
            format_bytes(self.outbound_bytes),
            self.replay_window,
            self.max_concurrent_reads,
            if self.allowed_origins.is_empty() {
                "any".to_owned()
            } else {
                self.allowed_origins.join(",")
            },
            self.max_connections,
            self.max_subscriptions,
            self.client_frames_per_second,
            format_duration(self.auth_timeout),
            format_duration(self.heartbeat_interval),
            self.snapshot_limit,
        )
    }
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
    /// session:<uuid>, workshop:<uuid> or customer:<uuid>.
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
    /// How long the token is valid (e.g. 1h, 30m, 7d); at most 30d, since a token cannot be
    /// revoked before it expires.
    #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Issuer to stamp in the `iss` claim (what `serve --jwt-issuer` expects). Default: none.
    #[arg(
        long = "jwt-issuer",
        env = "PGCAST_JWT_ISSUER",
        value_name = "ISSUER",
        value_parser = parse_claim
    )]
    pub jwt_issuer: Option<String>,
    /// Audience to stamp in the `aud` claim (what `serve --jwt-audience` expects). Default:
    /// none.
    #[arg(
        long = "jwt-audience",
        env = "PGCAST_JWT_AUDIENCE",
        value_name = "AUDIENCE",
        value_parser = parse_claim
    )]
    pub jwt_audience: Option<String>,
}

/// ` jwt_issuer=… jwt_audience=…` for the summaries, each only when set.
fn write_claims(
    f: &mut fmt::Formatter<'_>,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> fmt::Result {
    if let Some(issuer) = issuer {
        write!(f, " jwt_issuer={issuer}")?;
    }
    if let Some(audience) = audience {
        write!(f, " jwt_audience={audience}")?;
    }
    Ok(())
}

impl fmt::Display for ServeArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "serve listen={} database={} jwt_secret={}",
            self.listen, self.database, self.secret.jwt_secret,
        )?;
        write_claims(f, self.jwt_issuer.as_deref(), self.jwt_audience.as_deref())?;
        write!(
            f,
            " retention={} migrate={} {}",
            format_duration(self.retention),
            self.migrate,
            self.limits
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
            self.database, self.realtime_only
        )
    }
}

impl fmt::Display for DoctorArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "doctor database={}", self.database)
    }
}

impl fmt::Display for TailArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tail database={}", self.database)?;
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
        write_claims(f, self.jwt_issuer.as_deref(), self.jwt_audience.as_deref())
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

/// Flags whose values must never be printed, not even when they are refused: a secret that is
/// too short, or a connection string with a password and a typo, is still someone's secret.
const HIDDEN_VALUES: [&str; 3] = ["--jwt-secret", "--database-url", "--listen-database-url"];

/// Renders a clap error as one line (`error: … for '--retention <DURATION>': …`), without the
/// usage block and the "try --help" hint that clap appends. A refused value of
/// `--jwt-secret` or `--database-url` shows as `<redacted>`.
pub fn one_line_error(err: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let mut text = err.to_string();
    if let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        err.get(ContextKind::InvalidArg),
        err.get(ContextKind::InvalidValue),
    ) {
        if HIDDEN_VALUES
            .iter()
            .any(|flag| arg.split_whitespace().next() == Some(flag))
        {
            text = text.replace(&format!("'{value}'"), "'<redacted>'");
        }
    }
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

    const SECRET: &str = "s3cret-of-at-least-thirty-two-bytes";
    const SUB: &str = "6a0c5a7e-4b53-4d7e-9a57-0e3d1c0b6f10";

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
            SECRET,
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
    fn limit_flags_default_to_the_limits_defaults_and_show_in_the_summary() {
        let parse = |extra: &[&str]| {
            let mut args = vec![
                "pgcast",
                "serve",
                "--database-url",
                "postgres://app@db/shop",
                "--jwt-secret",
                SECRET,
            ];
            args.extend(extra);
            match Cli::try_parse_from(args).unwrap().command {
                Command::Serve(serve) => serve,
                _ => unreachable!(),
            }
        };
        let serve = parse(&[]);
        // The flags' defaults are the library's defaults.
        assert_eq!(
            format!("{:?}", serve.limits.limits()),
            format!("{:?}", Ok::<_, String>(Limits::default()))
        );
        let shown = serve.to_string();
        assert!(
            shown.contains(
                "header_timeout=10s max_connections_per_ip=1000 connection_rate_per_ip=20 \
                 connection_burst_per_ip=100 max_unauthenticated=5000 \
                 max_unauthenticated_per_ip=250 max_frame_bytes=64KiB frame_timeout=10s"
            ),
            "{shown}"
        );
        let serve = parse(&["--max-connections-per-ip", "0", "--max-frame-bytes", "1MiB"]);
        let shown = serve.to_string();
        assert!(shown.contains("max_connections_per_ip=off"), "{shown}");
        assert!(shown.contains("max_frame_bytes=1MiB"), "{shown}");
        let serve = parse(&[
            "--max-unauthenticated",
            "10",
            "--max-unauthenticated-per-ip",
            "10",
        ]);
        let err = serve.limits.limits().unwrap_err();
        assert!(err.contains("--max-unauthenticated-per-ip (10)"), "{err}");
        for (flag, bad) in [
            ("--header-timeout", "0s"),
            ("--header-timeout", "2h"),
            ("--frame-timeout", "soon"),
            ("--max-frame-bytes", "1KiB"),
            ("--connection-burst-per-ip", "0"),
            ("--max-unauthenticated", "0"),
            ("--max-connections-per-ip", "1.5"),
            ("--connection-rate-per-ip", "fast"),
        ] {
            let err = Cli::try_parse_from([
                "pgcast",
                "serve",
                "--database-url",
                "postgres://app@db/shop",
                "--jwt-secret",
                SECRET,
                flag,
                bad,
            ])
            .unwrap_err();
            assert_eq!(err.exit_code(), 2, "{flag} {bad}");
            assert!(one_line_error(&err).contains(flag), "{flag} {bad}");
        }
    }

    #[test]
    fn summaries_show_issuer_and_audience() {
        for command in ["serve", "token"] {
            let mut args = vec!["pgcast", command, "--jwt-secret", SECRET];
            if command == "serve" {
                args.extend(["--database-url", "postgres://app@db/shop"]);
            } else {
                args.extend(["--sub", SUB, "--role", "service"]);
            }
            args.extend([
                "--jwt-issuer",
                "https://id.example",
                "--jwt-audience",
                "pgcast",
            ]);
            let shown = Cli::try_parse_from(args).unwrap().command.to_string();
            assert!(
                shown.contains(" jwt_issuer=https://id.example jwt_audience=pgcast"),
                "{shown}"
            );
        }
    }

    #[test]
    fn refused_secrets_are_not_echoed() {
        let short = "sixteen-byte-key";
        let err = Cli::try_parse_from(["pgcast", "token", "--jwt-secret", short, "--sub", SUB])
            .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert_eq!(err.exit_code(), 2);
        let line = one_line_error(&err);
        assert!(!line.contains(short), "{line}");
        assert!(
            line.starts_with("error: invalid value '<redacted>' for '--jwt-secret <SECRET>'"),
            "{line}"
        );
        assert!(line.contains("at least 32"), "{line}");
        let err = Cli::try_parse_from([
            "pgcast",
            "doctor",
            "--database-url",
            "postgres://app:hunter2@:5432/shop",
        ])
        .unwrap_err();
        let line = one_line_error(&err);
        assert!(!line.contains("hunter2"), "{line}");
        assert!(line.contains("--database-url"), "{line}");
        // Other values are still shown: they help and are not secret.
        let err = Cli::try_parse_from([
            "pgcast",
            "token",
            "--jwt-secret",
            SECRET,
            "--sub",
            SUB,
            "--role",
            "service",
            "--ttl",
            "100y",
        ])
        .unwrap_err();
        let line = one_line_error(&err);
        assert!(line.contains("'100y'") && line.contains("--ttl"), "{line}");
    }

    #[test]
    fn errors_fit_on_one_line() {
        let err =
            Cli::try_parse_from(["pgcast", "token", "--jwt-secret", SECRET, "--role", "admin"])
                .unwrap_err();
        let line = one_line_error(&err);
        assert!(!line.contains('\n'));
        assert!(line.starts_with("error:"), "{line}");
        // (No flag here has an environment variable, so the outcome does not depend on it.)
        let err = Cli::try_parse_from([
            "pgcast",
            "token",
            "--jwt-secret",
            SECRET,
            "--role",
            "service",
        ])
        .unwrap_err();
        let line = one_line_error(&err);
        assert!(line.contains("--sub"), "{line}");
    }
}

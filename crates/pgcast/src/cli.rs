//! The command line (`README.md#commands`, `README.md#configuration`): one typed struct per
//! subcommand, each flag also readable from its environment variable where the README names
//! one. Parsing validates every value, so a bad one is reported before anything connects or
//! binds.
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
use crate::{Database, EdgeLimits, Limits, TlsArgs};
use pgcast_gateway::GatewayConfig;
use pgcast_gateway::{
    parse_jwks_url, public_key_algorithm, Algorithm, ClaimMapping, ClaimPointer, Jwks,
    JwksSettings, PublicKey, RoleMap,
};

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
    /// TLS on --listen (https://, wss://): both files or neither.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Where the keys that verify client tokens come from.
    #[command(flatten)]
    pub keys: KeyArgs,
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
    /// How an identity provider's tokens are read.
    #[command(flatten)]
    pub identity: IdentityArgs,
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

/// Where `serve` gets the keys that verify client tokens: exactly one of a secret, a public key
/// file or a JWKS URL.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct KeyArgs {
    /// HS256 secret that verifies client tokens (and signs them, for `pgcast token`), at least
    /// 32 bytes (e.g. the output of `openssl rand -hex 32`). Exactly one of --jwt-secret,
    /// --jwt-public-key and --jwt-jwks-url is required.
    #[arg(
        long = "jwt-secret",
        env = "PGCAST_JWT_SECRET",
        hide_env_values = true,
        value_name = "SECRET",
        value_parser = Secret::parse
    )]
    pub jwt_secret: Option<Secret>,
    /// PEM file with the identity provider's public key (RSA, EC P-256 or P-384, Ed25519),
    /// instead of a secret. Tokens must be signed with the key's algorithm: RS256, ES256, ES384
    /// or EdDSA by its type, or --jwt-algorithm.
    #[arg(
        long = "jwt-public-key",
        env = "PGCAST_JWT_PUBLIC_KEY",
        value_name = "FILE",
        value_parser = PublicKeyFile::parse
    )]
    pub jwt_public_key: Option<PublicKeyFile>,
    /// The identity provider's JWKS URL (http or https, e.g.
    /// https://id.example/.well-known/jwks.json), instead of a secret. Its keys are read at
    /// start, cached, and read again for a token with an unknown `kid`; each verifies only its
    /// own algorithm (`alg`, or RS256, ES256, ES384 or EdDSA by its type).
    #[arg(
        long = "jwt-jwks-url",
        env = "PGCAST_JWT_JWKS_URL",
        value_name = "URL",
        value_parser = parse_jwks_url_text
    )]
    pub jwt_jwks_url: Option<String>,
}

impl KeyArgs {
    /// The HS256 secret's bytes; empty when a public key or a JWKS URL verifies tokens.
    pub fn secret_bytes(&self) -> Vec<u8> {
        self.jwt_secret
            .as_ref()
            .map(|s| s.expose().to_vec())
            .unwrap_or_default()
    }
}

/// `jwt_secret=<redacted>`, `jwt_public_key=<file>` or `jwt_jwks_url=<url>`.
impl fmt::Display for KeyArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.jwt_secret, &self.jwt_public_key, &self.jwt_jwks_url) {
            (Some(secret), _, _) => write!(f, "jwt_secret={secret}"),
            (_, Some(file), _) => write!(f, "jwt_public_key={}", file.path.display()),
            (_, _, Some(url)) => write!(f, "jwt_jwks_url={url}"),
            _ => f.write_str("jwt_key=none"),
        }
    }
}

/// Largest `--jwt-public-key` file read: a 4096-bit RSA public key in PEM is under 1 KiB.
const MAX_PUBLIC_KEY_FILE: u64 = 64 << 10;

/// A `--jwt-public-key` file, read and checked when the command line is parsed.
#[derive(Debug, Clone)]
pub struct PublicKeyFile {
    /// The file as given.
    pub path: PathBuf,
    /// Its key.
    pub key: PublicKey,
}

impl PublicKeyFile {
    /// Reads `path` (at most 64 KiB) as one PEM public key.
    pub fn parse(path: &str) -> Result<PublicKeyFile, String> {
        use std::io::Read;
        let mut pem = Vec::new();
        std::fs::File::open(path)
            .and_then(|file| file.take(MAX_PUBLIC_KEY_FILE + 1).read_to_end(&mut pem))
            .map_err(|e| format!("cannot read the file ({e})"))?;
        if pem.len() as u64 > MAX_PUBLIC_KEY_FILE {
            return Err("larger than 64 KiB: not a PEM public key".to_owned());
        }
        let key = PublicKey::from_pem(&pem).map_err(|e| e.to_string())?;
        Ok(PublicKeyFile {
            path: PathBuf::from(path),
            key,
        })
    }
}

fn parse_jwks_url_text(text: &str) -> Result<String, String> {
    parse_jwks_url(text).map(|url| url.to_string())
}

/// Longest `--jwt-jwks-max-age`.
const MAX_JWKS_MAX_AGE: Duration = Duration::from_secs(7 * 86_400);

fn parse_jwks_max_age(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d > MAX_JWKS_MAX_AGE {
        return Err("must be at most 7d".to_owned());
    }
    Ok(d)
}

/// How `serve` reads an identity provider's tokens: the algorithm of its keys, how its JWKS is
/// cached, and where the user, role and workshop are in its claims.
#[derive(Debug, Clone, Args)]
pub struct IdentityArgs {
    /// The one algorithm tokens are signed with: RS256, RS384, RS512, PS256, PS384, PS512, ES256,
    /// ES384 or EdDSA. With --jwt-public-key it must fit the key (default: RS256, ES256, ES384
    /// or EdDSA by the key's type); with --jwt-jwks-url only keys of this algorithm are used
    /// (default: each key's own).
    #[arg(
        long = "jwt-algorithm",
        env = "PGCAST_JWT_ALGORITHM",
        value_name = "ALGORITHM",
        value_parser = public_key_algorithm
    )]
    pub jwt_algorithm: Option<Algorithm>,
    /// With --jwt-jwks-url: the cached keys are read again in the background once they are this
    /// old, so keys the provider removed stop being accepted. At most 7d.
    #[arg(
        long = "jwt-jwks-max-age",
        env = "PGCAST_JWT_JWKS_MAX_AGE",
        default_value = "10m",
        value_name = "DURATION",
        value_parser = parse_jwks_max_age
    )]
    pub jwt_jwks_max_age: Duration,
    /// With --jwt-jwks-url: shortest time between two reads of the keys. A token whose `kid`
    /// is not cached causes a read only when the last one is older (one read at a time,
    /// however many connections ask); otherwise it is refused. At most 1h.
    #[arg(
        long = "jwt-jwks-min-refresh",
        env = "PGCAST_JWT_JWKS_MIN_REFRESH",
        default_value = "30s",
        value_name = "DURATION",
        value_parser = parse_timeout
    )]
    pub jwt_jwks_min_refresh: Duration,
    /// JSON pointer to the user's id (a uuid) in the token's claims, e.g. `/sub` or
    /// `/https:~1~1app.example~1user_id` (a `/` in a claim name is written `~1`).
    #[arg(
        long = "claim-sub",
        env = "PGCAST_CLAIM_SUB",
        default_value = "/sub",
        value_name = "POINTER",
        value_parser = ClaimPointer::parse
    )]
    pub claim_sub: ClaimPointer,
    /// JSON pointer to the role: a string, or an array of strings of which exactly one names a
    /// pgcast role (e.g. Keycloak's `/realm_access/roles`).
    #[arg(
        long = "claim-role",
        env = "PGCAST_CLAIM_ROLE",
        default_value = "/role",
        value_name = "POINTER",
        value_parser = ClaimPointer::parse
    )]
    pub claim_role: ClaimPointer,
    /// JSON pointer to a mechanic's workshop id (a uuid; absent or null: none).
    #[arg(
        long = "claim-workshop",
        env = "PGCAST_CLAIM_WORKSHOP",
        default_value = "/workshop_id",
        value_name = "POINTER",
        value_parser = ClaimPointer::parse
    )]
    pub claim_workshop: ClaimPointer,
    /// The provider's role values and the pgcast role each stands for, comma-separated (e.g.
    /// `garage-mechanic=mechanic,backend=service`); only mapped values count. Default: the role
    /// claim holds mechanic, customer or service.
    #[arg(
        long = "role-map",
        env = "PGCAST_ROLE_MAP",
        value_name = "VALUE=ROLE,...",
        value_parser = RoleMap::parse
    )]
    pub role_map: Option<RoleMap>,
}

impl IdentityArgs {
    /// Sets the gateway's key source (other than the secret, which `serve` sets) and claim
    /// mapping, or says why the flags do not go together (one line).
    fn configure(&self, keys: &KeyArgs, gateway: &mut GatewayConfig) -> Result<(), String> {
        if let Some(file) = &keys.jwt_public_key {
            let key = match self.jwt_algorithm {
                Some(algorithm) => file.key.clone().with_algorithm(algorithm).map_err(|e| {
                    format!(
                        "--jwt-algorithm {algorithm:?} does not fit --jwt-public-key {}: {e}",
                        file.path.display()
                    )
                })?,
                None => file.key.clone(),
            };
            gateway.jwt_public_key = Some(key);
        } else if let Some(url) = &keys.jwt_jwks_url {
            let settings = JwksSettings {
                min_refresh: self.jwt_jwks_min_refresh,
                max_age: self.jwt_jwks_max_age,
                algorithm: self.jwt_algorithm,
                ..JwksSettings::default()
            };
            let jwks = Jwks::new(url, settings).map_err(|e| format!("--jwt-jwks-url: {e}"))?;
            gateway.jwt_jwks = Some(jwks);
        } else if self.jwt_algorithm.is_some() {
            return Err(
                "--jwt-algorithm applies to --jwt-public-key and --jwt-jwks-url; --jwt-secret \
                 verifies HS256 only"
                    .to_owned(),
            );
        }
        gateway.jwt_claims = ClaimMapping {
            sub: self.claim_sub.clone(),
            role: self.claim_role.clone(),
            workshop: self.claim_workshop.clone(),
            roles: self.role_map.clone().unwrap_or_default(),
        };
        Ok(())
    }

    /// ` jwt_algorithm=… [jwt_jwks_max_age=… jwt_jwks_min_refresh=…] claim_sub=… claim_role=…
    /// claim_workshop=… role_map=…` for the summary, when an identity provider's key or a claim
    /// mapping is configured (a plain secret with pgcast's own claims adds nothing).
    fn write_summary(&self, f: &mut fmt::Formatter<'_>, keys: &KeyArgs) -> fmt::Result {
        let defaults = ClaimMapping::default();
        let provider = keys.jwt_public_key.is_some() || keys.jwt_jwks_url.is_some();
        let mapped = self.claim_sub != defaults.sub
            || self.claim_role != defaults.role
            || self.claim_workshop != defaults.workshop
            || self.role_map.is_some();
        if !provider && !mapped {
            return Ok(());
        }
        let algorithm = match (&keys.jwt_public_key, &self.jwt_algorithm) {
            (_, Some(algorithm)) => format!("{algorithm:?}"),
            (Some(file), None) => format!("{:?}", file.key.algorithm()),
            (None, None) if keys.jwt_jwks_url.is_some() => "per-key".to_owned(),
            (None, None) => "HS256".to_owned(),
        };
        write!(f, " jwt_algorithm={algorithm}")?;
        if keys.jwt_jwks_url.is_some() {
            write!(
                f,
                " jwt_jwks_max_age={} jwt_jwks_min_refresh={}",
                format_duration(self.jwt_jwks_max_age),
                format_duration(self.jwt_jwks_min_refresh)
            )?;
        }
        write!(
            f,
            " claim_sub={} claim_role={} claim_workshop={} role_map={}",
            self.claim_sub,
            self.claim_role,
            self.claim_workshop,
            self.role_map.clone().unwrap_or_default()
        )
    }
}

impl ServeArgs {
    /// The gateway's limits and token settings (the secret aside), or why the flags do not go
    /// together (one line, exit status 2).
    pub fn gateway_limits(&self) -> Result<Limits, String> {
        let mut limits = self.limits.limits()?;
        self.identity.configure(&self.keys, &mut limits.gateway)?;
        Ok(limits)
    }
}

/// Edge limits of `serve` (see [`Limits`]); the defaults here are [`Limits::default`].
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Time a client has to send a complete HTTP request head (a `GET /ws` upgrade included);
    /// also the longest an idle keep-alive connection stays open, and (with --tls-cert) the
    /// time it has to finish the TLS handshake before that. At most 1h.
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
            "serve listen={}{} database={} {}",
            self.listen, self.tls, self.database, self.keys,
        )?;
        write_claims(f, self.jwt_issuer.as_deref(), self.jwt_audience.as_deref())?;
        self.identity.write_summary(f, &self.keys)?;
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

    /// An Ed25519 public key (RFC 8410 §10.1).
    const ED25519_PEM: &str = "-----BEGIN PUBLIC KEY-----\n\
        MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n\
        -----END PUBLIC KEY-----\n";

    fn serve_with(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut args = vec![
            "pgcast",
            "serve",
            "--database-url",
            "postgres://app@db/shop",
        ];
        args.extend(extra);
        Cli::try_parse_from(args).map(|cli| match cli.command {
            Command::Serve(serve) => serve,
            _ => unreachable!(),
        })
    }

    #[test]
    fn exactly_one_key_source_is_required() {
        let err = serve_with(&[]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let line = one_line_error(&err);
        for flag in ["--jwt-secret", "--jwt-public-key", "--jwt-jwks-url"] {
            assert!(line.contains(flag), "{line}");
        }
        let err = serve_with(&[
            "--jwt-secret",
            SECRET,
            "--jwt-jwks-url",
            "https://id.example/jwks.json",
        ])
        .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let line = one_line_error(&err);
        assert!(line.contains("cannot be used with"), "{line}");
        assert!(!line.contains(SECRET), "{line}");
    }

    #[test]
    fn identity_flags_reach_the_gateway_and_the_summary() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("idp.pem");
        std::fs::write(&pem, ED25519_PEM).unwrap();
        let serve = serve_with(&[
            "--jwt-public-key",
            pem.to_str().unwrap(),
            "--claim-role",
            "/realm_access/roles",
            "--claim-workshop",
            "/https:~1~1garage.example~1workshop",
            "--role-map",
            "garage-mechanic=mechanic,backend=service",
        ])
        .unwrap();
        let gateway = serve.gateway_limits().unwrap().gateway;
        let key = gateway.jwt_public_key.as_ref().unwrap();
        assert_eq!(key.algorithm(), Algorithm::EdDSA);
        assert!(gateway.jwt_jwks.is_none() && gateway.jwt_secret.is_empty());
        assert_eq!(gateway.jwt_claims.role.as_str(), "/realm_access/roles");
        assert_eq!(
            gateway.jwt_claims.roles,
            RoleMap::parse("garage-mechanic=mechanic,backend=service").unwrap()
        );
        pgcast_gateway::TokenVerifier::from_config(&gateway).unwrap();
        let shown = serve.to_string();
        assert!(
            shown.contains(&format!(
                "jwt_public_key={} jwt_algorithm=EdDSA claim_sub=/sub \
                 claim_role=/realm_access/roles \
                 claim_workshop=/https:~1~1garage.example~1workshop \
                 role_map=garage-mechanic=mechanic,backend=service",
                pem.display()
            )),
            "{shown}"
        );

        let serve = serve_with(&[
            "--jwt-jwks-url",
            "https://id.example/.well-known/jwks.json",
            "--jwt-jwks-min-refresh",
            "5s",
            "--jwt-algorithm",
            "ES256",
            "--jwt-issuer",
            "https://id.example/",
        ])
        .unwrap();
        let gateway = serve.gateway_limits().unwrap().gateway;
        let jwks = gateway.jwt_jwks.as_ref().unwrap();
        assert_eq!(jwks.url(), "https://id.example/.well-known/jwks.json");
        assert_eq!(jwks.settings().min_refresh, Duration::from_secs(5));
        assert_eq!(jwks.settings().max_age, Duration::from_secs(600));
        assert_eq!(jwks.settings().algorithm, Some(Algorithm::ES256));
        let shown = serve.to_string();
        assert!(
            shown.contains(
                "jwt_jwks_url=https://id.example/.well-known/jwks.json \
                 jwt_issuer=https://id.example/ jwt_algorithm=ES256 jwt_jwks_max_age=10m \
                 jwt_jwks_min_refresh=5s claim_sub=/sub claim_role=/role \
                 claim_workshop=/workshop_id role_map=none"
            ),
            "{shown}"
        );

        // A secret with pgcast's own claims: nothing more to say.
        let shown = serve_with(&["--jwt-secret", SECRET]).unwrap().to_string();
        assert!(
            shown.contains("jwt_secret=<redacted> retention="),
            "{shown}"
        );
        let shown = serve_with(&["--jwt-secret", SECRET, "--claim-sub", "/uid"])
            .unwrap()
            .to_string();
        assert!(
            shown.contains(
                "jwt_secret=<redacted> jwt_algorithm=HS256 claim_sub=/uid claim_role=/role \
                 claim_workshop=/workshop_id role_map=none retention="
            ),
            "{shown}"
        );
    }

    #[test]
    fn bad_identity_values_exit_2_with_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private.pem");
        std::fs::write(
            &private,
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
             -----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let huge = dir.path().join("huge.pem");
        std::fs::write(&huge, vec![b'A'; 100 << 10]).unwrap();
        for (flag, bad, why) in [
            ("--jwt-public-key", "/nonexistent/idp.pem", "cannot read"),
            ("--jwt-public-key", private.to_str().unwrap(), "private key"),
            ("--jwt-public-key", huge.to_str().unwrap(), "64 KiB"),
            ("--jwt-jwks-url", "ftp://id.example/jwks", "http"),
            ("--jwt-jwks-url", "jwks.json", "URL"),
            (
                "--jwt-jwks-url",
                "https://u:p@id.example/jwks",
                "credentials",
            ),
            ("--jwt-algorithm", "HS256", "HMAC"),
            ("--jwt-algorithm", "none", "RS256"),
            ("--jwt-jwks-min-refresh", "2h", "1h"),
            ("--jwt-jwks-max-age", "0s", "zero"),
            ("--jwt-jwks-max-age", "30d", "7d"),
            ("--claim-sub", "sub", "JSON pointer"),
            ("--claim-role", "/a~2", "~0"),
            ("--claim-workshop", "", "JSON pointer"),
            ("--role-map", "admin=root", "not a pgcast role"),
            ("--role-map", "a=service,a=mechanic", "twice"),
        ] {
            let mut args = vec![flag, bad];
            // A key source, unless the flag is one.
            if !matches!(flag, "--jwt-public-key" | "--jwt-jwks-url") {
                args.extend(["--jwt-secret", SECRET]);
            }
            let err = serve_with(&args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{flag} {bad}");
            let line = one_line_error(&err);
            assert!(
                line.contains(flag) && line.contains(why),
                "{flag} {bad}: {line}"
            );
            assert!(!line.contains('\n'));
        }
        // Flags that parse but do not go together: refused before anything starts.
        let serve = serve_with(&["--jwt-secret", SECRET, "--jwt-algorithm", "RS256"]).unwrap();
        let err = serve.gateway_limits().unwrap_err();
        assert!(err.contains("--jwt-algorithm"), "{err}");
        let pem = dir.path().join("idp.pem");
        std::fs::write(&pem, ED25519_PEM).unwrap();
        let serve = serve_with(&[
            "--jwt-public-key",
            pem.to_str().unwrap(),
            "--jwt-algorithm",
            "ES256",
        ])
        .unwrap();
        let err = serve.gateway_limits().unwrap_err();
        assert!(err.contains("--jwt-algorithm ES256 does not fit"), "{err}");
    }
}

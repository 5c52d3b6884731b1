//! `serve` and `demo`: every flag of the running service — listen address, database, identity,
//! retention, TLS and each gateway limit (each a clap field whose doc is its `--help` text and
//! README row, validated at parse time), and the configuration summary printed at start.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::config::{
    format_bytes, format_duration, parse_claim, parse_frame_bytes, parse_origin,
    parse_outbound_bytes, parse_outbound_bytes_total, parse_rate, parse_retention, parse_timeout,
};
use crate::{EdgeLimits, Limits, TlsArgs};
use pgcast_gateway::GatewayConfig;

use super::*;

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
        value_parser = parse_retention
    )]
    pub retention: Duration,
    /// Apply pending migrations (app tables and realtime objects) before serving.
    #[arg(long, env = "PGCAST_MIGRATE")]
    pub migrate: bool,
    /// Limits against slow and flooding clients.
    #[command(flatten)]
    pub limits: LimitArgs,
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
    /// Memory every WebSocket's queue may take together: its entries, about 70 bytes each (the
    /// frames they point to are shared and not counted). Past it, a connection holding more than its share (never one whose
    /// queue is empty) is closed with 4008 instead of queueing more. 16MiB to 64GiB, at least
    /// --outbound-bytes.
    #[arg(
        long = "outbound-bytes-total",
        env = "PGCAST_OUTBOUND_BYTES_TOTAL",
        default_value = "1GiB",
        value_name = "BYTES",
        value_parser = parse_outbound_bytes_total
    )]
    pub outbound_bytes_total: usize,
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
    /// Client frames per second per connection on average (bursts of twice that, or of twice
    /// --max-subscriptions plus two if more); the first frame over it is answered with
    /// `rate_limited`, it and the next ones are ignored (unanswered) until a frame is within the
    /// rate again. 1 to 10,000.
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
    /// Most rows one snapshot may hold; a larger one fails with `snapshot_too_large`. 1 to
    /// 1,000,000.
    #[arg(
        long = "snapshot-limit",
        env = "PGCAST_SNAPSHOT_LIMIT",
        default_value = "10000",
        value_name = "ROWS",
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    pub snapshot_limit: u32,
    /// Most log rows a `since` replay from the log may pass over that are not its topic's (a
    /// mechanic's session replay: may read) before it stops with `resync`; a replay of a topic
    /// that gets most events is not limited by it. 1,000 to 100,000,000.
    #[arg(
        long = "replay-scan-limit",
        env = "PGCAST_REPLAY_SCAN_LIMIT",
        default_value = "1000000",
        value_name = "ROWS",
        value_parser = clap::value_parser!(u32).range(1_000..=100_000_000)
    )]
    pub replay_scan_limit: u32,
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
        if self.outbound_bytes_total < self.outbound_bytes {
            return Err(format!(
                "--outbound-bytes-total ({}) must be at least --outbound-bytes ({})",
                format_bytes(self.outbound_bytes_total),
                format_bytes(self.outbound_bytes)
            ));
        }
        let mut gateway = GatewayConfig::new(Vec::new());
        gateway.max_unauthenticated = self.max_unauthenticated as usize;
        gateway.max_unauthenticated_per_ip = self.max_unauthenticated_per_ip as usize;
        gateway.max_frame_bytes = self.max_frame_bytes;
        gateway.frame_timeout = self.frame_timeout;
        gateway.outbound_bytes = self.outbound_bytes;
        gateway.outbound_bytes_total = self.outbound_bytes_total;
        gateway.replay_window = self.replay_window as usize;
        gateway.max_concurrent_reads = self.max_concurrent_reads as usize;
        gateway.allowed_origins = self.allowed_origins.clone();
        gateway.max_connections = self.max_connections as usize;
        gateway.max_subscriptions = self.max_subscriptions as usize;
        gateway.client_frames_per_second = self.client_frames_per_second;
        gateway.auth_timeout = self.auth_timeout;
        gateway.heartbeat_interval = self.heartbeat_interval;
        gateway.snapshot_limit = self.snapshot_limit as usize;
        gateway.replay_scan_limit = self.replay_scan_limit as usize;
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
             max_frame_bytes={} frame_timeout={} outbound_bytes={} outbound_bytes_total={} \
             replay_window={} \
             max_concurrent_reads={} allowed_origins={} max_connections={} max_subscriptions={} \
             client_frames_per_second={} auth_timeout={} heartbeat_interval={} snapshot_limit={} \
             replay_scan_limit={}",
            format_duration(self.header_timeout),
            or_off(self.max_connections_per_ip),
            or_off(self.connection_rate_per_ip),
            self.connection_burst_per_ip,
            self.max_unauthenticated,
            self.max_unauthenticated_per_ip,
            format_bytes(self.max_frame_bytes),
            format_duration(self.frame_timeout),
            format_bytes(self.outbound_bytes),
            format_bytes(self.outbound_bytes_total),
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
            self.replay_scan_limit,
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
        value_parser = parse_retention
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

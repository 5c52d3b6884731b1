//! The gateway's configuration: every limit and deadline, with its default.

use std::time::Duration;

use crate::auth::DEFAULT_LEEWAY;
#[cfg(doc)]
use crate::MIN_SECRET_BYTES;
use crate::{ClaimMapping, Jwks, PublicKey};

/// Limits and settings of the gateway. Every field documents its default ([`Default`]).
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// HS256 secret that verifies client tokens, at least [`MIN_SECRET_BYTES`] (32) bytes;
    /// [`Gateway::new`](crate::Gateway::new) refuses a shorter one. Required unless
    /// [`jwt_public_key`](Self::jwt_public_key) or [`jwt_jwks`](Self::jwt_jwks) is set, and
    /// then empty: exactly one key source verifies tokens.
    pub jwt_secret: Vec<u8>,
    /// The identity provider's public key (RS256/384/512, PS256/384/512, ES256, ES384 or
    /// EdDSA: the key's one algorithm), instead of the secret. Default `None`.
    pub jwt_public_key: Option<PublicKey>,
    /// The identity provider's JWKS URL and its cache, instead of the secret; clones of the
    /// configuration share the cache. Default `None`.
    pub jwt_jwks: Option<Jwks>,
    /// Where the user, role and workshop are in a token's claims. Default: pgcast's own
    /// `/sub`, `/role` and `/workshop_id`, role names as they are.
    pub jwt_claims: ClaimMapping,
    /// When set, only tokens whose `iss` claim is exactly this are accepted. Default `None`
    /// (the issuer is not checked).
    pub jwt_issuer: Option<String>,
    /// When set, only tokens whose `aud` claim is (or contains) this are accepted. Default
    /// `None`: a token that names any audience is then refused, as it was minted for someone
    /// else (RFC 7519 §4.1.3).
    pub jwt_audience: Option<String>,
    /// Clock skew allowed between the token's minter and the gateway, on `exp` and `nbf`: a
    /// token is accepted until `exp + leeway`, and a connection whose token expired is closed
    /// at that time. Whole seconds (a fraction rounds up). Default 5 s.
    pub token_leeway: Duration,
    /// Time a new connection has to send its `auth` frame. Default 10 s.
    pub auth_timeout: Duration,
    /// The server pings every interval; a peer silent for two intervals is closed.
    /// Default 20 s (so a dead peer is closed within 40 s).
    pub heartbeat_interval: Duration,
    /// Largest client frame or message; larger ones close the connection with 1009. Client
    /// frames are small JSON (the largest is `auth` with its token), so a small limit costs
    /// nothing and bounds what one peer can make the process buffer. Default 64 KiB.
    pub max_frame_bytes: usize,
    /// Time one client frame has to arrive in full once its first byte arrived; a peer that
    /// trickles a frame is cut off (enforced by [`FrameDeadline`](crate::FrameDeadline) under
    /// the socket, so only where the server wraps its sockets in it). Default 10 s.
    pub frame_timeout: Duration,
    /// Longest token accepted in `auth`. Default 8 KiB.
    pub max_token_bytes: usize,
    /// Subscriptions per connection. Default 32.
    pub max_subscriptions: usize,
    /// Open WebSocket connections per process; further upgrades get HTTP 503. Default 20,000.
    pub max_connections: usize,
    /// WebSocket connections per process that have not authenticated yet (upgraded, `auth`
    /// not verified); further upgrades get HTTP 503. A socket stops counting when its token is
    /// verified or its auth deadline passes. Default 5,000.
    pub max_unauthenticated: usize,
    /// Unauthenticated WebSocket connections per peer address (IPv6 by /64); further upgrades
    /// from it get HTTP 503. Smaller than [`max_unauthenticated`](Self::max_unauthenticated),
    /// so no single address can take every unauthenticated slot. Applies where the server
    /// tells the gateway the peer ([`Peer`](crate::Peer)). Default 250.
    pub max_unauthenticated_per_ip: usize,
    /// Bytes queued for one connection before it is closed with 4008 (slow consumer): its
    /// event frames plus a small fixed cost per queued entry. The one bound of the outgoing
    /// queue, so a burst is judged by its size, not its row count: a reader at a mobile link's
    /// pace takes a 10,000-row transaction (a few MB) without being closed, while one that
    /// stopped reading is closed once this much waits for it. Frames are shared between
    /// recipients, so this bounds what one reader can make the process hold. Default 16 MiB.
    pub outbound_bytes: usize,
    /// Memory every connection's queue may take together: its entries, about 70 bytes each (the
    /// frames they point to are shared by every recipient and not counted). Past it, a connection that holds more than its share (this divided by
    /// the event's recipients), never one whose queue is empty, is closed as a slow consumer
    /// (4008) instead of queueing more, so a burst to thousands of slow readers cannot exhaust
    /// the process's memory. At least `outbound_bytes`. Default 1 GiB.
    pub outbound_bytes_total: usize,
    /// Events kept in memory, newest first, to serve `since` replays without reading the log:
    /// a client resuming from a position inside this window (every client after a restart or
    /// a network blip) costs no database query. So does one resuming from further back when
    /// none of the events its topic may see has left the window since (a quiet topic: the
    /// window remembers, per route key, the newest event it let go of). Other resumes read
    /// the log, except `queue`, which is told to take a snapshot. Default 10,000 (a few MB).
    pub replay_window: usize,
    /// Database reads (snapshots, replays from the log, access checks) in flight at once;
    /// further subscribes wait their turn in arrival order instead of failing, while their
    /// connections still see shutdown, slow-consumer signals and peers that leave. Size the
    /// gateway's pool to at least this. Default 8.
    pub max_concurrent_reads: usize,
    /// Most rows a snapshot may hold; a larger one fails with `snapshot_too_large`. Default
    /// 10,000.
    pub snapshot_limit: usize,
    /// Most log rows a `since` replay from the log may pass over without sending them (a
    /// mechanic's session replay: may read) before it stops with `resync`: a topic with few
    /// events resumed from far back must not keep the gateway's reads busy for the whole
    /// retained log. About 6 s of reads. Default 1,000,000.
    pub replay_scan_limit: usize,
    /// Client frames per second allowed on average (bursts of twice that, or of twice
    /// `max_subscriptions` plus two if more); frames over the limit are ignored, the first of a
    /// run answered with `rate_limited`. Default 50.
    pub client_frames_per_second: u32,
    /// Browser `Origin` values allowed to connect; empty = any origin (tokens still required).
    /// Default empty.
    pub allowed_origins: Vec<String>,
    /// Socket read buffer per connection (tungstenite's default of 128 KiB would dominate the
    /// memory of idle connections), and the most one read takes. Default 1 KiB: client frames
    /// are small (an `auth` with a long token takes a few reads) and an idle connection holds
    /// the buffer (4 KiB measured 9.0-9.5 KiB per idle connection, 1 KiB 5.6-5.8 KiB).
    pub read_buffer_bytes: usize,
}

impl GatewayConfig {
    /// Defaults with the given secret.
    pub fn new(jwt_secret: impl Into<Vec<u8>>) -> Self {
        GatewayConfig {
            jwt_secret: jwt_secret.into(),
            jwt_public_key: None,
            jwt_jwks: None,
            jwt_claims: ClaimMapping::default(),
            jwt_issuer: None,
            jwt_audience: None,
            token_leeway: DEFAULT_LEEWAY,
            auth_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(20),
            max_frame_bytes: 64 << 10,
            frame_timeout: Duration::from_secs(10),
            max_token_bytes: 8 << 10,
            max_subscriptions: 32,
            max_connections: 20_000,
            max_unauthenticated: 5_000,
            max_unauthenticated_per_ip: 250,
            outbound_bytes: 16 << 20,
            outbound_bytes_total: 1 << 30,
            replay_window: 10_000,
            max_concurrent_reads: 8,
            snapshot_limit: 10_000,
            replay_scan_limit: 1_000_000,
            client_frames_per_second: 50,
            allowed_origins: Vec::new(),
            read_buffer_bytes: 1 << 10,
        }
    }
}

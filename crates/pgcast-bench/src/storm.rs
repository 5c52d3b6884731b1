//! Scenario 8, the reconnect storm (issue 12): many mechanics on `queue` while writers commit
//! a marketplace mix; pgcast is SIGKILLed, stays dead for `--storm-down`, and is started again
//! on the same port. Every mechanic notices its socket end, reconnects with jittered
//! exponential backoff like a real client, and resumes with `since` = the last position it
//! received.
//!
//! ```text
//!  writers  ─ commit ─ commit ─ commit ─ commit ─ commit ─ commit ─ commit ─ commit ─▶
//!  pgcast   ═══════════╡ SIGKILL      (down)      start ─ ready ═════════════════════
//!  mechanic ─ events ──┤ end ─ attempt ─ attempt ─ … ─ subscribed(since) ─ replay ─ live
//!                      kill                             ready ├ reconnect ┤
//!                                                             ├── time to live ──────┤
//! ```
//!
//! Measured per mechanic: when it re-subscribed (from the kill and from the moment the new
//! process logged ready), and its *time to live*: from ready until it holds every event it may
//! see that was committed before ready (it is caught up). Afterwards each one's received set
//! is checked against what the writers committed and who may see it (design §5): nothing
//! lost, nothing extra, no duplicates; `resync`, `unavailable` and close codes are counted.
//! Commit times and positions come from the log itself, read once after the run.
//!
//! The load generator stays light: each connection is one future in a few `FuturesUnordered`
//! (as in `clients`), event frames are recognised by a prefix and their marker and position
//! found by substring scans; only the rare control frames (`subscribed`, `resync`, `error`)
//! are parsed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use pgcast_events::{Principal, Role};
use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::env::Server;
use crate::load::{self, find_marker, Audience, Mix, Outcome, Plan, World};
use crate::report::{cpu_line, int, ms, table, Check, Section};
use crate::scenarios::Ctx;
use crate::stats::{
    now_us, round3, CpuSample, CpuUse, Histogram, Percentiles, Pids, Seen, MAX_SEQ,
};
use crate::ws::{WsConn, WsTarget};

/// Writes before the kill, with every mechanic connected: the steady state.
const BEFORE: Duration = Duration::from_secs(3);
/// Initial connections set up at once (the storm itself has no such bound).
const OPEN_CONCURRENCY: usize = 128;
/// Receive buffer per connection; it grows for a replay burst.
const CONN_BUF: usize = 4 << 10;
/// First reconnect delay after the socket ends: uniform in this range (ms).
const FIRST_DELAY_MS: (f64, f64) = (50.0, 250.0);
/// Later delays: `BACKOFF_BASE · 2^attempt`, at most `BACKOFF_CAP`, times a uniform jitter
/// in [0.5, 1).
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(1);
/// One connection attempt (TCP, handshake, auth, subscribe) may take this long.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// After ready: how long everyone may take to come back and catch up before the run ends.
const RECOVERY_MAX: Duration = Duration::from_secs(60);
/// The drain ends when nothing new arrived for this long (once writes ended and all are back).
const DRAIN_STALL: Duration = Duration::from_secs(3);
const TOKEN_TTL: Duration = Duration::from_secs(6 * 3600);
/// Targets of issue 12.
const RECONNECT_TARGET_S: f64 = 2.0;
const LIVE_TARGET_S: f64 = 5.0;
const FULL_SIZE: usize = 10_000;

/// What every connection shares.
struct Shared {
    target: WsTarget,
    run: u32,
    /// `now_us()` just before the SIGKILL; 0 until then.
    kill_us: AtomicU64,
    /// Bounds the initial set-up only.
    open: Semaphore,
    /// Initial set-ups finished (subscribed or failed).
    initial_done: AtomicUsize,
    initial_ok: AtomicUsize,
    /// Mechanics subscribed again after the kill.
    resubscribed: AtomicUsize,
    /// Distinct events of this run received, all mechanics together (for the drain).
    distinct: AtomicU64,
}

impl Shared {
    fn after_kill(&self, t: u64) -> bool {
        let k = self.kill_us.load(Ordering::Relaxed);
        k != 0 && t >= k
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum EndKind {
    /// The server sent a close frame with this code (or none in the frame).
    Close(Option<u16>),
    /// The socket ended without a close frame (what a killed server leaves).
    Dropped,
    /// Read error or protocol error.
    Error,
}

impl EndKind {
    fn label(self) -> String {
        match self {
            EndKind::Close(Some(c)) => format!("close {c}"),
            EndKind::Close(None) => "close without code".into(),
            EndKind::Dropped => "socket ended, no close frame".into(),
            EndKind::Error => "read error".into(),
        }
    }
}

/// What one mechanic saw. Times are `now_us()`; 0 = not (yet).
#[derive(Debug, Default)]
struct State {
    /// The position to resume from: the last event's, or the subscription's start.
    last: i64,
    subscribed_once: bool,
    initial_failure: Option<String>,
    seen: Seen,
    dups: u64,
    foreign: u64,
    out_of_order: u64,
    ends: Vec<EndKind>,
    /// When it noticed its socket end after the kill.
    dropped_us: u64,
    /// Connection attempts started after the kill, until it was subscribed again.
    attempts: u32,
    refused: u32,
    timeouts: u32,
    other_failures: u32,
    first_failure: Option<String>,
    /// First WebSocket handshake completed after the kill.
    connected_us: u64,
    /// First `subscribed` after the kill, and the `since` it resumed from.
    resubscribed_us: u64,
    storm_since: Option<i64>,
    /// `subscribed` of a snapshot subscription after a `resync` that followed the kill.
    snapshot_us: u64,
    /// Events (position, receipt) received after the first re-subscription.
    after: Vec<(i64, u64)>,
    resyncs: u32,
    /// `resync` received, snapshot subscription asked for: the `since` it replaced.
    resync_since: Option<i64>,
    /// Position ranges `(since, snapshot]` a snapshot stood in for after a `resync`.
    covered: Vec<(i64, i64)>,
    snapshots: u32,
    unavailable: u32,
    other_errors: Vec<String>,
}

/// One mechanic: a connection that comes back.
struct Mech {
    who: usize,
    token: String,
    ws: Option<WsConn>,
    st: State,
}

/// Why an attempt failed.
enum Fail {
    Refused,
    /// An `error` frame with this code.
    Code(String),
    Other(String),
}

/// A free loopback port below the ephemeral range. While pgcast is down its clients keep
/// connecting to the port; one with a port in that range could be given the very same port
/// as its source and connect to itself (TCP simultaneous open), holding it against the
/// restart.
fn stable_port() -> Result<u16> {
    let low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let start = low.saturating_sub(10_000).max(1025);
    let span = low.saturating_sub(start).max(1);
    let offset = rand::random::<u32>() % span;
    for i in 0..span {
        let port = (start + (offset + i) % span) as u16;
        if std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port below the ephemeral range ({low})")
}

/// TCP counters of this network namespace (`/proc/net/netstat`) that tell why connections
/// waited: the listener's accept queue overflowed (the SYN or the handshake's last ACK was
/// dropped) and SYNs had to be sent again (after 1 s, then 3 s, …).
const TCP_COUNTERS: [&str; 3] = ["ListenOverflows", "ListenDrops", "TCPSynRetrans"];

fn tcp_counters() -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return BTreeMap::new();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter(|(n, _)| TCP_COUNTERS.contains(n))
        .filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?)))
        .collect()
}

fn counters_since(before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    tcp_counters()
        .into_iter()
        .map(|(k, v)| {
            let d = v.saturating_sub(before.get(&k).copied().unwrap_or(0));
            (k, d)
        })
        .collect()
}

fn unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The value after `"position":` (event, `subscribed` and `snapshot` frames), by a scan.
fn frame_position(frame: &[u8]) -> Option<i64> {
    let i = memchr::memmem::find(frame, br#""position":"#)? + br#""position":"#.len();
    let mut v: i64 = 0;
    let mut any = false;
    for &b in frame.get(i..)? {
        if !b.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(i64::from(b - b'0'))?;
        any = true;
    }
    any.then_some(v)
}

/// Counts one frame. Sets `resync` when the server told us to take a snapshot; `new` counts
/// events of this run seen for the first time.
fn on_frame(st: &mut State, run: u32, payload: &[u8], now: u64, resync: &mut bool, new: &mut u64) {
    if payload.starts_with(br#"{"type":"event""#) {
        let position = frame_position(payload);
        if let Some(p) = position {
            if p <= st.last {
                st.out_of_order += 1;
            } else {
                st.last = p;
            }
        }
        if st.resubscribed_us != 0 {
            st.after.push((position.unwrap_or(-1), now));
        }
        match find_marker(payload) {
            Some(m) if m.run == run && m.seq < MAX_SEQ => {
                if st.seen.insert(m.seq) {
                    *new += 1;
                } else {
                    st.dups += 1;
                }
            }
            _ => st.foreign += 1,
        }
        return;
    }
    // Control frames are rare: parse them.
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        st.other_errors.push("a frame that is not JSON".into());
        return;
    };
    match v["type"].as_str() {
        Some("subscribed") => {
            let p = v["position"].as_i64().unwrap_or(0);
            st.last = st.last.max(p);
            if let Some(since) = st.resync_since.take() {
                st.covered.push((since, p));
                if st.resubscribed_us != 0 && st.snapshot_us == 0 {
                    st.snapshot_us = now;
                }
            }
        }
        Some("resync") => {
            st.resyncs += 1;
            st.resync_since = Some(st.last);
            *resync = true;
        }
        Some("snapshot") => st.snapshots += 1,
        Some("error") => error_code(st, v["code"].as_str().unwrap_or("?")),
        _ => {}
    }
}

fn error_code(st: &mut State, code: &str) {
    if code == "unavailable" {
        st.unavailable += 1;
    } else if st.other_errors.len() < 4 {
        st.other_errors.push(code.to_owned());
    }
}

/// Connect, authenticate, subscribe to `queue` (from `since` when given). Returns the
/// connection, when its handshake completed, and the subscription's position. Whatever
/// follows `subscribed` stays in the connection's buffer for the read loop.
async fn attempt(
    target: &WsTarget,
    token: &str,
    since: Option<i64>,
) -> Result<(WsConn, u64, i64), Fail> {
    let mut ws = match WsConn::connect(target, CONN_BUF, rand::random()).await {
        Ok(ws) => ws,
        Err(e) => {
            let refused = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
            });
            return Err(if refused {
                Fail::Refused
            } else {
                Fail::Other(format!("{e:#}"))
            });
        }
    };
    let connected_us = now_us();
    let other = |e: anyhow::Error| Fail::Other(format!("{e:#}"));
    ws.send_text(&json!({"type": "auth", "token": token}).to_string())
        .await
        .map_err(other)?;
    reply(&mut ws, "ready").await?;
    let mut sub = json!({"type": "subscribe", "id": "s", "topic": "queue"});
    if let Some(since) = since {
        sub["since"] = since.into();
    }
    ws.send_text(&sub.to_string()).await.map_err(other)?;
    let v = reply(&mut ws, "subscribed").await?;
    Ok((ws, connected_us, v["position"].as_i64().unwrap_or(0)))
}

async fn reply(ws: &mut WsConn, kind: &str) -> Result<serde_json::Value, Fail> {
    loop {
        let msg = match ws.next_message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(Fail::Other(format!(
                    "closed before {kind} (close code {:?})",
                    ws.close_code.flatten()
                )))
            }
            Err(e) => return Err(Fail::Other(format!("{e:#}"))),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&msg).map_err(|e| Fail::Other(e.to_string()))?;
        match v["type"].as_str() {
            Some(t) if t == kind => return Ok(v),
            Some("error") => {
                return Err(Fail::Code(v["code"].as_str().unwrap_or("?").to_owned()));
            }
            _ => {}
        }
    }
}

/// The delay before attempt `k` (0 = the first after the socket ended).
fn backoff(k: u32) -> Duration {
    let r: f64 = rand::random();
    if k == 0 {
        return Duration::from_secs_f64(
            (FIRST_DELAY_MS.0 + (FIRST_DELAY_MS.1 - FIRST_DELAY_MS.0) * r) / 1000.0,
        );
    }
    let base = BACKOFF_BASE.saturating_mul(1 << k.min(16)).min(BACKOFF_CAP);
    base.mul_f64(0.5 + 0.5 * r)
}

/// A mechanic's life: connect once (bounded concurrency), then read; whenever the connection
/// ends, come back with `since`. Runs until dropped.
async fn mechanic(m: &mut Mech, sh: &Shared) {
    {
        let _permit = sh.open.acquire().await;
        match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt(&sh.target, &m.token, None)).await {
            Ok(Ok((ws, _, position))) => {
                m.ws = Some(ws);
                m.st.last = position;
                m.st.subscribed_once = true;
                sh.initial_ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(Fail::Refused)) => m.st.initial_failure = Some("connection refused".into()),
            Ok(Err(Fail::Code(c))) => {
                error_code(&mut m.st, &c);
                m.st.initial_failure = Some(format!("error {c}"));
            }
            Ok(Err(Fail::Other(e))) => m.st.initial_failure = Some(e),
            Err(_) => m.st.initial_failure = Some("set-up timed out".into()),
        }
        sh.initial_done.fetch_add(1, Ordering::Relaxed);
    }
    loop {
        if let Some(ws) = m.ws.as_mut() {
            let end = read(ws, &mut m.st, sh).await;
            let now = now_us();
            m.st.ends.push(end);
            if sh.after_kill(now) && m.st.dropped_us == 0 {
                m.st.dropped_us = now;
            }
            m.ws = None;
        }
        reconnect(m, sh).await;
    }
}

/// Reads until the connection ends. After a `resync` it asks for a snapshot, as a client
/// would.
async fn read(ws: &mut WsConn, st: &mut State, sh: &Shared) -> EndKind {
    loop {
        // Frames may already wait in the buffer (those that followed `subscribed`).
        let now = now_us();
        let mut resync = false;
        let mut new = 0;
        let open = ws.drain(|_, payload| on_frame(st, sh.run, payload, now, &mut resync, &mut new));
        if new > 0 {
            sh.distinct.fetch_add(new, Ordering::Relaxed);
        }
        let flushed = ws.flush_replies().await;
        match open {
            Ok(true) => {}
            Ok(false) => return EndKind::Close(ws.close_code.flatten()),
            Err(_) => return EndKind::Error,
        }
        if flushed.is_err() {
            return EndKind::Error;
        }
        if resync {
            let sub = r#"{"type":"subscribe","id":"r","topic":"queue","snapshot":true}"#;
            if ws.send_text(sub).await.is_err() {
                return EndKind::Error;
            }
        }
        match ws.fill().await {
            Ok(true) => {}
            Ok(false) => return EndKind::Dropped,
            Err(e) => {
                let reset = e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>().is_some_and(|io| {
                        matches!(
                            io.kind(),
                            std::io::ErrorKind::ConnectionReset
                                | std::io::ErrorKind::ConnectionAborted
                                | std::io::ErrorKind::BrokenPipe
                        )
                    })
                });
                return if reset {
                    EndKind::Dropped
                } else {
                    EndKind::Error
                };
            }
        }
    }
}

/// Comes back with jittered exponential backoff until subscribed again.
async fn reconnect(m: &mut Mech, sh: &Shared) {
    let st = &mut m.st;
    let mut k = 0;
    loop {
        tokio::time::sleep(backoff(k)).await;
        k += 1;
        let storm = sh.after_kill(now_us()) && st.resubscribed_us == 0;
        if storm {
            st.attempts += 1;
        }
        let since = st.subscribed_once.then_some(st.last);
        let r = tokio::time::timeout(ATTEMPT_TIMEOUT, attempt(&sh.target, &m.token, since)).await;
        let failure = match r {
            Ok(Ok((ws, connected_us, position))) => {
                let now = now_us();
                if storm {
                    st.connected_us = connected_us;
                    st.resubscribed_us = now;
                    st.storm_since = since;
                    sh.resubscribed.fetch_add(1, Ordering::Relaxed);
                }
                st.last = st.last.max(position);
                st.subscribed_once = true;
                m.ws = Some(ws);
                return;
            }
            Ok(Err(Fail::Refused)) => {
                st.refused += 1;
                continue;
            }
            Ok(Err(Fail::Code(c))) => {
                error_code(st, &c);
                format!("error {c}")
            }
            Ok(Err(Fail::Other(e))) => e,
            Err(_) => {
                st.timeouts += 1;
                continue;
            }
        };
        st.other_failures += 1;
        if st.first_failure.is_none() {
            st.first_failure = Some(failure);
        }
    }
}

/// Runs the mechanics of one group until `stop`, then hands them back.
async fn group(mut mechs: Vec<Mech>, sh: Arc<Shared>, stop: CancellationToken) -> Vec<Mech> {
    {
        let sh: &Shared = &sh;
        let mut all: FuturesUnordered<_> = mechs.iter_mut().map(|m| mechanic(m, sh)).collect();
        tokio::select! {
            () = stop.cancelled() => {}
            // The futures never end; this only drives them.
            _ = all.next() => stop.cancelled().await,
        }
    }
    mechs
}

/// Per-mechanic results after the run.
#[derive(Debug, Default)]
struct Verdict {
    expected: u64,
    received: u64,
    lost: u64,
    unexpected: u64,
    covered: u64,
    /// Events committed before ready after its `since`: what it had to catch up on.
    needed: u64,
    live_us: Option<u64>,
}

fn judge(
    m: &Mech,
    world: &World,
    by_seq: &[Option<Audience>],
    logged: &[Option<(i64, i64)>],
    ready_wall: i64,
) -> Verdict {
    let st = &m.st;
    let mut v = Verdict::default();
    let covered = |seq: usize| {
        logged
            .get(seq)
            .copied()
            .flatten()
            .is_some_and(|(p, _)| st.covered.iter().any(|&(a, b)| p > a && p <= b))
    };
    let mut got = vec![false; by_seq.len()];
    for seq in st.seen.iter() {
        if let Some(g) = got.get_mut(seq as usize) {
            *g = true;
        }
    }
    let mut after = st.after.clone();
    after.sort_unstable();
    let mut live = st.resubscribed_us.max(st.snapshot_us);
    let mut caught_up = st.resubscribed_us != 0;
    for (seq, audience) in by_seq.iter().enumerate() {
        let Some(audience) = audience else { continue };
        if !world.sees(m.who, *audience) {
            continue;
        }
        if covered(seq) {
            v.covered += 1;
            continue;
        }
        v.expected += 1;
        if !got[seq] {
            v.lost += 1;
        }
        let (Some(since), Some((position, committed))) = (st.storm_since, logged[seq]) else {
            continue;
        };
        if position <= since || committed > ready_wall {
            continue;
        }
        v.needed += 1;
        match after.binary_search_by_key(&position, |&(p, _)| p) {
            Ok(i) => live = live.max(after[i].1),
            Err(_) => caught_up = false,
        }
    }
    for seq in st.seen.iter() {
        let visible = by_seq
            .get(seq as usize)
            .copied()
            .flatten()
            .is_some_and(|a| world.sees(m.who, a));
        if visible {
            v.received += 1;
        } else {
            v.unexpected += 1;
        }
    }
    v.live_us = caught_up.then_some(live);
    v
}

#[derive(Debug, Clone, Default, Serialize)]
struct Counts {
    mean: f64,
    p50: u64,
    p99: u64,
    max: u64,
}

fn counts(mut v: Vec<u64>) -> Counts {
    if v.is_empty() {
        return Counts::default();
    }
    v.sort_unstable();
    let q = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Counts {
        mean: round3(v.iter().sum::<u64>() as f64 / v.len() as f64),
        p50: q(0.5),
        p99: q(0.99),
        max: v[v.len() - 1],
    }
}

/// Everything the section reports, also written as JSON.
#[derive(Debug, Default, Serialize)]
struct Figures {
    mechanics: usize,
    workshops: usize,
    freelancers: usize,
    rate: f64,
    writers: usize,
    down_s: f64,
    /// Opening the first connections, before the run.
    open_s: f64,
    connected_at_kill: usize,
    initial_failures: usize,
    first_initial_failure: Option<String>,
    /// Kill → the new process logged ready.
    outage_s: f64,
    /// Respawn → ready: pgcast's own start-up.
    startup_s: f64,
    noticed_from_kill: Percentiles,
    resubscribed: usize,
    resubscribed_from_kill: Percentiles,
    resubscribed_from_ready: Percentiles,
    within_target_of_ready: usize,
    attempts: Counts,
    refused_attempts: u64,
    timed_out_attempts: u64,
    other_failed_attempts: u64,
    first_failed_attempt: Option<String>,
    live: usize,
    never_live: usize,
    live_from_ready: Percentiles,
    live_from_kill: Percentiles,
    caught_up_events: Counts,
    unavailable: u64,
    other_errors: BTreeMap<String, u64>,
    resync_clients: usize,
    resyncs: u64,
    snapshots: u64,
    connection_ends: BTreeMap<String, u64>,
    expected: u64,
    received: u64,
    lost: u64,
    unexpected: u64,
    duplicates: u64,
    out_of_order: u64,
    foreign: u64,
    covered_by_snapshot: u64,
    drained: bool,
    committed: u64,
    committed_before_kill: u64,
    committed_while_down: u64,
    committed_after_ready: u64,
    failed_writes: u64,
    first_write_errors: Vec<String>,
    steady_cpu: CpuUse,
    recovery_cpu: CpuUse,
    /// Machine-wide TCP counters from the kill to the end of the drain.
    tcp: BTreeMap<String, u64>,
}

fn skipped(reason: &str) -> Section {
    eprintln!("   skipped: {reason}");
    Section {
        key: "storm".into(),
        title: "8. Reconnect storm (skipped)".into(),
        markdown: format!("Skipped: {reason}\n"),
        data: json!({ "skipped": reason }),
        targets: Vec::new(),
        cpu: Vec::new(),
    }
}

/// Tells the cleanup watchdog which pgcast to kill should the bench die.
fn track(ctx: &Ctx) {
    let pids = ctx
        .pgcast
        .as_ref()
        .map(|s| s.pid.to_string())
        .unwrap_or_default();
    let _ = std::fs::write(ctx.log_dir.join("pids"), pids);
}

async fn start_pgcast(ctx: &mut Ctx, bin: &std::path::Path, listen: &str, log: &str) -> Result<()> {
    let (bin, db_url, secret) = (bin.to_owned(), ctx.db.url.clone(), ctx.secret.clone());
    let log = ctx.log_dir.join(log);
    let listen = listen.to_owned();
    let db = crate::env::Database::given(&db_url)?;
    let server =
        tokio::task::spawn_blocking(move || Server::pgcast_at(&bin, &db, &secret, log, &listen))
            .await??;
    ctx.target = server.target.clone();
    ctx.pgcast_pid = Some(server.pid);
    ctx.pgcast = Some(server);
    track(ctx);
    Ok(())
}

async fn log_head(pg: &tokio_postgres::Config) -> Result<i64> {
    let (client, connection) = pg.connect(NoTls).await?;
    let driver = tokio::spawn(connection);
    let head: i64 = client
        .query_one(
            "SELECT coalesce(max(position), 0) FROM pgcast.assignment_events",
            &[],
        )
        .await?
        .get(0);
    drop(client);
    let _ = driver.await;
    Ok(head)
}

/// Position and commit time (unix µs) of each of run `run`'s events, by sequence number.
async fn read_log(
    pg: &tokio_postgres::Config,
    after: i64,
    run: u32,
    len: usize,
) -> Result<Vec<Option<(i64, i64)>>> {
    let (client, connection) = pg.connect(NoTls).await?;
    let driver = tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT position, (extract(epoch FROM committed_at) * 1000000)::bigint, \
                    payload -> 'row' ->> 'customer_name' \
             FROM pgcast.assignment_events WHERE position > $1",
            &[&after],
        )
        .await
        .context("read the log of the run")?;
    drop(client);
    let _ = driver.await;
    let mut logged = vec![None; len];
    for row in rows {
        let name: Option<String> = row.get(2);
        let Some(m) = name.as_deref().and_then(|n| find_marker(n.as_bytes())) else {
            continue;
        };
        if m.run == run {
            if let Some(slot) = logged.get_mut(m.seq as usize) {
                *slot = Some((row.get(0), row.get(1)));
            }
        }
    }
    Ok(logged)
}

pub(crate) async fn storm(ctx: &mut Ctx) -> Result<Section> {
    if ctx.args.ws_url.is_some() {
        return Ok(skipped(
            "the reconnect storm kills and restarts pgcast, so it needs a pgcast of its own; it does not run against --ws-url.",
        ));
    }
    let Some(bin) = ctx.pgcast_bin.clone() else {
        return Ok(skipped("no pgcast binary to start."));
    };
    let s = ctx.sizes.clone();
    let mut n = s.storm_mechanics;
    let mut md = String::new();
    let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
    // Our sockets, pgcast's (it inherits the same limit), and some spare descriptors.
    let room = soft.saturating_sub(300) as usize;
    if n > room {
        md += &format!(
            "The open-file limit ({soft}, hard {hard}) leaves room for {room} connections: measuring {room} mechanics instead of {n}.\n\n"
        );
        n = room;
    }
    let workshops = ctx.args.storm_workshops;
    let world = {
        let ws: Vec<Uuid> = (0..workshops).map(|_| Uuid::new_v4()).collect();
        World {
            mechanics: (0..n)
                .map(|i| {
                    let w = (workshops > 0 && i % 5 != 4).then(|| (i % workshops) as u16);
                    (Uuid::new_v4(), w)
                })
                .collect(),
            workshops: ws,
        }
    };
    let world = Arc::new(world);

    // A pgcast of this scenario's own, on a port that outlives the process.
    let port = stable_port()?;
    let listen = format!("127.0.0.1:{port}");
    if let Some(old) = ctx.pgcast.take() {
        tokio::task::spawn_blocking(move || old.stop()).await?;
    }
    start_pgcast(ctx, &bin, &listen, "pgcast-storm-1.log").await?;
    let old_pid = ctx.pgcast_pid;
    let postmaster = ctx.postmaster;
    let pids = move |pgcast| Pids {
        pgcast,
        postmaster,
        other_server: None,
    };

    // Distinct from the runs of the other scenarios (below 10^8), so their rows never count.
    let run = 1_000_000_000 + rand::random::<u32>() % 1_000_000_000;
    let minter = pgcast_gateway::TokenMinter::new(ctx.secret.as_bytes())?;
    let mut mechs = Vec::with_capacity(n);
    for (who, (id, w)) in world.mechanics.iter().enumerate() {
        let principal = Principal {
            user_id: *id,
            role: Role::Mechanic,
            workshop_id: w.map(|w| world.workshops[usize::from(w)]),
        };
        mechs.push(Mech {
            who,
            token: minter.mint(&principal, TOKEN_TTL)?,
            ws: None,
            st: State::default(),
        });
    }
    let shared = Arc::new(Shared {
        target: ctx.target.clone(),
        run,
        kill_us: AtomicU64::new(0),
        open: Semaphore::new(OPEN_CONCURRENCY),
        initial_done: AtomicUsize::new(0),
        initial_ok: AtomicUsize::new(0),
        resubscribed: AtomicUsize::new(0),
        distinct: AtomicU64::new(0),
    });
    let stop = CancellationToken::new();
    // However this scenario ends, the mechanics stop.
    let _stop_guard = stop.clone().drop_guard();
    let groups = ctx.args.reader_tasks.max(1);
    let mut split: Vec<Vec<Mech>> = (0..groups).map(|_| Vec::new()).collect();
    for (i, m) in mechs.into_iter().enumerate() {
        split[i % groups].push(m);
    }
    let tasks: Vec<JoinHandle<Vec<Mech>>> = split
        .into_iter()
        .map(|g| tokio::spawn(group(g, shared.clone(), stop.clone())))
        .collect();

    let t_open = Instant::now();
    while shared.initial_done.load(Ordering::Relaxed) < n {
        if t_open.elapsed() > Duration::from_secs(120) {
            bail!("the mechanics' first connections did not finish within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected_at_start = shared.initial_ok.load(Ordering::Relaxed);
    if connected_at_start == 0 {
        stop.cancel();
        let mut first = None;
        for t in tasks {
            for m in t.await.unwrap_or_default() {
                first = first.or(m.st.initial_failure);
            }
        }
        bail!("no mechanic could connect: {}", first.unwrap_or_default());
    }
    let open_s = t_open.elapsed().as_secs_f64();

    // The writers: before, during and after the outage.
    let writers = load::connect_writers(&ctx.db.config, ctx.args.writers).await?;
    let plan = Plan {
        writers: ctx.args.writers,
        rate: Some(s.storm_rate),
        batch: 1,
        duration: BEFORE + ctx.args.storm_down + s.storm_after,
        mix: Mix::Marketplace,
        run,
        seed: ctx.args.seed,
    };
    let log_start = log_head(&ctx.db.config).await?;
    let cpu0 = CpuSample::take(pids(old_pid));
    let w2 = world.clone();
    let mut writes_task = tokio::spawn(async move { load::run(&writers, plan, Some(w2)).await });
    tokio::time::sleep(BEFORE).await;
    let steady_cpu = cpu0.until(&CpuSample::take(pids(old_pid)));

    // The crash.
    let connected_at_kill = shared.initial_ok.load(Ordering::Relaxed);
    let tcp0 = tcp_counters();
    let kill_wall = unix_us();
    let kill_us = now_us();
    shared.kill_us.store(kill_us, Ordering::Relaxed);
    let old = ctx
        .pgcast
        .take()
        .ok_or_else(|| anyhow!("no pgcast to kill"))?;
    tokio::task::spawn_blocking(move || old.kill()).await??;
    track(ctx);
    eprintln!(
        "   pgcast SIGKILLed; restarting it in {:?}",
        ctx.args.storm_down
    );
    tokio::time::sleep(ctx.args.storm_down).await;
    let respawn_us = now_us();
    start_pgcast(ctx, &bin, &listen, "pgcast-storm-2.log")
        .await
        .context("restart pgcast on the same port")?;
    let ready_us = now_us();
    let ready_wall = unix_us();
    let new_pid = ctx.pgcast_pid;
    let cpu1 = CpuSample::take(pids(new_pid));

    // Recovery: everyone back, writes over, every event delivered (or no progress).
    let deadline = Instant::now() + RECOVERY_MAX;
    let mut writes: Option<Outcome> = None;
    let mut want = u64::MAX;
    let mut last = u64::MAX;
    let mut changed = Instant::now();
    let drained = loop {
        if writes.is_none() && writes_task.is_finished() {
            let w = (&mut writes_task).await.context("the writers failed")?;
            let c = w.counts(&world);
            want = (0..n).map(|m| w.expected_for(&c, &world, m)).sum();
            writes = Some(w);
        }
        let back = shared.resubscribed.load(Ordering::Relaxed) >= connected_at_kill;
        let got = shared.distinct.load(Ordering::Relaxed);
        if writes.is_some() && back {
            if got >= want {
                break true;
            }
            if got != last {
                last = got;
                changed = Instant::now();
            } else if changed.elapsed() > DRAIN_STALL {
                break false;
            }
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let recovery_cpu = cpu1.until(&CpuSample::take(pids(new_pid)));
    let tcp = counters_since(&tcp0);
    stop.cancel();
    let mut mechs = Vec::with_capacity(n);
    for t in tasks {
        mechs.extend(t.await.context("a reader task failed")?);
    }
    let writes = match writes {
        Some(w) => w,
        None => writes_task.await.context("the writers failed")?,
    };
    if writes.committed() == 0 {
        bail!("no write committed: {:?}", writes.errors);
    }

    // Positions and commit times of this run's events, from the log.
    let logged = read_log(&ctx.db.config, log_start, run, writes.by_seq().len()).await?;
    let t = Timeline {
        kill_us,
        kill_wall,
        respawn_us,
        ready_us,
        ready_wall,
    };
    let mut f = Figures {
        mechanics: n,
        workshops,
        freelancers: world.mechanics.iter().filter(|(_, w)| w.is_none()).count(),
        rate: s.storm_rate,
        writers: ctx.args.writers,
        down_s: ctx.args.storm_down.as_secs_f64(),
        open_s: round3(open_s),
        connected_at_kill,
        initial_failures: n - connected_at_start,
        drained,
        failed_writes: writes.failed,
        first_write_errors: writes.errors.clone(),
        steady_cpu,
        recovery_cpu,
        tcp,
        ..Figures::default()
    };
    tally(&mut f, &mechs, &world, &writes, &logged, &t);
    md += &describe(&f);
    Ok(Section {
        key: "storm".into(),
        title: "8. Reconnect storm".into(),
        markdown: md,
        data: json!({ "figures": f, "port": port }),
        targets: checks(&f, n >= FULL_SIZE && !ctx.args.quick),
        cpu: vec![
            ("steady, before the kill".into(), f.steady_cpu),
            ("recovery, ready → drained".into(), f.recovery_cpu),
        ],
    })
}

/// The moments of the outage: `now_us()` and unix µs (to compare with the log's commit times).
struct Timeline {
    kill_us: u64,
    kill_wall: i64,
    respawn_us: u64,
    ready_us: u64,
    ready_wall: i64,
}

/// Fills in the per-mechanic figures.
fn tally(
    f: &mut Figures,
    mechs: &[Mech],
    world: &World,
    writes: &Outcome,
    logged: &[Option<(i64, i64)>],
    t: &Timeline,
) {
    let by_seq = writes.by_seq();
    f.committed = writes.committed();
    for (seq, a) in by_seq.iter().enumerate() {
        if a.is_none() {
            continue;
        }
        match logged.get(seq).copied().flatten() {
            Some((_, c)) if c < t.kill_wall => f.committed_before_kill += 1,
            Some((_, c)) if c <= t.ready_wall => f.committed_while_down += 1,
            _ => f.committed_after_ready += 1,
        }
    }
    f.outage_s = round3(t.ready_us.saturating_sub(t.kill_us) as f64 / 1e6);
    f.startup_s = round3(t.ready_us.saturating_sub(t.respawn_us) as f64 / 1e6);
    let mut noticed = Histogram::default();
    let mut from_kill = Histogram::default();
    let mut from_ready = Histogram::default();
    let mut live_ready = Histogram::default();
    let mut live_kill = Histogram::default();
    let mut attempts = Vec::new();
    let mut needed = Vec::new();
    for m in mechs {
        let st = &m.st;
        if f.first_initial_failure.is_none() {
            f.first_initial_failure = st.initial_failure.clone();
        }
        if st.dropped_us != 0 {
            noticed.record(st.dropped_us.saturating_sub(t.kill_us));
        }
        if st.resubscribed_us != 0 {
            f.resubscribed += 1;
            from_kill.record(st.resubscribed_us.saturating_sub(t.kill_us));
            let r = st.resubscribed_us.saturating_sub(t.ready_us);
            from_ready.record(r);
            if r as f64 / 1e6 <= RECONNECT_TARGET_S {
                f.within_target_of_ready += 1;
            }
            attempts.push(u64::from(st.attempts));
        }
        f.refused_attempts += u64::from(st.refused);
        f.timed_out_attempts += u64::from(st.timeouts);
        f.other_failed_attempts += u64::from(st.other_failures);
        if f.first_failed_attempt.is_none() {
            f.first_failed_attempt = st.first_failure.clone();
        }
        f.unavailable += u64::from(st.unavailable);
        for e in &st.other_errors {
            *f.other_errors.entry(e.clone()).or_default() += 1;
        }
        if st.resyncs > 0 {
            f.resync_clients += 1;
        }
        f.resyncs += u64::from(st.resyncs);
        f.snapshots += u64::from(st.snapshots);
        for e in &st.ends {
            *f.connection_ends.entry(e.label()).or_default() += 1;
        }
        f.duplicates += st.dups;
        f.out_of_order += st.out_of_order;
        f.foreign += st.foreign;
        let v = judge(m, world, &by_seq, logged, t.ready_wall);
        f.expected += v.expected;
        f.received += v.received;
        f.lost += v.lost;
        f.unexpected += v.unexpected;
        f.covered_by_snapshot += v.covered;
        match (st.resubscribed_us, v.live_us) {
            (0, _) | (_, None) => f.never_live += 1,
            (_, Some(live)) => {
                f.live += 1;
                needed.push(v.needed);
                live_ready.record(live.saturating_sub(t.ready_us));
                live_kill.record(live.saturating_sub(t.kill_us));
            }
        }
    }
    f.noticed_from_kill = noticed.summary();
    f.resubscribed_from_kill = from_kill.summary();
    f.resubscribed_from_ready = from_ready.summary();
    f.live_from_ready = live_ready.summary();
    f.live_from_kill = live_kill.summary();
    f.attempts = counts(attempts);
    f.caught_up_events = counts(needed);
}

/// The targets of issue 12 against what was measured.
fn checks(f: &Figures, full: bool) -> Vec<Check> {
    let tag = if full { "" } else { " (reduced sizes)" };
    let s_of = |p: f64| format!("{:.3} s", p / 1000.0);
    vec![
        Check::new(
            "reconnect storm: every mechanic re-subscribed with `since` within 2 s of the restarted pgcast being ready",
            format!(
                "{} of {} re-subscribed, {} within 2 s; p99 {}, max {} after ready{tag}",
                int(f.resubscribed as u64),
                int(f.mechanics as u64),
                int(f.within_target_of_ready as u64),
                s_of(f.resubscribed_from_ready.p99_ms),
                s_of(f.resubscribed_from_ready.max_ms)
            ),
            Some(f.within_target_of_ready == f.mechanics),
        ),
        Check::new(
            "reconnect storm: p99 time to live ≤ 5 s",
            format!(
                "p99 {} after ready ({} from the kill), {} never caught up{tag}",
                s_of(f.live_from_ready.p99_ms),
                s_of(f.live_from_kill.p99_ms),
                int(f.never_live as u64)
            ),
            Some(f.never_live == 0 && f.live_from_ready.p99_ms / 1000.0 <= LIVE_TARGET_S),
        ),
        Check::new(
            "reconnect storm: no `unavailable`",
            format!("{} unavailable errors", int(f.unavailable)),
            Some(f.unavailable == 0),
        ),
        Check::new(
            "reconnect storm: each ends with exactly the events it may see",
            format!(
                "{} lost, {} unexpected, {} duplicates of {} expected; {} mechanics got resync",
                int(f.lost),
                int(f.unexpected),
                int(f.duplicates),
                int(f.expected),
                int(f.resync_clients as u64)
            ),
            Some(
                f.lost == 0
                    && f.unexpected == 0
                    && f.duplicates == 0
                    && f.resync_clients == 0
                    && f.initial_failures == 0,
            ),
        ),
    ]
}

fn describe(f: &Figures) -> String {
    let mut md = format!(
        "{} mechanics ({} workshops, {} freelancers) subscribed to `queue` (opened in {:.1} s); {} writers commit the marketplace mix of scenario 1 at {} events/s before, during and after the outage. After {} s pgcast is SIGKILLed, left dead for {} s, and started again on the same port. Each mechanic reconnects like a real client: first attempt after {}–{} ms, then exponential backoff ({} ms doubling, capped at {} s, jitter 50–100 %), each attempt `auth` then `subscribe` with `since` = the last position it received. *Ready* = the new process logged `pgcast ready`; the outage (kill → ready) lasted **{:.3} s**, {:.3} s of it pgcast's own start-up. *Time to live* = until the mechanic holds every event it may see that was committed before ready (positions and commit times read from the log afterwards).\n\n",
        int(f.mechanics as u64),
        f.workshops,
        int(f.freelancers as u64),
        f.open_s,
        f.writers,
        f.rate,
        BEFORE.as_secs_f64(),
        f.down_s,
        FIRST_DELAY_MS.0,
        FIRST_DELAY_MS.1,
        BACKOFF_BASE.as_millis(),
        BACKOFF_CAP.as_secs_f64(),
        f.outage_s,
        f.startup_s,
    );
    let row = |name: &str, p: &Percentiles| {
        vec![
            name.to_owned(),
            int(p.samples),
            ms(p.p50_ms),
            ms(p.p90_ms),
            ms(p.p99_ms),
            ms(p.max_ms),
        ]
    };
    md += &table(
        &[
            "per mechanic",
            "mechanics",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
        ],
        vec![
            row("socket end noticed, from the kill", &f.noticed_from_kill),
            row("re-subscribed, from the kill", &f.resubscribed_from_kill),
            row("re-subscribed, from ready", &f.resubscribed_from_ready),
            row("**time to live, from ready**", &f.live_from_ready),
            row("time to live, from the kill", &f.live_from_kill),
        ],
    );
    let joined = |m: &BTreeMap<String, u64>| {
        if m.is_empty() {
            "none".to_owned()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k} ×{}", int(*v)))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    md += "\n";
    md += &table(
        &["", ""],
        vec![
            vec![
                "connected before the kill".into(),
                format!(
                    "{} of {}",
                    int(f.connected_at_kill as u64),
                    int(f.mechanics as u64)
                ),
            ],
            vec![
                "re-subscribed (within 2 s of ready)".into(),
                format!(
                    "{} ({})",
                    int(f.resubscribed as u64),
                    int(f.within_target_of_ready as u64)
                ),
            ],
            vec![
                "caught up (never)".into(),
                format!("{} ({})", int(f.live as u64), int(f.never_live as u64)),
            ],
            vec![
                "attempts until re-subscribed: mean / p50 / p99 / max".into(),
                format!(
                    "{:.2} / {} / {} / {}",
                    f.attempts.mean, f.attempts.p50, f.attempts.p99, f.attempts.max
                ),
            ],
            vec![
                "failed attempts: refused / timed out / other".into(),
                format!(
                    "{} / {} / {}",
                    int(f.refused_attempts),
                    int(f.timed_out_attempts),
                    int(f.other_failed_attempts)
                ),
            ],
            vec![
                "events to catch up per mechanic: mean / p99 / max".into(),
                format!(
                    "{:.1} / {} / {}",
                    f.caught_up_events.mean, f.caught_up_events.p99, f.caught_up_events.max
                ),
            ],
            vec![
                "TCP, kill → drained: listen overflows / drops / SYN retransmits".into(),
                TCP_COUNTERS
                    .iter()
                    .map(|k| f.tcp.get(*k).map_or("–".into(), |v| int(*v)))
                    .collect::<Vec<_>>()
                    .join(" / "),
            ],
            vec!["`unavailable` errors".into(), int(f.unavailable)],
            vec!["other errors".into(), joined(&f.other_errors)],
            vec![
                "`resync` (mechanics)".into(),
                format!("{} ({})", int(f.resyncs), int(f.resync_clients as u64)),
            ],
            vec!["connection ends".into(), joined(&f.connection_ends)],
            vec![
                "received / expected".into(),
                format!("{} / {}", int(f.received), int(f.expected)),
            ],
            vec![
                "lost / unexpected / duplicates / out of order".into(),
                format!(
                    "{} / {} / {} / {}",
                    int(f.lost),
                    int(f.unexpected),
                    int(f.duplicates),
                    int(f.out_of_order)
                ),
            ],
        ],
    );
    md += &format!(
        "\nWrites: {} events committed ({} before the kill, {} while pgcast was down, {} after ready), {} failed.{}\n",
        int(f.committed),
        int(f.committed_before_kill),
        int(f.committed_while_down),
        int(f.committed_after_ready),
        int(f.failed_writes),
        f.first_write_errors
            .first()
            .map(|e| format!(" First error: `{e}`."))
            .unwrap_or_default()
    );
    let overflows = f.tcp.get("ListenOverflows").copied().unwrap_or(0);
    if overflows > 0 {
        md += &format!(
            "\nThe kernel dropped {} connection attempts because a listener's accept queue was full (`ListenOverflows`, machine-wide; pgcast's is the only listener under this load): those clients waited for SYN retransmits (1 s, then 2 s, 4 s, …) or for their attempt's {} s timeout.\n",
            int(overflows),
            ATTEMPT_TIMEOUT.as_secs()
        );
    }
    if f.covered_by_snapshot > 0 {
        md += &format!(
            "\n{} expected events were replaced by the snapshot a mechanic took after `resync` (not counted as lost).\n",
            int(f.covered_by_snapshot)
        );
    }
    if !f.drained {
        md += "\nThe drain ended before every expected event arrived (no progress for 3 s, or the 60 s recovery limit).\n";
    }
    if let Some(e) = &f.first_initial_failure {
        md += &format!("\nFirst failed initial connection: `{e}`\n");
    }
    if let Some(e) = &f.first_failed_attempt {
        md += &format!("\nFirst failed reconnect attempt (other than refused): `{e}`\n");
    }
    md += &format!(
        "\nSteady state before the kill: {}\n\nRecovery (ready → drained; the new process's start-up is not in it): {}\n",
        cpu_line(&f.steady_cpu),
        cpu_line(&f.recovery_cpu)
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_quick_and_is_capped() {
        for _ in 0..200 {
            let first = backoff(0);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(250));
            let third = backoff(2);
            assert!(third >= Duration::from_millis(200) && third < Duration::from_millis(400));
            assert!(backoff(30) <= BACKOFF_CAP);
        }
    }

    #[test]
    fn frames_update_the_resume_position() {
        let run = 9;
        let mut st = State::default();
        let (mut resync, mut new) = (false, 0);
        let mut feed = |st: &mut State, frame: &str, now: u64| {
            on_frame(st, run, frame.as_bytes(), now, &mut resync, &mut new);
        };
        let event = |pos: i64, seq: u64| {
            format!(
                r#"{{"type":"event","topic":"queue","position":{pos},"event":"assignment.created","assignment":{{"customer_name":"{}"}},"old_status":null}}"#,
                crate::load::marker(run, seq, 1)
            )
        };
        feed(
            &mut st,
            r#"{"type":"subscribed","id":"s","topic":"queue","position":40}"#,
            1,
        );
        assert_eq!(st.last, 40);
        feed(&mut st, &event(41, 0), 2);
        feed(&mut st, &event(41, 0), 3);
        assert_eq!((st.last, st.dups, st.out_of_order), (41, 1, 1));
        st.resubscribed_us = 5;
        feed(
            &mut st,
            r#"{"type":"resync","topic":"queue","reason":"x"}"#,
            6,
        );
        assert_eq!(st.resync_since, Some(41));
        feed(
            &mut st,
            r#"{"type":"subscribed","id":"r","topic":"queue","position":90}"#,
            7,
        );
        assert_eq!((st.last, st.snapshot_us), (90, 7));
        assert_eq!(st.covered, vec![(41, 90)]);
        feed(
            &mut st,
            r#"{"type":"error","code":"unavailable","message":"retry"}"#,
            8,
        );
        feed(&mut st, &event(91, 3), 9);
        assert_eq!((st.unavailable, st.resyncs), (1, 1));
        assert_eq!(st.after, vec![(91, 9)]);
        assert!(resync);
        assert_eq!(new, 2);
        assert_eq!(frame_position(br#"{"position":987,"x":1}"#), Some(987));
    }

    #[test]
    fn a_mechanic_is_live_once_it_holds_what_was_committed_before_ready() {
        let world = World {
            workshops: vec![Uuid::new_v4()],
            mechanics: vec![(Uuid::new_v4(), Some(0)), (Uuid::new_v4(), None)],
        };
        // seq 0: general, before the kill; 1: workshop 0, while down; 2: general, while
        // down; 3: general, after ready.
        let by_seq = vec![
            Some(Audience::General),
            Some(Audience::Workshop(0)),
            Some(Audience::General),
            Some(Audience::General),
        ];
        let logged = vec![
            Some((10, 100)),
            Some((11, 200)),
            Some((12, 210)),
            Some((13, 400)),
        ];
        let ready_wall = 300;
        let mech = |who: usize, received: &[(u64, i64, u64)]| {
            let mut st = State {
                storm_since: Some(10),
                resubscribed_us: 1_000,
                ..State::default()
            };
            for &(seq, pos, t) in received {
                st.seen.insert(seq);
                if pos > 10 {
                    st.after.push((pos, t));
                }
            }
            Mech {
                who,
                token: String::new(),
                ws: None,
                st,
            }
        };
        let full = mech(
            0,
            &[(0, 10, 0), (1, 11, 1_500), (2, 12, 1_700), (3, 13, 2_500)],
        );
        let v = judge(&full, &world, &by_seq, &logged, ready_wall);
        assert_eq!((v.expected, v.lost, v.unexpected, v.needed), (4, 0, 0, 2));
        assert_eq!(v.live_us, Some(1_700));
        // The freelancer may not see seq 1; it misses seq 2.
        let leaky = mech(1, &[(0, 10, 0), (1, 11, 1_500), (3, 13, 2_500)]);
        let v = judge(&leaky, &world, &by_seq, &logged, ready_wall);
        assert_eq!((v.expected, v.lost, v.unexpected), (3, 1, 1));
        assert_eq!(v.live_us, None);
    }
}

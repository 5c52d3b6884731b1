//! One mechanic of the reconnect storm: a connection that comes back. It connects once,
//! reads, and whenever its socket ends reconnects with jittered exponential backoff and
//! `since` = the last position it received, as a real client would; after a `resync` it
//! takes a snapshot. Event frames are recognised by a prefix and their marker and position
//! found by substring scans; only the rare control frames are parsed.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::clients::event_position;
use crate::load::find_marker;
use crate::stats::{now_us, Seen, MAX_SEQ};
use crate::ws::{WsConn, WsTarget};

/// Receive buffer per connection; it grows for a replay burst.
const CONN_BUF: usize = 4 << 10;
/// First reconnect delay after the socket ends: uniform in this range (ms).
pub(super) const FIRST_DELAY_MS: (f64, f64) = (50.0, 250.0);
/// Later delays: `BACKOFF_BASE · 2^attempt`, at most `BACKOFF_CAP`, times a uniform jitter
/// in [0.5, 1).
pub(super) const BACKOFF_BASE: Duration = Duration::from_millis(100);
pub(super) const BACKOFF_CAP: Duration = Duration::from_secs(1);
/// One connection attempt (TCP, handshake, auth, subscribe) may take this long.
pub(super) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection shares.
pub(super) struct Shared {
    pub(super) target: WsTarget,
    pub(super) run: u32,
    /// `now_us()` just before the SIGKILL; 0 until then.
    pub(super) kill_us: AtomicU64,
    /// Bounds the initial set-up only.
    pub(super) open: Semaphore,
    /// Initial set-ups finished (subscribed or failed).
    pub(super) initial_done: AtomicUsize,
    pub(super) initial_ok: AtomicUsize,
    /// Mechanics subscribed again after the kill.
    pub(super) resubscribed: AtomicUsize,
    /// Distinct events of this run received, all mechanics together (for the drain).
    pub(super) distinct: AtomicU64,
}

impl Shared {
    fn after_kill(&self, t: u64) -> bool {
        let k = self.kill_us.load(Ordering::Relaxed);
        k != 0 && t >= k
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum EndKind {
    /// The server sent a close frame with this code (or none in the frame).
    Close(Option<u16>),
    /// The socket ended without a close frame (what a killed server leaves).
    Dropped,
    /// Read error or protocol error.
    Error,
}

impl EndKind {
    pub(super) fn label(self) -> String {
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
pub(super) struct State {
    /// The position to resume from: the last event's, or the subscription's start.
    pub(super) last: i64,
    pub(super) subscribed_once: bool,
    pub(super) initial_failure: Option<String>,
    pub(super) seen: Seen,
    pub(super) dups: u64,
    pub(super) foreign: u64,
    pub(super) out_of_order: u64,
    pub(super) ends: Vec<EndKind>,
    /// When it noticed its socket end after the kill.
    pub(super) dropped_us: u64,
    /// Connection attempts started after the kill, until it was subscribed again.
    pub(super) attempts: u32,
    pub(super) refused: u32,
    pub(super) timeouts: u32,
    pub(super) other_failures: u32,
    pub(super) first_failure: Option<String>,
    /// When the attempt that re-subscribed started (its TCP connect).
    pub(super) won_attempt_us: u64,
    /// First WebSocket handshake completed after the kill.
    pub(super) connected_us: u64,
    /// First `subscribed` after the kill, and the `since` it resumed from.
    pub(super) resubscribed_us: u64,
    pub(super) storm_since: Option<i64>,
    /// `subscribed` of a snapshot subscription after a `resync` that followed the kill.
    pub(super) snapshot_us: u64,
    /// Events (position, receipt) received after the first re-subscription.
    pub(super) after: Vec<(i64, u64)>,
    pub(super) resyncs: u32,
    /// `resync` received, snapshot subscription asked for: the `since` it replaced.
    pub(super) resync_since: Option<i64>,
    /// Position ranges `(since, snapshot]` a snapshot stood in for after a `resync`.
    pub(super) covered: Vec<(i64, i64)>,
    pub(super) snapshots: u32,
    pub(super) unavailable: u32,
    pub(super) other_errors: Vec<String>,
}

/// One mechanic: a connection that comes back.
pub(super) struct Mech {
    pub(super) who: usize,
    pub(super) token: String,
    pub(super) ws: Option<WsConn>,
    pub(super) st: State,
}

/// Why an attempt failed.
pub(super) enum Fail {
    Refused,
    /// An `error` frame with this code.
    Code(String),
    Other(String),
}

/// Counts one frame. Sets `resync` when the server told us to take a snapshot; `new` counts
/// events of this run seen for the first time.
pub(super) fn on_frame(
    st: &mut State,
    run: u32,
    payload: &[u8],
    now: u64,
    resync: &mut bool,
    new: &mut u64,
) {
    if payload.starts_with(br#"{"type":"event""#) {
        let position = event_position(payload);
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

pub(super) fn error_code(st: &mut State, code: &str) {
    if code == "unavailable" {
        st.unavailable += 1;
    } else if st.other_errors.len() < 4 {
        st.other_errors.push(code.to_owned());
    }
}

/// Mechanics that share one source address.
pub(super) const MECHANICS_PER_ADDRESS: usize = 100;

/// The loopback address mechanic `who` connects from, when the target is IPv4: 127.1.x.y, one
/// per [`MECHANICS_PER_ADDRESS`] mechanics, as clients come from many addresses. From one
/// address, the reconnects after the kill reused ports of connections the killed process left
/// in TIME_WAIT on the same address pair (10,000 of them in 28,000 ephemeral ports); Linux
/// answers such a SYN with an ACK while nothing listens, and each of those clients waited a
/// second for its retransmission, an artefact of loopback, not of the server.
pub(super) fn source(target: &WsTarget, who: usize) -> Option<IpAddr> {
    if !target.addr.is_ipv4() {
        return None;
    }
    let n = who / MECHANICS_PER_ADDRESS + 1;
    Some(IpAddr::V4(std::net::Ipv4Addr::new(
        127,
        1,
        u8::try_from(n >> 8).unwrap_or(u8::MAX),
        (n & 0xff) as u8,
    )))
}

/// Connect, authenticate, subscribe to `queue` (from `since` when given). Returns the
/// connection, when its handshake completed, and the subscription's position. Whatever
/// follows `subscribed` stays in the connection's buffer for the read loop.
pub(super) async fn attempt(
    target: &WsTarget,
    from: Option<IpAddr>,
    token: &str,
    since: Option<i64>,
) -> Result<(WsConn, u64, i64), Fail> {
    let mut ws = match WsConn::connect(target, from, CONN_BUF, rand::random()).await {
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

pub(super) async fn reply(ws: &mut WsConn, kind: &str) -> Result<serde_json::Value, Fail> {
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
pub(super) fn backoff(k: u32) -> Duration {
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
pub(super) async fn mechanic(m: &mut Mech, sh: &Shared) {
    {
        let _permit = sh.open.acquire().await;
        match tokio::time::timeout(
            ATTEMPT_TIMEOUT,
            attempt(&sh.target, source(&sh.target, m.who), &m.token, None),
        )
        .await
        {
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
pub(super) async fn read(ws: &mut WsConn, st: &mut State, sh: &Shared) -> EndKind {
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
pub(super) async fn reconnect(m: &mut Mech, sh: &Shared) {
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
        let started_us = now_us();
        let r = tokio::time::timeout(
            ATTEMPT_TIMEOUT,
            attempt(&sh.target, source(&sh.target, m.who), &m.token, since),
        )
        .await;
        let failure = match r {
            Ok(Ok((ws, connected_us, position))) => {
                let now = now_us();
                if storm {
                    st.won_attempt_us = started_us;
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
pub(super) async fn group(
    mut mechs: Vec<Mech>,
    sh: Arc<Shared>,
    stop: CancellationToken,
) -> Vec<Mech> {
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
        assert_eq!(event_position(br#"{"position":987,"x":1}"#), Some(987));
    }
}

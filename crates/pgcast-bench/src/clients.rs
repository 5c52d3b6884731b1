//! The read side: many WebSocket connections per task, each frame looked at with a prefix
//! check and a substring search (never a JSON parse).
//!
//! ```text
//! open(): connect ▸ auth ▸ ready ▸ subscribe ▸ subscribed     (setup, bounded concurrency)
//! Readers: G tasks, each polling its connections through one FuturesUnordered
//!          read() ▸ cut frames ▸ marker → latency, seq → bit set ▸ progress counter
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::{bail, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use memchr::memmem::Finder;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::jsonptr::Pointer;
use crate::load::find_marker;
use crate::stats::{now_us, Histogram, Percentiles, Seen, MAX_SEQ};
use crate::ws::{WsConn, WsTarget};

/// How long one connection's set-up (connect, auth, subscribe) may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How frames are recognised as events.
#[derive(Debug, Clone)]
pub(crate) enum Mode {
    /// pgcast protocol v1: an event frame starts with `{"type":"event"`.
    Pgcast,
    /// Any relay: a frame is an event when this pointer resolves in it.
    Raw(Pointer),
}

/// How one connection is set up.
#[derive(Debug, Clone)]
pub(crate) enum Setup {
    /// pgcast: authenticate, then optionally subscribe.
    Pgcast {
        token: String,
        topic: Option<String>,
        since: Option<i64>,
    },
    /// Another server: optionally send one text frame after connecting.
    Raw { first_frame: Option<String> },
}

/// What one reader saw.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Event frames, duplicates included.
    pub(crate) events: u64,
    /// Event frames with a marker of another run or none.
    pub(crate) foreign: u64,
    pub(crate) dups: u64,
    pub(crate) out_of_order: u64,
    pub(crate) other_frames: u64,
    pub(crate) last_position: i64,
    pub(crate) seen: Seen,
    pub(crate) hist: Option<Box<Histogram>>,
    pub(crate) first_us: u64,
    pub(crate) last_us: u64,
    /// Why the reader stopped early (connection error, server close).
    pub(crate) ended: Option<String>,
    /// The first `error` frame received.
    pub(crate) error_frame: Option<String>,
}

impl Tally {
    /// Counts one event carrying `payload`, received at `now`.
    pub(crate) fn event(&mut self, run: u32, payload: &[u8], now: u64) {
        self.events += 1;
        if self.first_us == 0 {
            self.first_us = now;
        }
        self.last_us = now;
        match find_marker(payload) {
            Some(m) if m.run == run && m.seq < MAX_SEQ => {
                if self.seen.insert(m.seq) {
                    self.hist
                        .get_or_insert_with(Box::default)
                        .record(now.saturating_sub(m.t_us));
                } else {
                    self.dups += 1;
                }
            }
            _ => self.foreign += 1,
        }
    }
}

/// One connection of a reader group.
pub(crate) struct Conn {
    ws: Option<WsConn>,
    /// Index of the subscriber this connection stands for (e.g. the mechanic).
    pub(crate) who: usize,
    pub(crate) tally: Tally,
}

/// The value after `"position":` (event, `subscribed` and `snapshot` frames), by a scan.
pub(crate) fn event_position(frame: &[u8]) -> Option<i64> {
    static KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""position":"#));
    let i = KEY.find(frame)? + KEY.needle().len();
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

fn on_frame(t: &mut Tally, mode: &Mode, run: u32, payload: &[u8], now: u64) -> bool {
    let is_event = match mode {
        Mode::Pgcast => payload.starts_with(br#"{"type":"event""#),
        Mode::Raw(pointer) => pointer.lookup(payload).is_some(),
    };
    if !is_event {
        t.other_frames += 1;
        if t.error_frame.is_none() && memchr::memmem::find(payload, br#""error""#).is_some() {
            t.error_frame =
                Some(String::from_utf8_lossy(&payload[..payload.len().min(300)]).into());
        }
        return false;
    }
    if let Mode::Pgcast = mode {
        if let Some(p) = event_position(payload) {
            if p <= t.last_position {
                t.out_of_order += 1;
            }
            t.last_position = p;
        }
    }
    t.event(run, payload, now);
    true
}

async fn setup(target: &WsTarget, setup: &Setup, buf: usize, seed: u32) -> Result<WsConn> {
    let mut ws = WsConn::connect(target, None, buf, seed).await?;
    match setup {
        Setup::Raw { first_frame } => {
            if let Some(text) = first_frame {
                ws.send_text(text).await?;
            }
        }
        Setup::Pgcast {
            token,
            topic,
            since,
        } => {
            ws.send_text(&serde_json::json!({"type": "auth", "token": token}).to_string())
                .await?;
            expect_reply(&mut ws, "ready").await?;
            if let Some(topic) = topic {
                let mut sub = serde_json::json!({"type": "subscribe", "id": "b", "topic": topic});
                if let Some(since) = since {
                    sub["since"] = (*since).into();
                }
                ws.send_text(&sub.to_string()).await?;
                expect_reply(&mut ws, "subscribed").await?;
            }
        }
    }
    Ok(ws)
}

async fn expect_reply(ws: &mut WsConn, kind: &str) -> Result<()> {
    loop {
        let Some(msg) = ws.next_message().await? else {
            bail!("closed before {kind} (close code {:?})", ws.close_code);
        };
        let v: serde_json::Value = serde_json::from_slice(&msg)?;
        match v["type"].as_str() {
            Some(t) if t == kind => return Ok(()),
            Some("error") => bail!("error instead of {kind}: {v}"),
            _ => {}
        }
    }
}

/// Opens one connection per `(who, setup)`, spread over `groups` groups, at most
/// `concurrency` set-ups in flight. Failed set-ups are kept, with the reason, for the report.
pub(crate) async fn open(
    target: &WsTarget,
    specs: Vec<(usize, Setup)>,
    groups: usize,
    concurrency: usize,
    buf: usize,
) -> Vec<Vec<Conn>> {
    let groups = groups.max(1);
    let per_group = (concurrency / groups).max(1);
    let mut split: Vec<Vec<(usize, Setup)>> = (0..groups).map(|_| Vec::new()).collect();
    for (i, spec) in specs.into_iter().enumerate() {
        split[i % groups].push(spec);
    }
    let tasks: Vec<JoinHandle<Vec<Conn>>> = split
        .into_iter()
        .map(|specs| {
            let target = target.clone();
            tokio::spawn(async move {
                futures::stream::iter(specs)
                    .map(|(who, s)| {
                        let target = &target;
                        async move {
                            let seed = rand::random::<u32>();
                            let r =
                                tokio::time::timeout(SETUP_TIMEOUT, setup(target, &s, buf, seed))
                                    .await
                                    .unwrap_or_else(|_| Err(anyhow::anyhow!("set-up timed out")));
                            match r {
                                Ok(ws) => Conn {
                                    ws: Some(ws),
                                    who,
                                    tally: Tally::default(),
                                },
                                Err(e) => Conn {
                                    ws: None,
                                    who,
                                    tally: Tally {
                                        ended: Some(format!("set-up failed: {e:#}")),
                                        ..Tally::default()
                                    },
                                },
                            }
                        }
                    })
                    .buffer_unordered(per_group)
                    .collect::<Vec<Conn>>()
                    .await
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or_default());
    }
    out
}

/// Reader groups running until [`finish`](Self::finish).
pub(crate) struct Readers {
    tasks: Vec<JoinHandle<Vec<Conn>>>,
    stop: CancellationToken,
    /// Event frames received so far by all connections.
    pub(crate) progress: Arc<AtomicU64>,
}

impl Readers {
    /// Starts reading on every connection of `groups`; frames count for run `run`.
    pub(crate) fn start(groups: Vec<Vec<Conn>>, mode: Mode, run: u32) -> Readers {
        let stop = CancellationToken::new();
        let progress = Arc::new(AtomicU64::new(0));
        let mode = Arc::new(mode);
        let tasks = groups
            .into_iter()
            .map(|conns| {
                let stop = stop.clone();
                let progress = progress.clone();
                let mode = mode.clone();
                tokio::spawn(run_group(conns, mode, run, progress, stop))
            })
            .collect();
        Readers {
            tasks,
            stop,
            progress,
        }
    }

    pub(crate) fn received(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }

    /// Stops reading and returns every connection with its tally (the sockets stay open
    /// until the connections are dropped).
    pub(crate) async fn finish(self) -> Vec<Conn> {
        self.stop.cancel();
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.unwrap_or_default());
        }
        all
    }
}

async fn run_group(
    mut conns: Vec<Conn>,
    mode: Arc<Mode>,
    run: u32,
    progress: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Vec<Conn> {
    {
        let mode: &Mode = &mode;
        let progress: &AtomicU64 = &progress;
        let mut loops: FuturesUnordered<_> = conns
            .iter_mut()
            .map(|c| read_loop(c, mode, run, progress))
            .collect();
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                done = loops.next() => if done.is_none() {
                    stop.cancelled().await;
                    break;
                },
            }
        }
    }
    conns
}

async fn read_loop(c: &mut Conn, mode: &Mode, run: u32, progress: &AtomicU64) {
    let Some(ws) = c.ws.as_mut() else {
        return;
    };
    let tally = &mut c.tally;
    loop {
        match ws.fill().await {
            Ok(true) => {}
            Ok(false) => {
                tally.ended = Some("connection closed by the server".into());
                return;
            }
            Err(e) => {
                tally.ended = Some(format!("read error: {e:#}"));
                return;
            }
        }
        let now = now_us();
        let mut events = 0;
        let open = ws.drain(|_, payload| {
            if on_frame(tally, mode, run, payload, now) {
                events += 1;
            }
        });
        if events > 0 {
            progress.fetch_add(events, Ordering::Relaxed);
        }
        let flushed = ws.flush_replies().await;
        match (open, flushed) {
            (Ok(true), Ok(())) => {}
            (Ok(false), _) => {
                tally.ended = Some(format!(
                    "closed by the server, code {:?}",
                    ws.close_code.flatten()
                ));
                return;
            }
            (Err(e), _) | (_, Err(e)) => {
                tally.ended = Some(format!("protocol error: {e:#}"));
                return;
            }
        }
    }
}

/// Summary of a set of readers against their expected sets.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ReaderReport {
    pub(crate) connections: usize,
    pub(crate) connected: usize,
    /// Connections that ended before the scenario did (closed by the server, errors).
    pub(crate) ended_early: usize,
    /// Distinct events of this run received, summed over connections.
    pub(crate) received: u64,
    pub(crate) expected: u64,
    /// Expected but not received after the drain.
    pub(crate) lost: u64,
    /// Received but not visible to that subscriber (a leak) or never committed.
    pub(crate) unexpected: u64,
    pub(crate) duplicates: u64,
    pub(crate) out_of_order: u64,
    /// Event frames without this run's marker.
    pub(crate) foreign: u64,
    pub(crate) latency: Percentiles,
    /// Distinct events received per second, from the first write to the last frame.
    pub(crate) delivered_per_s: f64,
    /// Seconds from the end of the writes to the last frame.
    pub(crate) tail_s: f64,
    pub(crate) first_problem: Option<String>,
}

/// Builds the report of `tallies`: `expected(who)` events each, `allowed(who, seq)` tells a
/// frame that may be received from a leak.
pub(crate) fn report<'a>(
    tallies: impl IntoIterator<Item = (usize, bool, &'a Tally)>,
    expected: impl Fn(usize) -> u64,
    allowed: impl Fn(usize, u64) -> bool,
    writes_started_us: u64,
    writes_ended_us: u64,
) -> ReaderReport {
    let mut r = ReaderReport::default();
    let mut hist = Histogram::default();
    let mut last_us = 0;
    for (who, connected, t) in tallies {
        r.connections += 1;
        if connected {
            r.connected += 1;
        }
        if t.ended.is_some() {
            r.ended_early += 1;
            if r.first_problem.is_none() {
                r.first_problem = t.ended.clone();
            }
        }
        if r.first_problem.is_none() {
            r.first_problem = t.error_frame.clone();
        }
        let mut got = 0;
        for seq in t.seen.iter() {
            if allowed(who, seq) {
                got += 1;
            } else {
                r.unexpected += 1;
            }
        }
        let exp = expected(who);
        r.received += got;
        r.expected += exp;
        r.lost += exp.saturating_sub(got);
        r.duplicates += t.dups;
        r.out_of_order += t.out_of_order;
        r.foreign += t.foreign;
        if let Some(h) = &t.hist {
            hist.merge(h);
        }
        last_us = last_us.max(t.last_us);
    }
    r.latency = hist.summary();
    if last_us > writes_started_us {
        r.delivered_per_s =
            (r.received as f64 / ((last_us - writes_started_us) as f64 / 1e6)).round();
    }
    r.tail_s = crate::stats::round3(last_us.saturating_sub(writes_ended_us) as f64 / 1e6);
    r
}

impl Conn {
    pub(crate) fn connected(&self) -> bool {
        self.ws.is_some()
    }
}

/// The connections still open, with fresh tallies, spread over `groups` groups: for the next
/// step of a sweep on the same sockets.
pub(crate) fn regroup(conns: Vec<Conn>, groups: usize) -> Vec<Vec<Conn>> {
    let groups = groups.max(1);
    let mut out: Vec<Vec<Conn>> = (0..groups).map(|_| Vec::new()).collect();
    let live = conns
        .into_iter()
        .filter(|c| c.ws.is_some() && c.tally.ended.is_none());
    for (i, mut c) in live.enumerate() {
        c.tally = Tally::default();
        out[i % groups].push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_classified_without_parsing() {
        let mut t = Tally::default();
        let run = 7;
        let frame = format!(
            r#"{{"type":"event","topic":"queue","position":12,"event":"assignment.created","assignment":{{"customer_name":"{}"}},"old_status":null}}"#,
            crate::load::marker(run, 4, 10)
        );
        assert!(on_frame(
            &mut t,
            &Mode::Pgcast,
            run,
            frame.as_bytes(),
            1_010
        ));
        assert!(!on_frame(
            &mut t,
            &Mode::Pgcast,
            run,
            br#"{"type":"pong","id":null}"#,
            1_011
        ));
        assert!(on_frame(
            &mut t,
            &Mode::Pgcast,
            run,
            frame.as_bytes(),
            1_020
        ));
        assert_eq!(
            (t.events, t.dups, t.out_of_order, t.other_frames),
            (2, 1, 1, 1)
        );
        assert_eq!(t.last_position, 12);
        assert_eq!(t.hist.as_ref().unwrap().quantile(1.0), 1_000);

        let raw = Mode::Raw(Pointer::parse("/row/id").unwrap());
        let payload = format!(
            r#"{{"op": "insert", "old": null, "row": {{"id": "x", "customer_name": "{}"}}, "position": 3}}"#,
            crate::load::marker(run, 5, 0)
        );
        assert!(on_frame(&mut t, &raw, run, payload.as_bytes(), 50));
        assert!(!on_frame(&mut t, &raw, run, b"welcome", 50));
        assert_eq!(t.seen.iter().collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(event_position(br#"{"position":987,"x":1}"#), Some(987));
    }
}

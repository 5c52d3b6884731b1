//! Soak (issue 7): steady load with connect/disconnect churn against the built `pgcast serve`,
//! failing on growth of memory, file descriptors or tasks.
//!
//! For `PGCAST_SOAK_SECS` seconds (default 60, the CI run) against a fresh database whose log
//! already holds [`HISTORY`] events (so the server's replay window is full from the start):
//!
//! - a writer commits up to ~150 events/s (inserts, and updates moving assignments between
//!   statuses, mechanics and workshops), paced by an interval (~90/s under the CPU hog below);
//! - 50 long-lived subscribers (49 mechanics on `queue`, one service on `assignments`) keep
//!   receiving; at the end the service has received exactly the log's events since it
//!   subscribed, in order (no loss), and every mechanic received events and was never closed;
//! - churn tasks connect over and over (thousands of connections a minute): some authenticate
//!   with a bad token (refused with 1008), the others subscribe to 1–3 topics (live, with
//!   `since`, or with `snapshot:true`), read for a random short time and leave — with a close
//!   frame, by dropping the TCP connection (FIN), or by resetting it (RST). Other clients
//!   subscribe to everything, resume far back, and never read, until the server closes them
//!   (slow consumer, 4008): each waits for the server's side of its connection to close (with a
//!   deadline), then starts again; every one closed must have been closed as a slow consumer.
//!
//! The `pgcast serve` process is sampled: resident memory (`VmRSS` of `/proc/<pid>/status`),
//! open file descriptors (entries of `/proc/<pid>/fd`) and `pgcast_tokio_alive_tasks` of
//! `/metrics`. The baseline is taken after a warm-up of 20 % of the duration (long-lived
//! subscribers and the first churn in place). At the end the churn stops, `pgcast_connections`
//! must come back to the 50 long-lived subscribers, and the test fails if, over the baseline:
//!
//! - open file descriptors grew by more than 16,
//! - alive tokio tasks grew by more than 16,
//! - resident memory grew by more than max(16 MiB, 25 %).
//!
//! Each sample also counts the server's sockets in CLOSE-WAIT: TCP sockets of `/proc/net/tcp`
//! and `/proc/net/tcp6` in state `08` whose local port is the server's listening port (so only
//! the server's side of its own connections). A socket is in CLOSE-WAIT from the moment its
//! peer closed until pgcast closes it too; a connection task that does not notice its peer
//! leaving (stuck waiting on the database, or on a full queue) leaves them piling up, each with
//! its fd, task and buffers. Each sample shows the count, and what a background count every
//! [`CLOSE_WAIT_EVERY`] saw since the previous sample: the most at once and the longest one
//! socket stayed. The test fails if:
//!
//! - a sample in the second half of the run counts more than [`CLOSE_WAIT_RUN`] (closing slower
//!   than clients leave: a pile-up in the making),
//! - any socket stays in CLOSE-WAIT longer than [`CLOSE_WAIT_AGE`] (a peer the server did not
//!   notice leaving),
//! - once the churn stopped and the connections settled, more than [`CLOSE_WAIT_END`] remain.
//!
//! Samples (baseline, one every tenth of the duration, final) are printed, so a long run shows
//! the trend.
//!
//! ## Under contention (issue 12)
//!
//! The run competes for the CPU, as when another CPU-heavy job shares the machine: for its whole
//! duration the test keeps one busy-loop process per CPU it may use
//! (`std::thread::available_parallelism`) running at its own priority, so pgcast, PostgreSQL
//! and the clients only ever get a share of cores that are never idle. A busy loop is a `sh`
//! spinning on `kill -0 $PPID` (no new system dependency; it also ends by itself if the test
//! process dies without cleaning up); the loops are killed and reaped when the test ends,
//! passes or fails. Their CPU time, and pgcast's, are printed at the end.
//!
//! - `PGCAST_SOAK_HOG=0` runs without the busy loops (uncontended); any other value, or none,
//!   runs with them.
//!
//! The 30-minute run:
//!
//! ```text
//! PGCAST_SOAK_SECS=1800 cargo test --release -p pgcast --test soak -- --nocapture
//! ```

mod common;
mod running;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgcast_events::{Principal, Role};
use pgcast_testkit::oracle::{OPEN, STATUSES};
use pgcast_testkit::PgCluster;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use running::{sample, token_for, Next, Server, Ws, POLL, SECRET, WAIT};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Mechanics subscribed to `queue` for the whole run; with the service, the long-lived ones.
const MECHANICS: usize = 49;
const LONG_LIVED: usize = MECHANICS + 1;
/// Tasks connecting and leaving over and over.
const CHURN_TASKS: usize = 24;
/// Tasks whose clients subscribe and never read.
const NEVER_READERS: usize = 2;
/// The writer's pace: one change per tick, 1–2 events each (~160 events/s).
const WRITE_TICK: Duration = Duration::from_millis(8);
/// Assignments the writer keeps open (queued, offered, accepted) at most.
const OPEN_ROWS: usize = 300;
/// How long a churn client reads before leaving, drawn uniformly.
const READ_MIN: Duration = Duration::from_millis(30);
const READ_MAX: Duration = Duration::from_millis(400);
/// Events in the log before the run starts: closed assignments, committed in one statement
/// before anyone subscribes. The server's replay window (10,000 events by default) is then full
/// from the start, so its filling is not mistaken for growth after the baseline, and the
/// never-readers' resumes have history to replay.
const HISTORY: i64 = 10_000;
/// How far back a never-reader resumes `assignments`: a replay of ~5 MB, more than the
/// server's kernel send buffer takes for a socket (~2.8 MB on loopback, autotuned), so the
/// server's writes to it block at once and what comes next waits in its outgoing queue.
const NEVER_READER_BACK: i64 = 8_000;
/// The server's outgoing budget per connection in this test (`--outbound-bytes`): small, so a
/// never-reader is declared slow soon after its socket blocked, well within a CI run even when
/// the CPU hog and other work slow the writer down (~1.1 KB of frames per event reach a
/// never-reader: at 40 events/s, 512 KiB wait after ~12 s), and well before the server's other
/// limit for a peer that takes nothing (a write blocked for two heartbeat intervals, 40 s). The
/// long-lived and churn clients read, so the kernel's buffers (MBs on loopback) absorb their
/// stalls long before the budget counts. The default, 16 MiB, takes minutes.
const OUTBOUND_BYTES: &str = "512KiB";
/// How often a never-reader looks at the state of the server's side of its connection.
const NEVER_READER_LOOK: Duration = Duration::from_secs(1);
/// A never-reader the server has not closed after this long fails the test: the server closes
/// a never-reader once its budget is queued (about a minute at most at this load) or, at the
/// latest, when it missed pings for two heartbeat intervals (40 s, plus the next tick).
const NEVER_READER_LIMIT: Duration = Duration::from_secs(180);
/// Bound for the end of the run: churn tasks finishing, connections coming back to the
/// long-lived ones, the service catching up; never reached when things work.
const SETTLE: Duration = Duration::from_secs(60);

/// Growth over the baseline that fails the test.
const FD_GROWTH: i64 = 16;
const TASK_GROWTH: i64 = 16;
const RSS_GROWTH_MIN_KIB: i64 = 16 * 1024;
const RSS_GROWTH_FRACTION: f64 = 0.25;

/// How often the server's CLOSE-WAIT sockets are counted between samples.
const CLOSE_WAIT_EVERY: Duration = Duration::from_millis(500);
/// CLOSE-WAIT sockets allowed at a sample in the second half of the run. A client that leaves
/// with FIN (or a close frame) puts the server's socket in CLOSE-WAIT until its task notices,
/// and every churn task opens its next connection right away: with the server keeping up, each
/// of the [`CHURN_TASKS`] + [`NEVER_READERS`] clients has at most one such socket being closed
/// at a time, usually none (a hog can stall the server long enough for a second one). More than
/// twice that many means the server closes connections more slowly than the clients leave them:
/// they accumulate.
const CLOSE_WAIT_RUN: i64 = 2 * (CHURN_TASKS + NEVER_READERS) as i64;
/// Longest any server socket may stay in CLOSE-WAIT, at any time of the run. A connection task
/// that sees its peer leave drops the socket at once; the longest it may legitimately go on
/// (while writing a close frame, or waiting for a frame it was promised) is 10 s. Twice that
/// covers a hog stalling the server; a task that does not watch its peer keeps the socket for
/// as long as it waits (minutes, in the run that piled them up).
const CLOSE_WAIT_AGE: Duration = Duration::from_secs(20);
/// CLOSE-WAIT sockets allowed at the end, once the churn stopped, only the long-lived
/// subscribers (which never close) are connected, and the count had up to [`WAIT`] to fall. None
/// is expected: every churn connection's task has ended by then, and a task drops its socket
/// when it ends. The slack is for sockets no task holds: a client that left during its HTTP
/// upgrade is closed by the server's HTTP layer when it reads the end (at the latest at its
/// header-read deadline). A pile-up is hundreds.
const CLOSE_WAIT_END: i64 = 2;

/// The environment variable that turns the CPU hog off (`0`).
const HOG_VAR: &str = "PGCAST_SOAK_HOG";
/// One busy loop: a shell spinning until its parent, the test process, is gone.
const HOG_LOOP: &str = "while kill -0 $PPID 2>/dev/null; do :; done";

/// The people and places rows are given.
struct World {
    workshops: Vec<Uuid>,
    /// Mechanics rows are offered to, with their workshop.
    mechanics: Vec<(Uuid, Option<Uuid>)>,
    /// Sessions (id, customer) some rows belong to; customers follow them.
    sessions: Vec<(Uuid, Uuid)>,
}

impl World {
    fn new() -> World {
        let id = Uuid::new_v4;
        let workshops: Vec<Uuid> = (0..3).map(|_| id()).collect();
        let mechanics = (0..8)
            .map(|i| (id(), (i % 4 != 3).then(|| workshops[i % 3])))
            .collect();
        let sessions = (0..16).map(|_| (id(), id())).collect();
        World {
            workshops,
            mechanics,
            sessions,
        }
    }

    /// A status, mechanic and workshop for a row.
    fn placement(
        &self,
        rng: &mut StdRng,
        status: &'static str,
    ) -> (&'static str, Option<Uuid>, Option<Uuid>) {
        match rng.random_range(0..10) {
            // General: every mechanic's queue while queued.
            0..4 => (status, None, None),
            4..7 => (status, None, self.workshops.choose(rng).copied()),
            _ => {
                let (m, w) = *self.mechanics.choose(rng).expect("mechanics");
                (status, Some(m), w.filter(|_| rng.random_bool(0.5)))
            }
        }
    }

    fn session(&self, rng: &mut StdRng) -> Uuid {
        if rng.random_bool(0.05) {
            self.sessions.choose(rng).expect("sessions").0
        } else {
            Uuid::new_v4()
        }
    }
}

fn principal(user_id: Uuid, role: Role, workshop_id: Option<Uuid>) -> Principal {
    Principal {
        user_id,
        role,
        workshop_id,
    }
}

/// What the churn did, and anything unexpected it saw.
#[derive(Default)]
struct Stats {
    /// WebSocket upgrades that succeeded.
    connections: AtomicU64,
    refused_auth: AtomicU64,
    polite: AtomicU64,
    dropped_fin: AtomicU64,
    dropped_rst: AtomicU64,
    subscribed: AtomicU64,
    snapshots: AtomicU64,
    events: AtomicU64,
    /// Never-reading clients the server closed (4008, or the end of the connection).
    never_read_closed: AtomicU64,
    /// Of those, the ones that read the 4008 close frame (the others found the connection
    /// ended: the server gave up writing the frame into their full socket).
    never_read_4008: AtomicU64,
    /// Never-reading clients still open when the churn stopped (cut short, not a failure).
    never_read_open: AtomicU64,
    /// Connections that failed (refused, timed out): each fails the test.
    problems: Mutex<Vec<String>>,
}

impl Stats {
    fn problem(&self, p: String) {
        let mut problems = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        if problems.len() < 50 {
            problems.push(p);
        }
    }

    fn count(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------------
// The writer.

const INSERT: &str = "
    INSERT INTO session_assignments
        (session_id, mechanic_id, workshop_id, status, customer_name, vehicle_summary, concern)
    VALUES ($1, $2, $3, $4, 'Ana', '2014 VW Golf', 'a noise when braking')
    RETURNING id";

const UPDATE: &str = "
    UPDATE session_assignments a
    SET status = u.st, mechanic_id = u.m, workshop_id = u.w, updated_at = now()
    FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[]) AS u(id, st, m, w)
    WHERE a.id = u.id";

/// Commits changes every [`WRITE_TICK`] until `stop`; returns the events committed.
fn spawn_writer(
    client: Client,
    world: Arc<World>,
    stop: CancellationToken,
    committed: Arc<AtomicU64>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(rand::random());
        let mut open: Vec<Uuid> = Vec::new();
        let mut tick = tokio::time::interval(WRITE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let change = async {
                if open.len() < 20 || (open.len() < OPEN_ROWS && rng.random_bool(0.4)) {
                    let status = if rng.random_bool(0.8) {
                        "queued"
                    } else {
                        "offered"
                    };
                    let (status, m, w) = world.placement(&mut rng, status);
                    let session = world.session(&mut rng);
                    let row = client
                        .query_one(INSERT, &[&session, &m, &w, &status])
                        .await
                        .expect("insert");
                    open.push(row.get(0));
                    return 1;
                }
                let k = rng.random_range(1..=2);
                open.shuffle(&mut rng);
                let ids: Vec<Uuid> = open.split_off(open.len() - k);
                let (mut statuses, mut ms, mut ws) = (vec![], vec![], vec![]);
                for id in &ids {
                    let status = *STATUSES.choose(&mut rng).expect("statuses");
                    let (status, m, w) = world.placement(&mut rng, status);
                    statuses.push(status);
                    ms.push(m);
                    ws.push(w);
                    if OPEN.contains(&status) {
                        open.push(*id);
                    }
                }
                client
                    .execute(UPDATE, &[&ids, &statuses, &ms, &ws])
                    .await
                    .expect("update")
            };
            let events = tokio::time::timeout(WAIT, change)
                .await
                .expect("a change commits in time");
            committed.fetch_add(events, Ordering::Relaxed);
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Long-lived subscribers.

struct LongLived {
    name: String,
    /// `position` of the `subscribed` reply.
    from: i64,
    received: Arc<AtomicU64>,
    /// The last position received.
    last: Arc<AtomicI64>,
    task: JoinHandle<(Ws, Vec<i64>, Vec<String>)>,
}

/// Subscribes `who` to `topic` (live) and keeps reading until `stop`, recording the positions
/// (if `keep`) and anything unexpected.
async fn long_lived(
    addr: SocketAddr,
    name: String,
    who: Principal,
    topic: &'static str,
    ttl: Duration,
    keep: bool,
    stop: CancellationToken,
) -> LongLived {
    let mut ws = Ws::connect(addr, &token_for(SECRET.as_bytes(), &who, ttl)).await;
    let reply = ws.subscribe(topic, json!({})).await;
    let from = reply["position"].as_i64().expect("subscribed position");
    let received = Arc::new(AtomicU64::new(0));
    let last = Arc::new(AtomicI64::new(from));
    let task = {
        let (received, last, name) = (received.clone(), last.clone(), name.clone());
        tokio::spawn(async move {
            let mut positions = Vec::new();
            let mut problems = Vec::new();
            loop {
                let next = tokio::select! {
                    () = stop.cancelled() => break,
                    next = ws.next(WAIT) => next,
                };
                match next {
                    Next::Json(v) if v["type"] == "event" && v["topic"] == topic => {
                        let p = v["position"].as_i64().expect("position");
                        let before = last.swap(p, Ordering::Relaxed);
                        if p <= before {
                            problems.push(format!("{name}: position {p} after {before}"));
                        }
                        if keep {
                            positions.push(p);
                        }
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Next::Nothing => {}
                    other => {
                        problems.push(format!("{name}: {other:?}"));
                        if !matches!(other, Next::Json(_)) {
                            break;
                        }
                    }
                }
            }
            (ws, positions, problems)
        })
    };
    LongLived {
        name,
        from,
        received,
        last,
        task,
    }
}

// ---------------------------------------------------------------------------------------------
// Churn.

/// Sends a bad `auth` frame (or none) and expects `unauthorized` and close 1008.
async fn bad_auth(addr: SocketAddr, rng: &mut StdRng, stats: &Stats) -> Result<(), String> {
    let mut ws = Ws::open(addr).await?;
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let who = principal(Uuid::new_v4(), Role::Mechanic, None);
    let frame = match rng.random_range(0..4) {
        0 => {
            json!({"type": "auth", "token": token_for(b"not-the-secret-but-just-as-long-32b", &who, WAIT)})
        }
        1 => json!({"type": "auth", "token": "garbage.garbage.garbage"}),
        2 => json!({"type": "auth", "token": ""}),
        _ => json!({"type": "subscribe", "id": "q", "topic": "queue"}),
    };
    ws.try_send(frame.clone()).await?;
    match ws.next(WAIT).await {
        Next::Json(v) if v["type"] == "error" && v["code"] == "unauthorized" => {}
        other => return Err(format!("after {frame}: {other:?}, expected unauthorized")),
    }
    match ws.next(WAIT).await {
        Next::Close(Some(f)) if u16::from(f.code) == 1008 => {}
        other => return Err(format!("after {frame}: {other:?}, expected close 1008")),
    }
    stats.refused_auth.fetch_add(1, Ordering::Relaxed);
    ws.close().await;
    Ok(())
}

/// One client: authenticates, subscribes to 1–3 topics, reads for a while and leaves.
async fn churn_once(
    addr: SocketAddr,
    world: &World,
    head: &AtomicI64,
    rng: &mut StdRng,
    stats: &Stats,
) -> Result<(), String> {
    if rng.random_bool(0.1) {
        return bad_auth(addr, rng, stats).await;
    }
    // Who, and the topics they may follow (the first may take a snapshot).
    let (who, topics): (Principal, Vec<(String, bool)>) = match rng.random_range(0..10) {
        0..5 => {
            let workshop = world
                .workshops
                .choose(rng)
                .copied()
                .filter(|_| rng.random_bool(0.7));
            let me = principal(Uuid::new_v4(), Role::Mechanic, workshop);
            let mut topics = vec![
                ("queue".to_owned(), true),
                (format!("mechanic:{}", me.user_id), false),
            ];
            if let Some(w) = workshop {
                topics.push((format!("workshop:{w}"), false));
            }
            (me, topics)
        }
        5..8 => {
            let m = world.mechanics.choose(rng).expect("mechanics").0;
            let w = world.workshops.choose(rng).expect("workshops");
            let s = world.sessions.choose(rng).expect("sessions").0;
            (
                principal(Uuid::new_v4(), Role::Service, None),
                vec![
                    ("assignments".to_owned(), true),
                    (format!("mechanic:{m}"), false),
                    (format!("workshop:{w}"), false),
                    (format!("session:{s}"), true),
                ],
            )
        }
        _ => {
            let (session, customer) = *world.sessions.choose(rng).expect("sessions");
            (
                principal(customer, Role::Customer, None),
                vec![(format!("session:{session}"), true)],
            )
        }
    };
    let mut ws = Ws::open(addr).await?;
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let token = token_for(SECRET.as_bytes(), &who, Duration::from_secs(600));
    ws.try_send(json!({"type": "auth", "token": token})).await?;
    match ws.next(WAIT).await {
        Next::Json(v) if v["type"] == "ready" => {}
        other => return Err(format!("auth of {:?}: {other:?}", who.role)),
    }
    let n = rng.random_range(1..=3).min(topics.len());
    for (topic, may_snapshot) in topics.choose_multiple(rng, n) {
        let mut frame = json!({"type": "subscribe", "id": topic, "topic": topic});
        match rng.random_range(0..3) {
            0 => {}
            1 => {
                let since = (head.load(Ordering::Relaxed) - rng.random_range(0..300)).max(0);
                frame["since"] = json!(since);
            }
            _ if *may_snapshot => frame["snapshot"] = json!(true),
            _ => {}
        }
        ws.try_send(frame).await?;
    }
    // Read for a while: only protocol frames, and no close.
    let until = Instant::now() + rng.random_range(READ_MIN..=READ_MAX);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match ws.next(left).await {
            Next::Nothing => break,
            Next::Json(v) => match v["type"].as_str() {
                Some("subscribed") => {
                    stats.subscribed.fetch_add(1, Ordering::Relaxed);
                }
                Some("snapshot") => {
                    stats.snapshots.fetch_add(1, Ordering::Relaxed);
                }
                Some("event") => {
                    stats.events.fetch_add(1, Ordering::Relaxed);
                }
                // A snapshot or replay the database could not answer in time is allowed.
                Some("error") if v["code"] == "unavailable" => {}
                _ => return Err(format!("{:?} got {v}", who.role)),
            },
            other => return Err(format!("{:?} while reading: {other:?}", who.role)),
        }
    }
    match rng.random_range(0..4) {
        0 | 1 => {
            ws.close().await;
            stats.polite.fetch_add(1, Ordering::Relaxed);
        }
        2 => {
            ws.abort(false);
            stats.dropped_fin.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            ws.abort(true);
            stats.dropped_rst.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

fn spawn_churn(
    addr: SocketAddr,
    world: Arc<World>,
    head: Arc<AtomicI64>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(rand::random());
        while !stop.is_cancelled() {
            if let Err(p) = churn_once(addr, &world, &head, &mut rng, &stats).await {
                stats.problem(p);
            }
        }
    })
}

/// A service that subscribes to everything it can (so most events are queued for it more than
/// once), resumes `assignments` from a little before the head, and never reads: the server must
/// close it. It holds the connection until the server's side of it leaves ESTABLISHED (the
/// server closed it), then reads what is left to see how it ended. A connection still open when
/// the churn stops is counted, not failed; one the server has not closed after
/// [`NEVER_READER_LIMIT`] fails the test.
fn spawn_never_reader(
    addr: SocketAddr,
    world: Arc<World>,
    head: Arc<AtomicI64>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let attempt = async {
                let mut ws = Ws::open_with_recv_buffer(addr, 4096).await?;
                stats.connections.fetch_add(1, Ordering::Relaxed);
                let port = ws
                    .raw()
                    .local_addr()
                    .map_err(|e| format!("never-reader's address: {e}"))?
                    .port();
                let who = principal(Uuid::new_v4(), Role::Service, None);
                let token = token_for(SECRET.as_bytes(), &who, Duration::from_secs(600));
                ws.try_send(json!({"type": "auth", "token": token})).await?;
                match ws.next(WAIT).await {
                    Next::Json(v) if v["type"] == "ready" => {}
                    other => return Err(format!("never-reader auth: {other:?}")),
                }
                let mut topics = vec!["assignments".to_owned()];
                topics.extend(world.workshops.iter().map(|w| format!("workshop:{w}")));
                topics.extend(world.mechanics.iter().map(|(m, _)| format!("mechanic:{m}")));
                topics.extend(world.sessions.iter().map(|(s, _)| format!("session:{s}")));
                for topic in &topics {
                    ws.try_send(json!({"type": "subscribe", "id": topic, "topic": topic}))
                        .await?;
                }
                // Replaces the live `assignments` subscription with a replay.
                let since = (head.load(Ordering::Relaxed) - NEVER_READER_BACK).max(0);
                ws.try_send(json!({"type": "subscribe", "id": "replay", "topic": "assignments", "since": since}))
                    .await?;
                // Hold until the server closes its side (or the churn stops).
                let held = Instant::now();
                let mut look = tokio::time::interval(NEVER_READER_LOOK);
                let closed = loop {
                    tokio::select! {
                        () = stop.cancelled() => break server_closed(addr.port(), port),
                        _ = look.tick() => {}
                    }
                    if server_closed(addr.port(), port) {
                        break true;
                    }
                    if held.elapsed() > NEVER_READER_LIMIT {
                        return Err(format!(
                            "a never-reader (port {port}) still open after {NEVER_READER_LIMIT:?}"
                        ));
                    }
                };
                if !closed {
                    stats.never_read_open.fetch_add(1, Ordering::Relaxed);
                    ws.abort(false);
                    return Ok(());
                }
                // What is left: what the server's kernel still holds for it (a few MB at most),
                // then a 4008 close frame, or the end of the connection if the server gave up
                // on writing one.
                let deadline = Instant::now() + WAIT;
                loop {
                    match ws
                        .next(deadline.saturating_duration_since(Instant::now()))
                        .await
                    {
                        Next::Json(_) => continue,
                        Next::Close(Some(f)) if u16::from(f.code) == 4008 => {
                            stats.never_read_4008.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Next::Close(f) => return Err(format!("never-reader closed with {f:?}")),
                        Next::Ended => break,
                        Next::Nothing => {
                            return Err(format!(
                                "a never-reader (port {port}) whose server side closed did not \
                                 end within {WAIT:?} of reading"
                            ))
                        }
                    }
                }
                stats.never_read_closed.fetch_add(1, Ordering::Relaxed);
                ws.abort(false);
                Ok(())
            };
            if let Err(p) = attempt.await {
                stats.problem(p);
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The CPU hog.

/// Busy loops competing for every CPU the test may use; killed and reaped when dropped (the
/// test passing, or failing and unwinding).
struct Hog {
    children: Vec<std::process::Child>,
}

impl Hog {
    /// One busy loop per CPU, unless [`HOG_VAR`] is `0`.
    fn start() -> Hog {
        let mut hog = Hog {
            children: Vec::new(),
        };
        if std::env::var(HOG_VAR).is_ok_and(|v| v.trim() == "0") {
            return hog;
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        for _ in 0..cpus {
            // Pushed one by one: a failure to start the next still kills the ones started.
            let child = std::process::Command::new("sh")
                .args(["-c", HOG_LOOP])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start a busy loop (sh)");
            hog.children.push(child);
        }
        hog
    }

    fn describe(&self) -> String {
        if self.children.is_empty() {
            format!("no CPU hog ({HOG_VAR}=0)")
        } else {
            let pids: Vec<String> = self.children.iter().map(|c| c.id().to_string()).collect();
            format!(
                "CPU hog: {} busy loops (`sh -c '{HOG_LOOP}'`, pids {})",
                self.children.len(),
                pids.join(", ")
            )
        }
    }

    /// CPU time the busy loops have used so far.
    fn cpu(&self) -> Duration {
        self.children.iter().map(|c| cpu_time(c.id())).sum()
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// CPU time (user and system, all threads) process `pid` has used: `utime` and `stime` of
/// `/proc/<pid>/stat`, in clock ticks (100 per second on Linux); zero once the process is gone.
fn cpu_time(pid: u32) -> Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // After the command name (in parentheses, which may hold spaces): the state is
            // field 3, utime and stime fields 14 and 15.
            let (_, rest) = stat.rsplit_once(')')?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

// ---------------------------------------------------------------------------------------------
// Samples of the process.

/// TCP states of `/proc/net/tcp` (`include/net/tcp_states.h`).
const ESTABLISHED: u8 = 0x01;
const CLOSE_WAIT: u8 = 0x08;

/// One line of `/proc/net/tcp` or `/proc/net/tcp6`.
struct TcpSocket {
    local_port: u16,
    remote_port: u16,
    state: u8,
    /// Tells apart two sockets that had the same ports at different times.
    inode: u64,
}

/// Every TCP socket of this network namespace, IPv4 and IPv6.
fn tcp_sockets() -> Vec<TcpSocket> {
    let mut sockets = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(text) => text,
            // Without IPv6 there is no tcp6 table; the IPv4 one is always there.
            Err(_) if table.ends_with('6') => continue,
            Err(e) => panic!("read {table}: {e}"),
        };
        // `sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout
        // inode ...`: addresses as `HEXADDR:HEXPORT`, the state in hex.
        let port = |a: &str| u16::from_str_radix(a.rsplit_once(':')?.1, 16).ok();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let parsed = (|| {
                Some(TcpSocket {
                    local_port: port(fields.get(1)?)?,
                    remote_port: port(fields.get(2)?)?,
                    state: u8::from_str_radix(fields.get(3)?, 16).ok()?,
                    inode: fields.get(9)?.parse().ok()?,
                })
            })();
            sockets.extend(parsed);
        }
    }
    sockets
}

/// The server's sockets in CLOSE-WAIT: local port `port` (the server's), peer gone, not closed
/// by the server yet; keyed by remote port and inode.
fn close_wait(port: u16) -> Vec<(u16, u64)> {
    tcp_sockets()
        .into_iter()
        .filter(|s| s.local_port == port && s.state == CLOSE_WAIT)
        .map(|s| (s.remote_port, s.inode))
        .collect()
}

/// Whether the server (listening on `server_port`) closed its side of the connection from the
/// client port `client_port`: that socket left ESTABLISHED (FIN-WAIT, CLOSING, TIME-WAIT) or is
/// gone.
fn server_closed(server_port: u16, client_port: u16) -> bool {
    !tcp_sockets().into_iter().any(|s| {
        s.local_port == server_port && s.remote_port == client_port && s.state == ESTABLISHED
    })
}

/// What the CLOSE-WAIT watch saw since the previous [`take`](CloseWaitWatch::take).
#[derive(Default)]
struct CloseWaitSeen {
    /// Most sockets in CLOSE-WAIT at one count.
    most: i64,
    /// Longest one socket has been in CLOSE-WAIT (as first seen by a count).
    oldest: Duration,
}

/// Counts the server's CLOSE-WAIT sockets every [`CLOSE_WAIT_EVERY`] until `stop`, and how long
/// each has been there.
struct CloseWaitWatch {
    port: u16,
    seen: Arc<Mutex<CloseWaitSeen>>,
}

impl CloseWaitWatch {
    fn spawn(port: u16, stop: CancellationToken) -> CloseWaitWatch {
        let seen = Arc::new(Mutex::new(CloseWaitSeen::default()));
        let watch = CloseWaitWatch {
            port,
            seen: seen.clone(),
        };
        tokio::spawn(async move {
            // When each socket now in CLOSE-WAIT was first counted there.
            let mut since: HashMap<(u16, u64), Instant> = HashMap::new();
            let mut tick = tokio::time::interval(CLOSE_WAIT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let now = Instant::now();
                let sockets = close_wait(port);
                since.retain(|key, _| sockets.contains(key));
                for key in &sockets {
                    since.entry(*key).or_insert(now);
                }
                let oldest = since.values().map(|&t| now - t).max().unwrap_or_default();
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                seen.most = seen.most.max(sockets.len() as i64);
                seen.oldest = seen.oldest.max(oldest);
            }
        });
        watch
    }

    /// The count now, and what the watch saw since the previous call (this count included).
    fn take(&self) -> (i64, CloseWaitSeen) {
        let now = close_wait(self.port).len() as i64;
        let mut seen = std::mem::take(&mut *self.seen.lock().unwrap_or_else(|e| e.into_inner()));
        seen.most = seen.most.max(now);
        (now, seen)
    }
}

#[derive(Debug, Clone)]
struct Sample {
    at: Duration,
    rss_kib: i64,
    fds: i64,
    tasks: i64,
    connections: i64,
    subscriptions: i64,
    /// The server's sockets in CLOSE-WAIT now; since the previous sample, the most counted at
    /// once and the longest one stayed.
    close_wait: i64,
    close_wait_max: i64,
    close_wait_oldest: Duration,
    churned: u64,
    committed: u64,
    service_received: u64,
}

fn rss_kib(pid: u32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/<pid>/status");
    line.split_whitespace()
        .nth(1)
        .and_then(|kb| kb.parse().ok())
        .unwrap_or_else(|| panic!("not a VmRSS line: {line:?}"))
}

fn open_fds(pid: u32) -> i64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/<pid>/fd")
        .count() as i64
}

fn gauge(metrics: &str, name: &str) -> i64 {
    sample(metrics, name).unwrap_or_else(|| panic!("{name} not in /metrics:\n{metrics}")) as i64
}

struct Probe<'a> {
    server: &'a Server,
    close_wait: &'a CloseWaitWatch,
    began: Instant,
    stats: &'a Stats,
    committed: &'a AtomicU64,
    service_received: &'a AtomicU64,
}

impl Probe<'_> {
    async fn take(&self) -> Sample {
        let pid = self.server.process.pid();
        let metrics = self.server.metrics().await;
        let (close_wait, seen) = self.close_wait.take();
        Sample {
            at: self.began.elapsed(),
            close_wait,
            close_wait_max: seen.most,
            close_wait_oldest: seen.oldest,
            rss_kib: rss_kib(pid),
            fds: open_fds(pid),
            tasks: gauge(&metrics, "pgcast_tokio_alive_tasks"),
            connections: gauge(&metrics, "pgcast_connections"),
            subscriptions: gauge(&metrics, "pgcast_subscriptions"),
            churned: Stats::count(&self.stats.connections),
            committed: self.committed.load(Ordering::Relaxed),
            service_received: self.service_received.load(Ordering::Relaxed),
        }
    }
}

fn print_sample(label: &str, s: &Sample) {
    eprintln!(
        "{label:>9} t={:>7.1}s rss={:>7} KiB fds={:>4} tasks={:>4} close-wait={:>3} (max {:>3}, \
         oldest {:>4.1}s) connections={:>4} subscriptions={:>4} | churn connections={:>6} events \
         committed={:>7} service received={:>7}",
        s.at.as_secs_f64(),
        s.rss_kib,
        s.fds,
        s.tasks,
        s.close_wait,
        s.close_wait_max,
        s.close_wait_oldest.as_secs_f64(),
        s.connections,
        s.subscriptions,
        s.churned,
        s.committed,
        s.service_received,
    );
}

/// What grew beyond its bound between `base` and `now`.
fn growth_failures(base: &Sample, now: &Sample) -> Vec<String> {
    let mut failures = Vec::new();
    if now.fds - base.fds > FD_GROWTH {
        failures.push(format!(
            "open fds grew from {} to {} (bound +{FD_GROWTH})",
            base.fds, now.fds
        ));
    }
    if now.tasks - base.tasks > TASK_GROWTH {
        failures.push(format!(
            "tokio tasks grew from {} to {} (bound +{TASK_GROWTH})",
            base.tasks, now.tasks
        ));
    }
    let rss_bound = RSS_GROWTH_MIN_KIB.max((base.rss_kib as f64 * RSS_GROWTH_FRACTION) as i64);
    if now.rss_kib - base.rss_kib > rss_bound {
        failures.push(format!(
            "VmRSS grew from {} KiB to {} KiB (bound +{rss_bound} KiB)",
            base.rss_kib, now.rss_kib
        ));
    }
    failures
}

/// What is wrong at the end: growth over `base`, or CLOSE-WAIT sockets left behind.
fn end_failures(base: &Sample, now: &Sample) -> Vec<String> {
    let mut failures = growth_failures(base, now);
    if now.close_wait > CLOSE_WAIT_END {
        failures.push(format!(
            "{} server sockets in CLOSE-WAIT after the churn stopped (bound {CLOSE_WAIT_END})",
            now.close_wait
        ));
    }
    if now.close_wait_oldest > CLOSE_WAIT_AGE {
        failures.push(format!(
            "a server socket stayed in CLOSE-WAIT for {:?} (bound {CLOSE_WAIT_AGE:?})",
            now.close_wait_oldest
        ));
    }
    failures
}

// ---------------------------------------------------------------------------------------------
// The run.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_with_churn_grows_no_memory_fds_or_tasks() {
    let secs: u64 = match std::env::var("PGCAST_SOAK_SECS") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|e| panic!("PGCAST_SOAK_SECS={s:?}: {e}")),
        Err(_) => 60,
    };
    assert!(secs >= 5, "PGCAST_SOAK_SECS must be at least 5");
    let duration = Duration::from_secs(secs);
    let warm_up = duration / 5;
    let every = (duration / 10).clamp(Duration::from_secs(2), Duration::from_secs(60));
    let ttl = duration + Duration::from_secs(600);
    // First, so that everything below runs contended; dropped last.
    let hog = Hog::start();

    let db = PgCluster::shared()
        .expect("test cluster")
        .create_database()
        .await
        .expect("create database");
    let server = Server::serve(db.url(), &["--outbound-bytes", OUTBOUND_BYTES]).await;
    let addr = server.addr;
    let began = Instant::now();
    eprintln!(
        "soak for {duration:?} against pgcast serve (pid {}) on {addr}; {}",
        server.process.pid(),
        hog.describe()
    );
    let stop_watch = CancellationToken::new();
    let _stop_watch = stop_watch.clone().drop_guard();
    let close_waits = CloseWaitWatch::spawn(addr.port(), stop_watch);

    let world = Arc::new(World::new());
    let admin = db.connect().await.expect("connect");
    for (session, customer) in &world.sessions {
        admin
            .execute(
                "INSERT INTO sessions (id, customer_id, kind) VALUES ($1, $2, 'paid')",
                &[session, customer],
            )
            .await
            .expect("insert session");
    }

    // The history, in the log and in the server's replay window before anyone subscribes.
    admin
        .execute(
            "INSERT INTO session_assignments
                 (session_id, status, customer_name, vehicle_summary, concern)
             SELECT gen_random_uuid(), 'completed', 'Ana', '2014 VW Golf', 'a noise when braking'
             FROM generate_series(1, $1::bigint)",
            &[&HISTORY],
        )
        .await
        .expect("insert the history");
    let deadline = Instant::now() + SETTLE;
    while gauge(&server.metrics().await, "pgcast_events_dispatched_total") < HISTORY {
        assert!(
            Instant::now() < deadline,
            "the server has not dispatched the {HISTORY} events of the history in {SETTLE:?}"
        );
        tokio::time::sleep(POLL).await;
    }

    // The long-lived subscribers, then the writer.
    let readers = CancellationToken::new();
    let service = long_lived(
        addr,
        "service on assignments".to_owned(),
        principal(Uuid::new_v4(), Role::Service, None),
        "assignments",
        ttl,
        true,
        readers.clone(),
    )
    .await;
    let mut mechanics = Vec::with_capacity(MECHANICS);
    for i in 0..MECHANICS {
        let (id, workshop) = match world.mechanics.get(i) {
            Some(m) => *m,
            None => (Uuid::new_v4(), world.workshops.get(i % 4).copied()),
        };
        let who = principal(id, Role::Mechanic, workshop);
        mechanics.push(
            long_lived(
                addr,
                format!("mechanic {i} on queue"),
                who,
                "queue",
                ttl,
                false,
                readers.clone(),
            )
            .await,
        );
    }
    let stop_writer = CancellationToken::new();
    let committed = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(
        db.connect().await.expect("connect the writer"),
        world.clone(),
        stop_writer.clone(),
        committed.clone(),
    );

    // The churn.
    let stats = Arc::new(Stats::default());
    let stop_churn = CancellationToken::new();
    let head = service.last.clone();
    let mut churn: Vec<JoinHandle<()>> = (0..CHURN_TASKS)
        .map(|_| {
            spawn_churn(
                addr,
                world.clone(),
                head.clone(),
                stats.clone(),
                stop_churn.clone(),
            )
        })
        .collect();
    churn.extend((0..NEVER_READERS).map(|_| {
        spawn_never_reader(
            addr,
            world.clone(),
            head.clone(),
            stats.clone(),
            stop_churn.clone(),
        )
    }));

    let probe = Probe {
        server: &server,
        close_wait: &close_waits,
        began,
        stats: &stats,
        committed: &committed,
        service_received: &service.received,
    };
    eprintln!(
        "samples (VmRSS, open fds, alive tokio tasks, server sockets in CLOSE-WAIT now and most \
         since the previous sample, and the load so far):"
    );
    print_sample("start", &probe.take().await);
    tokio::time::sleep_until(began + warm_up).await;
    let baseline = probe.take().await;
    print_sample("baseline", &baseline);

    // Steady state: a sample every `every`; the service keeps receiving.
    let mut tick = tokio::time::interval_at(began + warm_up + every, every);
    let mut previous = baseline.clone();
    let mut samples = vec![baseline.clone()];
    while previous.at + every <= duration {
        tick.tick().await;
        let s = probe.take().await;
        print_sample("", &s);
        assert!(
            s.service_received > previous.service_received,
            "the service stopped receiving: {} events at {:?} and at {:?}",
            s.service_received,
            previous.at,
            s.at
        );
        assert!(
            s.connections >= LONG_LIVED as i64,
            "long-lived subscribers lost: {s:?}"
        );
        let problems = stats
            .problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        assert!(problems.is_empty(), "churn clients failed: {problems:#?}");
        assert!(
            s.at < duration / 2 || s.close_wait <= CLOSE_WAIT_RUN,
            "{} server sockets in CLOSE-WAIT in the second half of the run (bound \
             {CLOSE_WAIT_RUN}): connections pile up; {s:?}",
            s.close_wait
        );
        assert!(
            s.close_wait_oldest <= CLOSE_WAIT_AGE,
            "a server socket stayed in CLOSE-WAIT for {:?} (bound {CLOSE_WAIT_AGE:?}): the server \
             did not notice its peer leaving; {s:?}",
            s.close_wait_oldest
        );
        samples.push(s.clone());
        previous = s;
    }
    tokio::time::sleep_until(began + duration).await;

    // The churn and the writer stop; only the long-lived subscribers remain.
    stop_churn.cancel();
    stop_writer.cancel();
    let stopped = Instant::now();
    writer.await.expect("writer");
    for task in churn {
        tokio::time::timeout_at(stopped + SETTLE, task)
            .await
            .expect("churn tasks end in time")
            .expect("churn task");
    }
    let deadline = Instant::now() + SETTLE;
    loop {
        let metrics = server.metrics().await;
        let (c, s) = (
            gauge(&metrics, "pgcast_connections"),
            gauge(&metrics, "pgcast_subscriptions"),
        );
        if c == LONG_LIVED as i64 && s == LONG_LIVED as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{c} connections and {s} subscriptions {SETTLE:?} after the churn stopped, \
             expected {LONG_LIVED} (the long-lived subscribers)"
        );
        tokio::time::sleep(POLL).await;
    }
    let settled = began.elapsed();
    // Tasks of closed connections end right after the gauge drops: give them a moment (with
    // a bound), then compare.
    let deadline = Instant::now() + WAIT;
    let last = loop {
        let s = probe.take().await;
        if end_failures(&baseline, &s).is_empty() || Instant::now() >= deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    print_sample("final", &last);
    let metrics = server.metrics().await;
    let elapsed = duration.as_secs_f64();
    eprintln!(
        "churn: {} connections ({:.0}/s): {} refused auth, {} closed politely, {} dropped (FIN), \
         {} reset (RST); {} subscriptions confirmed, {} snapshots, {} events read; never-reading \
         clients: {} closed by the server ({} read its 4008 frame), {} still open at the end; \
         server: {} slow-consumer closes, {} auth failures, {} replays from the window and {} \
         from the log; writer: {} events ({:.0}/s) after {HISTORY} of history; settled {:?} \
         after the churn stopped",
        Stats::count(&stats.connections),
        Stats::count(&stats.connections) as f64 / elapsed,
        Stats::count(&stats.refused_auth),
        Stats::count(&stats.polite),
        Stats::count(&stats.dropped_fin),
        Stats::count(&stats.dropped_rst),
        Stats::count(&stats.subscribed),
        Stats::count(&stats.snapshots),
        Stats::count(&stats.events),
        Stats::count(&stats.never_read_closed),
        Stats::count(&stats.never_read_4008),
        Stats::count(&stats.never_read_open),
        gauge(&metrics, "pgcast_slow_consumer_closes_total"),
        gauge(&metrics, "pgcast_auth_failures_total"),
        gauge(&metrics, "pgcast_replays_from_window_total"),
        gauge(&metrics, "pgcast_replays_from_log_total"),
        committed.load(Ordering::Relaxed),
        committed.load(Ordering::Relaxed) as f64 / elapsed,
        settled.saturating_sub(stopped.duration_since(began)),
    );
    let wall = began.elapsed();
    let second_half = || samples.iter().filter(|s| s.at >= duration / 2);
    eprintln!(
        "CPU over {:.0} s on {} CPUs: pgcast {:.1} s ({:.0} % of one CPU), the busy loops {:.1} s; \
         server sockets in CLOSE-WAIT in the second half: at most {} at a sample (bound \
         {CLOSE_WAIT_RUN}), {} at one count; none stayed longer than {:.1} s (bound \
         {CLOSE_WAIT_AGE:?}); {} at the end (bound {CLOSE_WAIT_END})",
        wall.as_secs_f64(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_time(server.process.pid()).as_secs_f64(),
        100.0 * cpu_time(server.process.pid()).as_secs_f64() / wall.as_secs_f64(),
        hog.cpu().as_secs_f64(),
        second_half().map(|s| s.close_wait).max().unwrap_or(0),
        second_half().map(|s| s.close_wait_max).max().unwrap_or(0),
        samples
            .iter()
            .chain([&last])
            .map(|s| s.close_wait_oldest)
            .max()
            .unwrap_or_default()
            .as_secs_f64(),
        last.close_wait,
    );
    let problems = stats
        .problems
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    assert!(problems.is_empty(), "churn clients failed: {problems:#?}");
    // The churn kept going (thousands a minute when things work; a stall fails here).
    let churned = Stats::count(&stats.connections);
    assert!(
        churned >= secs * 10,
        "only {churned} churn connections in {secs} s"
    );
    if duration >= Duration::from_secs(60) {
        assert!(
            Stats::count(&stats.never_read_closed) > 0,
            "no never-reading client was closed by the server"
        );
    }
    // Only never-readers are slow (a churn client closed with 4008 is a problem above), and
    // each one the server closed was closed as a slow consumer, not by a later limit — as long
    // as the writer fills a budget faster than that limit (a write blocked for two heartbeats,
    // 40 s) comes: on a machine so busy that the writer falls to a few events a second, the
    // blocked replay write of a never-reader times out first, which also closes it.
    let slow_closes = gauge(&metrics, "pgcast_slow_consumer_closes_total");
    let rate = committed.load(Ordering::Relaxed) as f64 / duration.as_secs_f64();
    if rate >= 40.0 {
        assert!(
            slow_closes >= Stats::count(&stats.never_read_closed) as i64,
            "{} never-readers closed by the server, {slow_closes} of them as slow consumers",
            Stats::count(&stats.never_read_closed)
        );
    } else {
        eprintln!(
            "writer at {rate:.0} events/s: {slow_closes} of {} never-reader closes were slow-consumer closes",
            Stats::count(&stats.never_read_closed)
        );
    }
    let failures = end_failures(&baseline, &last);
    assert!(
        failures.is_empty(),
        "at the end: {failures:#?}\nbaseline {baseline:?}\nfinal {last:?}"
    );

    // No loss: the service received exactly the log's events since it subscribed.
    let log_head: i64 = admin
        .query_one(
            "SELECT coalesce(max(position), 0) FROM pgcast.assignment_events",
            &[],
        )
        .await
        .expect("log head")
        .get(0);
    let deadline = Instant::now() + SETTLE;
    while service.last.load(Ordering::Relaxed) < log_head {
        assert!(
            Instant::now() < deadline,
            "the service is at position {} of {log_head}",
            service.last.load(Ordering::Relaxed)
        );
        tokio::time::sleep(POLL).await;
    }
    readers.cancel();
    let (ws, positions, problems) = service.task.await.expect("service task");
    ws.close().await;
    assert!(problems.is_empty(), "{problems:#?}");
    let expected: Vec<i64> = admin
        .query(
            "SELECT position FROM pgcast.assignment_events WHERE position > $1 ORDER BY position",
            &[&service.from],
        )
        .await
        .expect("read the log")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        positions.len(),
        expected.len(),
        "the service received {} events, the log has {} since it subscribed",
        positions.len(),
        expected.len()
    );
    assert!(
        positions == expected,
        "the service's events differ from the log"
    );
    assert!(
        expected.len() as u64 >= committed.load(Ordering::Relaxed),
        "the log holds every committed event"
    );
    for m in mechanics {
        let received = m.received.load(Ordering::Relaxed);
        let (ws, _, problems) = m.task.await.expect("mechanic task");
        ws.close().await;
        assert!(problems.is_empty(), "{problems:#?}");
        assert!(received > 0, "{} received no event", m.name);
    }
    eprintln!(
        "no loss: the service received all {} events since position {}; samples: {}",
        expected.len(),
        service.from,
        samples.len() + 1
    );
}

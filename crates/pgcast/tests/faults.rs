//! Faults across processes (docs/architecture.md §3, issue 7) against the built `pgcast serve`.
//!
//! While writer tasks commit 20,000 events (single and multi-row inserts, updates that move
//! assignments between statuses, workshops and mechanics, multi-statement transactions, a few
//! deletes), clients of two replicas subscribe to every kind of topic, and the test injects in
//! turn:
//!
//! 1. `pg_terminate_backend` of the replicas' LISTEN connections;
//! 2. a PostgreSQL restart (a private cluster);
//! 3. SIGKILL of replica A, then A started again on the same port (its clients come back to it);
//! 4. SIGKILL of replica A for good: its clients move to replica B.
//!
//! Clients reconnect by themselves (jittered backoff, bounded in time) and resume every topic
//! with `since` = the last position they received on it; only their very first subscription
//! takes a snapshot. At the end the log, read with SQL, is the truth (a transaction cut by the
//! restart may or may not have committed): for every client and topic, the events received are
//! exactly those the client may see after its snapshot, once each, in position order, with the
//! row as logged — and the snapshot is exactly the visible state at its position. Who may see
//! what is decided by this file's own reading of docs/architecture.md §5 ([`Audience::may_see`]), not by the
//! library, so a bug in the library's rules is caught too.
//!
//! Also here: no secret or token ever reaches the logs of `pgcast serve`, at `RUST_LOG=debug`
//! and at `RUST_LOG=trace`.

mod common;
mod running;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{fresh_db, LIMIT};
use pgcast_events::{Principal, Role};
use pgcast_testkit::{oracle, PgCluster, TestDb};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use running::{sample, serve_command, token_for, Next, Process, Server, Ws, POLL, SECRET};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::{Client, GenericClient};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Events the writers commit between two faults; five segments make the 20,000 of issue 7.
const SEGMENT: u64 = 4_000;
const TOTAL: u64 = 5 * SEGMENT;
/// Concurrent writers (positions of their transactions interleave).
const WRITERS: usize = 3;
/// Rows in the log before any client subscribes (so first snapshots are not empty).
const SEED_ROWS: usize = 200;
/// Bound for every awaited condition of this scenario; never reached when things work, and
/// generous because the machine is shared and everything runs in debug builds.
const PATIENCE: Duration = Duration::from_secs(90);
/// A client that cannot reconnect for this long gives up (and the test fails).
const RECONNECT_WITHIN: Duration = Duration::from_secs(60);
/// Reconnect and retry backoff of clients and writers: doubling from the first to the last,
/// each delay drawn from the upper half.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Who may see what: this file's own reading of docs/architecture.md §5.

/// The fields of a row that decide who may see it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RowState {
    session: Uuid,
    status: String,
    mechanic: Option<Uuid>,
    workshop: Option<Uuid>,
}

/// A subscription: a topic as subscribed by one principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Audience {
    /// `queue` of a mechanic (of a workshop, or a freelancer).
    Queue {
        mechanic: Uuid,
        workshop: Option<Uuid>,
    },
    /// `mechanic:<id>`, subscribed by that mechanic.
    Mechanic(Uuid),
    /// `workshop:<id>`, subscribed by a mechanic of that workshop.
    Workshop(Uuid),
    /// `session:<id>`, subscribed by the session's customer.
    Session(Uuid),
    /// `assignments`, subscribed by a service.
    Everything,
}

impl Audience {
    fn topic(&self) -> String {
        match self {
            Audience::Queue { .. } => "queue".to_owned(),
            Audience::Mechanic(id) => format!("mechanic:{id}"),
            Audience::Workshop(id) => format!("workshop:{id}"),
            Audience::Session(id) => format!("session:{id}"),
            Audience::Everything => "assignments".to_owned(),
        }
    }

    /// Who subscribes: the principal the topic is subscribed by.
    fn principal(&self) -> Principal {
        let (role, user_id, workshop_id) = match *self {
            Audience::Queue { mechanic, workshop } => (Role::Mechanic, mechanic, workshop),
            Audience::Mechanic(id) => (Role::Mechanic, id, None),
            Audience::Workshop(id) => (Role::Mechanic, Uuid::new_v4(), Some(id)),
            Audience::Session(_) => (Role::Customer, Uuid::new_v4(), None),
            Audience::Everything => (Role::Service, Uuid::new_v4(), None),
        };
        Principal {
            user_id,
            role,
            workshop_id,
        }
    }

    /// May this subscriber see a row in state `s`? The test kit's oracle, written from the
    /// README independently of `pgcast_events`.
    fn may_see(&self, s: &RowState) -> bool {
        let row = oracle::Row {
            session: s.session,
            status: oracle::status(&s.status),
            mechanic: s.mechanic,
            workshop: s.workshop,
        };
        oracle::may_see(&self.topic(), &self.principal(), &row, None)
    }

    /// Does a snapshot of this subscription hold a row in state `s`? The visible rows, except
    /// that the `assignments`, `mechanic:` and `workshop:` snapshots hold only open ones
    /// (queued, offered, accepted): finished assignments are history, read from the log with
    /// `since` (sql/snapshot_*.sql).
    fn in_snapshot(&self, s: &RowState) -> bool {
        let open_only = matches!(
            self,
            Audience::Everything | Audience::Mechanic(_) | Audience::Workshop(_)
        );
        self.may_see(s)
            && (!open_only || ["queued", "offered", "accepted"].contains(&s.status.as_str()))
    }

    /// An event reaches every subscriber who could see the row before or after it.
    fn sees(&self, e: &LogEvent) -> bool {
        e.before
            .iter()
            .chain(e.after.iter())
            .any(|s| self.may_see(s))
    }
}

// ---------------------------------------------------------------------------------------------
// The log, parsed here from its JSON.

/// One row of `pgcast.assignment_events`.
#[derive(Debug, Clone)]
struct LogEvent {
    position: i64,
    op: String,
    id: Uuid,
    /// The row image of the payload (after the change; for a delete, as it was).
    image: RowState,
    old_status: Option<String>,
    before: Option<RowState>,
    after: Option<RowState>,
}

fn uuid_field(v: &Value) -> Option<Uuid> {
    v.as_str().map(|s| {
        s.parse()
            .unwrap_or_else(|e| panic!("{s:?} is not a uuid: {e}"))
    })
}

fn row_state(row: &Value) -> RowState {
    RowState {
        session: uuid_field(&row["session_id"]).expect("session_id"),
        status: row["status"].as_str().expect("status").to_owned(),
        mechanic: uuid_field(&row["mechanic_id"]),
        workshop: uuid_field(&row["workshop_id"]),
    }
}

fn parse_log_row(position: i64, text: &str) -> LogEvent {
    let v: Value = serde_json::from_str(text).expect("log payload is JSON");
    assert_eq!(v["position"].as_i64(), Some(position), "{text}");
    let op = v["op"].as_str().expect("op").to_owned();
    let image = row_state(&v["row"]);
    let old = &v["old"];
    let before = (op != "insert").then(|| RowState {
        // The session of a row never changes (the writers never update it).
        session: image.session,
        status: old["status"].as_str().expect("old status").to_owned(),
        mechanic: uuid_field(&old["mechanic_id"]),
        workshop: uuid_field(&old["workshop_id"]),
    });
    LogEvent {
        position,
        id: uuid_field(&v["row"]["id"]).expect("id"),
        old_status: before.as_ref().map(|b| b.status.clone()),
        after: (op != "delete").then(|| image.clone()),
        before,
        image,
        op,
    }
}

/// The whole log, in position order, as the issue asks to read it.
async fn read_log(db: &TestDb) -> Vec<LogEvent> {
    let client = db.connect().await.expect("connect to read the log");
    client
        .query(
            "SELECT position, payload::text FROM pgcast.assignment_events ORDER BY position",
            &[],
        )
        .await
        .expect("read the log")
        .iter()
        .map(|row| parse_log_row(row.get(0), row.get(1)))
        .collect()
}

/// The rows a snapshot of `audience` at `position` holds: those in its scope once every event
/// up to `position` is applied.
fn visible_at(log: &[LogEvent], position: i64, audience: &Audience) -> BTreeMap<Uuid, RowState> {
    let mut rows = BTreeMap::new();
    for e in log.iter().take_while(|e| e.position <= position) {
        match &e.after {
            Some(s) => rows.insert(e.id, s.clone()),
            None => rows.remove(&e.id),
        };
    }
    rows.retain(|_, s| audience.in_snapshot(s));
    rows
}

// ---------------------------------------------------------------------------------------------
// The people and places of the scenario.

struct World {
    w1: Uuid,
    w2: Uuid,
    /// A workshop nobody subscribed to watches.
    w3: Uuid,
    /// Mechanics of W1.
    m1: Uuid,
    m4: Uuid,
    /// Mechanic of W2.
    m2: Uuid,
    /// Freelancer.
    m3: Uuid,
    /// A mechanic of W1 without a client: offers to them must reach no other queue.
    m_other: Uuid,
    customer: Uuid,
    /// The customer's session (a `sessions` row they own).
    own_session: Uuid,
    /// Another customer's session.
    other_session: Uuid,
    other_customer: Uuid,
}

impl World {
    fn new() -> World {
        let id = Uuid::new_v4;
        World {
            w1: id(),
            w2: id(),
            w3: id(),
            m1: id(),
            m4: id(),
            m2: id(),
            m3: id(),
            m_other: id(),
            customer: id(),
            own_session: id(),
            other_session: id(),
            other_customer: id(),
        }
    }

    /// A random status and placement. A mechanic is only ever given an assignment that is
    /// general or of their own workshop (docs/architecture.md §5 does not say who sees an offer to a
    /// mechanic of another workshop).
    fn placement(&self, rng: &mut StdRng) -> (&'static str, Option<Uuid>, Option<Uuid>) {
        const OTHERS: [&str; 5] = ["accepted", "declined", "cancelled", "expired", "completed"];
        let status = match rng.random_range(0..100) {
            0..45 => "queued",
            45..65 => "offered",
            _ => *OTHERS.choose(rng).expect("statuses"),
        };
        let (mechanic, workshop) = match rng.random_range(0..10) {
            0..3 => (None, None),
            3..6 => (
                None,
                Some(*[self.w1, self.w2, self.w3].choose(rng).expect("w")),
            ),
            _ => {
                let (m, home) = *[
                    (self.m1, Some(self.w1)),
                    (self.m4, Some(self.w1)),
                    (self.m2, Some(self.w2)),
                    (self.m3, None),
                    (self.m_other, Some(self.w1)),
                ]
                .choose(rng)
                .expect("mechanics");
                (Some(m), if rng.random_bool(0.5) { home } else { None })
            }
        };
        (status, mechanic, workshop)
    }

    fn session(&self, rng: &mut StdRng) -> Uuid {
        match rng.random_range(0..100) {
            0..15 => self.own_session,
            15..25 => self.other_session,
            _ => Uuid::new_v4(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writers.

const INSERT: &str = "
    INSERT INTO session_assignments
        (session_id, mechanic_id, workshop_id, status, urgent, customer_name, vehicle_summary, concern)
    SELECT s, m, w, st, u, 'Customer ' || n, '2014 VW Golf', 'a noise when braking'
    FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::bool[])
         WITH ORDINALITY AS t(s, m, w, st, u, n)
    RETURNING id";

const UPDATE: &str = "
    UPDATE session_assignments a
    SET status = u.st, mechanic_id = u.m, workshop_id = u.w, updated_at = now()
    FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[]) AS u(id, st, m, w)
    WHERE a.id = u.id";

async fn insert_rows(
    c: &impl GenericClient,
    world: &World,
    rng: &mut StdRng,
    n: usize,
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    let (mut sessions, mut mechanics, mut workshops, mut statuses, mut urgent) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..n {
        let (status, mechanic, workshop) = world.placement(rng);
        sessions.push(world.session(rng));
        mechanics.push(mechanic);
        workshops.push(workshop);
        statuses.push(status);
        urgent.push(rng.random_bool(0.2));
    }
    let rows = c
        .query(
            INSERT,
            &[&sessions, &mechanics, &workshops, &statuses, &urgent],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn move_rows(
    c: &impl GenericClient,
    world: &World,
    rng: &mut StdRng,
    ids: &[Uuid],
) -> Result<u64, tokio_postgres::Error> {
    let (mut statuses, mut mechanics, mut workshops) = (vec![], vec![], vec![]);
    for _ in ids {
        let (status, mechanic, workshop) = world.placement(rng);
        statuses.push(status);
        mechanics.push(mechanic);
        workshops.push(workshop);
    }
    c.execute(UPDATE, &[&ids, &statuses, &mechanics, &workshops])
        .await
}

/// One change: returns the events it committed and the ids it inserted. An error leaves the
/// outcome unknown (the connection may have died during the commit): the log decides.
async fn one_change(
    c: &mut Client,
    world: &World,
    rng: &mut StdRng,
    mine: &mut Vec<Uuid>,
) -> Result<(u64, Vec<Uuid>), tokio_postgres::Error> {
    let roll = rng.random_range(0..100);
    if mine.len() < 20 || roll < 30 {
        let ids = insert_rows(&*c, world, rng, 1).await?;
        return Ok((ids.len() as u64, ids));
    }
    if roll < 45 {
        let n = rng.random_range(10..=60);
        let ids = insert_rows(&*c, world, rng, n).await?;
        return Ok((ids.len() as u64, ids));
    }
    if roll < 80 {
        // Several rows moved in one statement (one transaction).
        let k = rng.random_range(1..=4);
        let mut ids: Vec<Uuid> = mine.choose_multiple(rng, k).copied().collect();
        ids.sort_unstable();
        let n = move_rows(&*c, world, rng, &ids).await?;
        return Ok((n, vec![]));
    }
    if roll < 92 {
        // A transaction of three statements: a new row, moved at once, and another row moved.
        let other = *mine.choose(rng).expect("rows");
        let tx = c.transaction().await?;
        let ids = insert_rows(&tx, world, rng, 1).await?;
        let moved = move_rows(&tx, world, rng, &ids).await?;
        let moved_other = move_rows(&tx, world, rng, &[other]).await?;
        tx.commit().await?;
        return Ok((ids.len() as u64 + moved + moved_other, ids));
    }
    let i = rng.random_range(0..mine.len());
    let n = c
        .execute("DELETE FROM session_assignments WHERE id = $1", &[&mine[i]])
        .await?;
    mine.swap_remove(i);
    Ok((n, vec![]))
}

/// Jittered: uniformly in the upper half of `d`.
fn jitter(d: Duration) -> Duration {
    d / 2 + rand::rng().random_range(Duration::ZERO..=d / 2)
}

/// Commits changes until `TOTAL` events are confirmed, never going past the `allowed` budget
/// (raised by the test fault by fault). Returns the ids of the rows whose insert was confirmed.
fn spawn_writer(
    db: TestDb,
    world: Arc<World>,
    seed: u64,
    committed: Arc<AtomicU64>,
    unknown: Arc<AtomicU64>,
    mut allowed: watch::Receiver<u64>,
) -> JoinHandle<Vec<Uuid>> {
    tokio::spawn(async move {
        let deadline = Instant::now() + 2 * PATIENCE;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut client: Option<Client> = None;
        let mut mine = Vec::new();
        let mut inserted = Vec::new();
        let mut backoff = BACKOFF_FIRST;
        loop {
            let done = committed.load(Ordering::Relaxed);
            if done >= TOTAL {
                return inserted;
            }
            assert!(
                Instant::now() < deadline,
                "writer: only {done} events committed"
            );
            if done >= *allowed.borrow() {
                let more = tokio::time::timeout_at(deadline, allowed.wait_for(|a| *a > done));
                assert!(matches!(more.await, Ok(Ok(_))), "writer: budget not raised");
                continue;
            }
            let Some(c) = client.as_mut() else {
                match db.connect().await {
                    Ok(c) => {
                        client = Some(c);
                        backoff = BACKOFF_FIRST;
                    }
                    Err(_) => {
                        // PostgreSQL is restarting.
                        tokio::time::sleep(jitter(backoff)).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
                continue;
            };
            match one_change(c, &world, &mut rng, &mut mine).await {
                Ok((events, ids)) => {
                    committed.fetch_add(events, Ordering::Relaxed);
                    mine.extend_from_slice(&ids);
                    inserted.extend(ids);
                }
                // Outcome unknown; a new connection for the next change.
                Err(_) => {
                    unknown.fetch_add(1, Ordering::Relaxed);
                    client = None;
                }
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Clients that reconnect and resume by themselves.

/// An event as a client received it.
#[derive(Debug, Clone)]
struct Got {
    position: i64,
    event: String,
    id: Uuid,
    state: RowState,
    old_status: Option<String>,
}

impl Got {
    /// An `event` frame; `None` if a field is missing or mistyped (a missing field is not
    /// null: the README's protocol section).
    fn parse(v: &Value) -> Option<Got> {
        let (id, state) = parse_assignment(v.get("assignment")?)?;
        Some(Got {
            position: v.get("position")?.as_i64()?,
            event: v.get("event")?.as_str()?.to_owned(),
            id,
            state,
            old_status: match v.get("old_status")? {
                Value::Null => None,
                s => Some(s.as_str()?.to_owned()),
            },
        })
    }

    /// How this frame differs from the logged event, if it does.
    fn differs_from(&self, e: &LogEvent) -> Option<String> {
        let kind = match e.op.as_str() {
            "insert" => "assignment.created",
            "update" => "assignment.updated",
            _ => "assignment.deleted",
        };
        let same = self.event == kind
            && self.id == e.id
            && self.state == e.image
            && self.old_status == e.old_status;
        (!same).then(|| format!("received {self:?}, logged {e:?}"))
    }
}

/// The id and routing fields of an assignment object of a frame.
fn parse_assignment(a: &Value) -> Option<(Uuid, RowState)> {
    let uuid = |field| -> Option<Uuid> { a.get(field)?.as_str()?.parse().ok() };
    // `Some(None)` for null, `None` for a missing or mistyped field.
    let optional = |field| -> Option<Option<Uuid>> {
        match a.get(field)? {
            Value::Null => Some(None),
            Value::String(s) => s.parse().ok().map(Some),
            _ => None,
        }
    };
    Some((
        uuid("id")?,
        RowState {
            session: uuid("session_id")?,
            status: a.get("status")?.as_str()?.to_owned(),
            mechanic: optional("mechanic_id")?,
            workshop: optional("workshop_id")?,
        },
    ))
}

#[derive(Debug, Default)]
struct TopicRecord {
    /// Position of the first subscription's snapshot: every visible event after it is due.
    start: Option<i64>,
    snapshot: BTreeMap<Uuid, RowState>,
    events: Vec<Got>,
    /// The last position received on the topic: `since` of the next subscription.
    last: Option<i64>,
    /// Subscribed on the current connection.
    live: bool,
}

#[derive(Debug, Default)]
struct ClientRecord {
    topics: BTreeMap<String, TopicRecord>,
    /// Every replica the client connected (and authenticated) to, in order.
    connects: Vec<SocketAddr>,
    /// How each connection ended.
    ends: Vec<String>,
    /// Subscriptions retried after `unavailable`.
    retries: usize,
    /// Protocol violations seen (each fails the test).
    problems: Vec<String>,
}

impl ClientRecord {
    fn all_live(&self) -> bool {
        self.topics.values().all(|t| t.live && t.start.is_some())
    }
}

struct ClientSpec {
    name: &'static str,
    who: Principal,
    audiences: Vec<Audience>,
    /// Index into the load balancer's list of replicas (modulo its length).
    replica: usize,
}

struct TestClient {
    spec: Arc<ClientSpec>,
    record: Arc<Mutex<ClientRecord>>,
    task: JoinHandle<()>,
}

impl TestClient {
    fn record(&self) -> std::sync::MutexGuard<'_, ClientRecord> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type Balancer = Arc<Mutex<Vec<SocketAddr>>>;

fn subscribe_frame(topic: &str, last: Option<i64>) -> Value {
    match last {
        Some(since) => json!({"type": "subscribe", "id": topic, "topic": topic, "since": since}),
        None => json!({"type": "subscribe", "id": topic, "topic": topic, "snapshot": true}),
    }
}

fn spawn_client(spec: ClientSpec, balancer: Balancer, stop: CancellationToken) -> TestClient {
    let spec = Arc::new(spec);
    let mut record = ClientRecord::default();
    for a in &spec.audiences {
        record.topics.insert(a.topic(), TopicRecord::default());
    }
    let record = Arc::new(Mutex::new(record));
    let task = tokio::spawn(run_client(spec.clone(), balancer, record.clone(), stop));
    TestClient { spec, record, task }
}

fn lock(record: &Mutex<ClientRecord>) -> std::sync::MutexGuard<'_, ClientRecord> {
    record.lock().unwrap_or_else(|e| e.into_inner())
}

/// Connects, subscribes (snapshot the first time, `since` after), records every frame, and
/// reconnects whenever the socket ends, until `stop`.
async fn run_client(
    spec: Arc<ClientSpec>,
    balancer: Balancer,
    record: Arc<Mutex<ClientRecord>>,
    stop: CancellationToken,
) {
    let token = token_for(SECRET.as_bytes(), &spec.who, Duration::from_secs(3600));
    let mut backoff = BACKOFF_FIRST;
    let mut down_since: Option<Instant> = None;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let addr = {
            let addrs = balancer.lock().unwrap_or_else(|e| e.into_inner());
            addrs[spec.replica % addrs.len()]
        };
        let connected = tokio::select! {
            () = stop.cancelled() => return,
            r = Ws::try_connect(addr, &token) => r,
        };
        let mut ws = match connected {
            Ok(ws) => ws,
            Err(error) => {
                let since = *down_since.get_or_insert_with(Instant::now);
                if since.elapsed() > RECONNECT_WITHIN {
                    lock(&record).problems.push(format!(
                        "could not reconnect within {RECONNECT_WITHIN:?}: {error}"
                    ));
                    return;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(jitter(backoff)) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        down_since = None;
        backoff = BACKOFF_FIRST;
        let requests: Vec<Value> = {
            let mut r = lock(&record);
            r.connects.push(addr);
            r.topics
                .iter_mut()
                .map(|(topic, t)| {
                    t.live = false;
                    subscribe_frame(topic, t.last)
                })
                .collect()
        };
        let end = serve_connection(&mut ws, requests, &record, &stop).await;
        match end {
            None => {
                ws.close().await;
                return;
            }
            Some(end) => lock(&record).ends.push(end),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(jitter(BACKOFF_FIRST)) => {}
        }
    }
}

/// Reads one connection until it ends (`Some(how)`) or the test stops the client (`None`).
async fn serve_connection(
    ws: &mut Ws,
    requests: Vec<Value>,
    record: &Mutex<ClientRecord>,
    stop: &CancellationToken,
) -> Option<String> {
    for request in requests {
        if let Err(e) = ws.try_send(request).await {
            return Some(e);
        }
    }
    // Subscriptions to send again (after `unavailable`), and when.
    let mut retries: Vec<(Instant, String)> = Vec::new();
    loop {
        let now = Instant::now();
        let wait = retries
            .iter()
            .map(|(at, _)| at.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(1));
        let next = tokio::select! {
            () = stop.cancelled() => return None,
            next = ws.next(wait) => next,
        };
        match next {
            Next::Json(frame) => on_frame(&frame, record, &mut retries),
            Next::Close(Some(f)) => {
                return Some(format!("close {} {}", u16::from(f.code), f.reason))
            }
            Next::Close(None) => return Some("close without code".to_owned()),
            Next::Ended => return Some("ended".to_owned()),
            Next::Nothing => {}
        }
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = retries.into_iter().partition(|(at, _)| *at <= now);
        retries = later;
        for (_, topic) in due {
            let last = lock(record).topics.get(&topic).and_then(|t| t.last);
            if let Err(e) = ws.try_send(subscribe_frame(&topic, last)).await {
                return Some(e);
            }
        }
    }
}

fn on_frame(frame: &Value, record: &Mutex<ClientRecord>, retries: &mut Vec<(Instant, String)>) {
    let mut r = lock(record);
    let kind = frame["type"].as_str().unwrap_or_default();
    let topic = frame["topic"]
        .as_str()
        .or_else(|| frame["id"].as_str())
        .unwrap_or_default()
        .to_owned();
    let problem = match (kind, r.topics.get_mut(&topic)) {
        ("event", Some(t)) if t.live => match Got::parse(frame) {
            Some(got) => {
                t.last = Some(got.position);
                t.events.push(got);
                None
            }
            None => Some(format!("malformed event frame: {frame}")),
        },
        ("subscribed", Some(t)) => {
            t.live = true;
            None
        }
        ("snapshot", Some(t)) if t.start.is_none() && t.live => {
            let position = frame["position"].as_i64();
            let rows: Option<BTreeMap<Uuid, RowState>> = frame["assignments"]
                .as_array()
                .and_then(|rows| rows.iter().map(parse_assignment).collect());
            match (position, rows) {
                (Some(p), Some(rows)) => {
                    t.start = Some(p);
                    t.last = Some(p);
                    t.snapshot = rows;
                    None
                }
                _ => Some(format!("malformed snapshot: {frame}")),
            }
        }
        ("error", Some(_)) if frame["code"] == "unavailable" => {
            // The database is away (a restart): ask again a little later.
            retries.push((Instant::now() + jitter(4 * BACKOFF_FIRST), topic));
            r.retries += 1;
            None
        }
        ("pong", _) => None,
        _ => Some(format!("unexpected frame: {frame}")),
    };
    if let Some(p) = problem {
        r.problems.push(p);
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting and faults.

/// Polls `done` until it holds, failing with `what()` after [`PATIENCE`].
async fn wait_until(mut done: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {}", what());
        tokio::time::sleep(POLL).await;
    }
}

async fn listener_reconnects(server: &Server) -> f64 {
    sample(&server.metrics().await, "pgcast_listener_reconnects_total")
        .expect("pgcast_listener_reconnects_total in /metrics")
}

/// Waits until every server's listener has reconnected since `before` and is ready (connected
/// and caught up with the log) again.
async fn wait_listeners_back(servers: &[&Server], before: &[f64]) {
    for (server, before) in servers.iter().zip(before) {
        let deadline = Instant::now() + PATIENCE;
        while listener_reconnects(server).await <= *before || server.get("/readyz").await.0 != 200 {
            assert!(
                Instant::now() < deadline,
                "the listener of {} is not back; stderr:\n{}",
                server.addr,
                server.process.stderr()
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Waits until every client in `clients` connected again (after `before` connections) to
/// `addr` and resubscribed every topic.
async fn wait_reconnected(clients: &[&TestClient], before: &[usize], addr: SocketAddr) {
    for (c, before) in clients.iter().zip(before) {
        wait_until(
            || {
                let r = c.record();
                r.connects.len() > *before && r.connects.last() == Some(&addr) && r.all_live()
            },
            || format!("{} not back on {addr}: {:?}", c.spec.name, c.record()),
        )
        .await;
    }
}

/// `pgcast serve` on `addr` again; on another port if that one is taken meanwhile.
async fn serve_again(url: &str, addr: SocketAddr) -> Server {
    match Server::try_ready(Process::spawn(serve_command(
        url,
        &addr.to_string(),
        SECRET,
    )))
    .await
    {
        Ok(server) => server,
        Err(stderr) => {
            assert!(stderr.contains("in use"), "restart failed:\n{stderr}");
            eprintln!("port {addr} taken meanwhile; restarting on another port");
            Server::serve(url, &[]).await
        }
    }
}

/// Waits until the writers confirmed `events`.
async fn wait_committed(committed: &AtomicU64, events: u64) {
    wait_until(
        || committed.load(Ordering::Relaxed) >= events,
        || {
            format!(
                "writers at {} of {events} events",
                committed.load(Ordering::Relaxed)
            )
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// The scenario.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_get_every_event_they_may_see_exactly_once_across_faults() {
    let began = Instant::now();
    let seed: u64 = std::env::var("PGCAST_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("seed {seed} (set PGCAST_FAULT_SEED to replay the writers' choices)");
    let mut rng = StdRng::seed_from_u64(seed);

    let cluster = Arc::new(PgCluster::start().expect("private PostgreSQL cluster"));
    let db = cluster.create_database().await.expect("create database");
    let mut a = Server::serve(db.url(), &[]).await;
    let b = Server::serve(db.url(), &[]).await;

    let world = Arc::new(World::new());
    let w = &world;
    {
        let admin = db.connect().await.expect("connect");
        admin
            .execute(
                "INSERT INTO sessions (id, customer_id, kind) VALUES ($1, $2, 'paid'), ($3, $4, 'free')",
                &[&w.own_session, &w.customer, &w.other_session, &w.other_customer],
            )
            .await
            .expect("insert sessions");
        insert_rows(&admin, w, &mut rng, SEED_ROWS)
            .await
            .expect("seed rows");
    }

    // Replica A (index 0) and B (index 1), as a load balancer would hand them out.
    let balancer: Balancer = Arc::new(Mutex::new(vec![a.addr, b.addr]));
    let mechanic = |id, workshop| Principal {
        user_id: id,
        role: Role::Mechanic,
        workshop_id: workshop,
    };
    let service = Principal {
        user_id: Uuid::new_v4(),
        role: Role::Service,
        workshop_id: None,
    };
    let specs = vec![
        ClientSpec {
            name: "m1 (workshop W1)",
            who: mechanic(w.m1, Some(w.w1)),
            audiences: vec![
                Audience::Queue {
                    mechanic: w.m1,
                    workshop: Some(w.w1),
                },
                Audience::Mechanic(w.m1),
                Audience::Workshop(w.w1),
            ],
            replica: 0,
        },
        ClientSpec {
            name: "m3 (freelancer)",
            who: mechanic(w.m3, None),
            audiences: vec![
                Audience::Queue {
                    mechanic: w.m3,
                    workshop: None,
                },
                Audience::Mechanic(w.m3),
            ],
            replica: 0,
        },
        ClientSpec {
            name: "customer",
            who: Principal {
                user_id: w.customer,
                role: Role::Customer,
                workshop_id: None,
            },
            audiences: vec![Audience::Session(w.own_session)],
            replica: 0,
        },
        ClientSpec {
            name: "service on A",
            who: service,
            audiences: vec![Audience::Everything],
            replica: 0,
        },
        ClientSpec {
            name: "m2 (workshop W2)",
            who: mechanic(w.m2, Some(w.w2)),
            audiences: vec![Audience::Queue {
                mechanic: w.m2,
                workshop: Some(w.w2),
            }],
            replica: 1,
        },
        ClientSpec {
            name: "m4 (workshop W1)",
            who: mechanic(w.m4, Some(w.w1)),
            audiences: vec![
                Audience::Queue {
                    mechanic: w.m4,
                    workshop: Some(w.w1),
                },
                Audience::Workshop(w.w1),
            ],
            replica: 1,
        },
        ClientSpec {
            name: "service on B",
            who: service,
            audiences: vec![Audience::Everything],
            replica: 1,
        },
    ];
    let stop = CancellationToken::new();
    let mut clients: Vec<TestClient> = specs
        .into_iter()
        .map(|spec| spawn_client(spec, balancer.clone(), stop.clone()))
        .collect();
    for c in &clients {
        wait_until(
            || c.record().all_live(),
            || format!("{} never subscribed: {:?}", c.spec.name, c.record()),
        )
        .await;
    }
    eprintln!("{:?}: clients subscribed", began.elapsed());

    let committed = Arc::new(AtomicU64::new(0));
    let unknown = Arc::new(AtomicU64::new(0));
    let (allowed, allowed_rx) = watch::channel(SEGMENT);
    let writers: Vec<JoinHandle<Vec<Uuid>>> = (0..WRITERS)
        .map(|i| {
            spawn_writer(
                db.clone(),
                world.clone(),
                seed.wrapping_add(1 + i as u64),
                committed.clone(),
                unknown.clone(),
                allowed_rx.clone(),
            )
        })
        .collect();

    // Each fault is injected in the middle of a segment, after raising the budget to the end
    // of the next one: the writers keep committing through it.
    for fault in 1..=4u64 {
        wait_committed(&committed, fault * SEGMENT - SEGMENT / 2).await;
        allowed.send_replace((fault + 1) * SEGMENT);
        let (at, since) = (committed.load(Ordering::Relaxed), began.elapsed());
        match fault {
            1 => {
                let before = [listener_reconnects(&a).await, listener_reconnects(&b).await];
                let admin = db.connect().await.expect("connect");
                let killed: i64 = admin
                    .query_one(
                        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) \
                         FROM pg_stat_activity \
                         WHERE application_name ~ '^pgcast-listener(:[0-9]+)?$' \
                           AND datname = current_database()",
                        &[],
                    )
                    .await
                    .expect("terminate the listeners")
                    .get(0);
                assert_eq!(killed, 2, "one LISTEN connection per replica");
                wait_listeners_back(&[&a, &b], &before).await;
            }
            2 => {
                // A restart (as `PgCluster::restart`), in two steps: while PostgreSQL is
                // down, a new client joins; its first subscription (a snapshot, and for a
                // session the ownership check) is answered `unavailable` and retried.
                let before = [listener_reconnects(&a).await, listener_reconnects(&b).await];
                let c = cluster.clone();
                tokio::task::spawn_blocking(move || c.stop())
                    .await
                    .expect("stop task")
                    .expect("stop PostgreSQL");
                let late = spawn_client(
                    ClientSpec {
                        name: "customer joining during the restart",
                        who: Principal {
                            user_id: w.other_customer,
                            role: Role::Customer,
                            workshop_id: None,
                        },
                        audiences: vec![Audience::Session(w.other_session)],
                        replica: 0,
                    },
                    balancer.clone(),
                    stop.clone(),
                );
                wait_until(
                    || late.record().retries > 0,
                    || {
                        format!(
                            "no `unavailable` while PostgreSQL is down: {:?}",
                            late.record()
                        )
                    },
                )
                .await;
                let c = cluster.clone();
                tokio::task::spawn_blocking(move || c.start_again())
                    .await
                    .expect("start task")
                    .expect("start PostgreSQL again");
                wait_listeners_back(&[&a, &b], &before).await;
                wait_until(
                    || late.record().all_live(),
                    || format!("the late client never subscribed: {:?}", late.record()),
                )
                .await;
                clients.push(late);
            }
            3 => {
                let on_a: Vec<&TestClient> =
                    clients.iter().filter(|c| c.spec.replica == 0).collect();
                let before: Vec<usize> = on_a.iter().map(|c| c.record().connects.len()).collect();
                a.process.signal("KILL");
                a.process.wait_exit(LIMIT).await;
                a = serve_again(db.url(), a.addr).await;
                balancer.lock().unwrap_or_else(|e| e.into_inner())[0] = a.addr;
                wait_reconnected(&on_a, &before, a.addr).await;
            }
            _ => {
                let on_a: Vec<&TestClient> =
                    clients.iter().filter(|c| c.spec.replica == 0).collect();
                let before: Vec<usize> = on_a.iter().map(|c| c.record().connects.len()).collect();
                // The load balancer drops A, which dies.
                *balancer.lock().unwrap_or_else(|e| e.into_inner()) = vec![b.addr];
                a.process.signal("KILL");
                a.process.wait_exit(LIMIT).await;
                wait_reconnected(&on_a, &before, b.addr).await;
            }
        }
        eprintln!(
            "{since:?}: fault {fault} injected at {at} events; recovered after {:?}, at {} events",
            began.elapsed() - since,
            committed.load(Ordering::Relaxed)
        );
    }
    let mut confirmed = Vec::new();
    for writer in writers {
        confirmed.extend(writer.await.expect("writer"));
    }
    eprintln!(
        "{:?}: writers done ({} events confirmed, {} changes of unknown outcome)",
        began.elapsed(),
        committed.load(Ordering::Relaxed),
        unknown.load(Ordering::Relaxed)
    );

    // The truth.
    let log = read_log(&db).await;
    assert!(
        log.len() as u64 >= TOTAL,
        "the log has {} events, fewer than the {TOTAL} committed",
        log.len()
    );
    let positions: Vec<i64> = log.iter().map(|e| e.position).collect();
    assert!(positions.windows(2).all(|p| p[0] < p[1]));
    // Every confirmed insert is in the log, once.
    let mut inserts: HashMap<Uuid, usize> = HashMap::new();
    for e in log.iter().filter(|e| e.op == "insert") {
        *inserts.entry(e.id).or_default() += 1;
    }
    for id in &confirmed {
        assert_eq!(
            inserts.get(id),
            Some(&1),
            "confirmed insert {id} in the log once"
        );
    }
    assert!(inserts.values().all(|n| *n == 1), "an insert logged twice");

    // What each client and topic is due: every visible event after its snapshot.
    let due = |c: &TestClient, audience: &Audience| -> Vec<&LogEvent> {
        let start = c.record().topics[&audience.topic()]
            .start
            .expect("subscribed");
        log.iter()
            .filter(|e| e.position > start && audience.sees(e))
            .collect()
    };
    // Every client has received the last event due on each topic (or gave up), or the time is
    // up: the comparison below then says what is missing.
    let deadline = Instant::now() + PATIENCE;
    let mut failures = Vec::new();
    for c in &clients {
        for audience in &c.spec.audiences {
            let Some(last) = due(c, audience).last().map(|e| e.position) else {
                continue;
            };
            let caught_up = || {
                let r = c.record();
                !r.problems.is_empty() || r.topics[&audience.topic()].last >= Some(last)
            };
            while !caught_up() && Instant::now() < deadline {
                tokio::time::sleep(POLL).await;
            }
            if !caught_up() {
                let r = c.record();
                failures.push(format!(
                    "{} on {}: not caught up within {PATIENCE:?}: last position {:?}, due \
                     through {last}; connects {:?}, ends {:?}",
                    c.spec.name,
                    audience.topic(),
                    r.topics[&audience.topic()].last,
                    r.connects,
                    r.ends
                ));
            }
        }
    }
    stop.cancel();
    eprintln!("{:?}: clients done", began.elapsed());

    for c in clients {
        let TestClient { spec, record, task } = c;
        task.await.expect("client task");
        let r = lock(&record);
        for p in &r.problems {
            failures.push(format!("{}: {p}", spec.name));
        }
        for audience in &spec.audiences {
            let topic = audience.topic();
            let t = &r.topics[&topic];
            let start = t.start.expect("subscribed");
            let expected: Vec<&LogEvent> = log
                .iter()
                .filter(|e| e.position > start && audience.sees(e))
                .collect();
            failures.extend(
                compare(&t.events, &expected, &log, audience)
                    .into_iter()
                    .map(|f| format!("{} on {topic}: {f}", spec.name)),
            );
            let snapshot = visible_at(&log, start, audience);
            if t.snapshot != snapshot {
                failures.push(format!(
                    "{} on {topic}: snapshot at {start} has {} rows, {} due (extra {:?}, missing {:?})",
                    spec.name,
                    t.snapshot.len(),
                    snapshot.len(),
                    t.snapshot.keys().filter(|k| !snapshot.contains_key(k)).take(5).collect::<Vec<_>>(),
                    snapshot.keys().filter(|k| !t.snapshot.contains_key(k)).take(5).collect::<Vec<_>>(),
                ));
            }
        }
        eprintln!(
            "{}: {} events on {} topics, connects {:?}, ends {:?}, subscribe retries {}",
            spec.name,
            r.topics.values().map(|t| t.events.len()).sum::<usize>(),
            r.topics.len(),
            r.connects,
            r.ends,
            r.retries
        );
        if spec.replica == 0 {
            // Its replica was killed twice: it came back to A, then moved to B.
            assert!(r.connects.len() >= 3, "{}: {:?}", spec.name, r.connects);
            assert_eq!(r.connects.last(), Some(&b.addr), "{}", spec.name);
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!(
        "{:?}: {} events in the log, every client got exactly its own",
        began.elapsed(),
        log.len()
    );
}

/// Differences between what a client received on a topic and what it was due.
fn compare(
    got: &[Got],
    expected: &[&LogEvent],
    log: &[LogEvent],
    audience: &Audience,
) -> Vec<String> {
    let mut failures = Vec::new();
    if let Some(w) = got.windows(2).find(|w| w[1].position <= w[0].position) {
        failures.push(format!(
            "out of order or repeated: position {} after {}",
            w[1].position, w[0].position
        ));
    }
    let by_position: HashMap<i64, &LogEvent> = log.iter().map(|e| (e.position, e)).collect();
    let due: HashSet<i64> = expected.iter().map(|e| e.position).collect();
    let received: HashSet<i64> = got.iter().map(|g| g.position).collect();
    let mut seen = HashSet::new();
    let repeated: Vec<i64> = got
        .iter()
        .filter(|g| !seen.insert(g.position))
        .map(|g| g.position)
        .collect();
    if !repeated.is_empty() {
        failures.push(format!(
            "{} events received more than once, e.g. {:?}",
            repeated.len(),
            &repeated[..repeated.len().min(10)]
        ));
    }
    let missing: Vec<i64> = expected
        .iter()
        .map(|e| e.position)
        .filter(|p| !received.contains(p))
        .collect();
    if !missing.is_empty() {
        failures.push(format!(
            "{} of {} due events missing, e.g. {:?}",
            missing.len(),
            expected.len(),
            &missing[..missing.len().min(10)]
        ));
    }
    for g in got.iter().filter(|g| !due.contains(&g.position)) {
        let why = match by_position.get(&g.position) {
            None => "not in the log".to_owned(),
            Some(e) if !audience.sees(e) => format!("MAY NOT SEE IT (leak): {e:?}"),
            Some(_) => "before the snapshot position".to_owned(),
        };
        failures.push(format!("received position {}: {why}", g.position));
    }
    for g in got {
        if let Some(diff) = by_position.get(&g.position).and_then(|e| g.differs_from(e)) {
            failures.push(format!("content differs from the log: {diff}"));
        }
    }
    failures.truncate(20);
    failures
}

// ---------------------------------------------------------------------------------------------
// No secret or token in the logs.

/// Signs `claims` with `secret` (HS256).
fn sign(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("sign")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

#[tokio::test]
async fn no_secret_or_token_is_logged_at_debug_level() {
    assert_logs_hold_no_secret("debug").await;
}

/// No secret or token is *ever* written to logs (README, "Commands"), whatever the log level
/// an operator chooses while investigating.
#[tokio::test]
async fn no_secret_or_token_is_logged_at_trace_level() {
    assert_logs_hold_no_secret("trace").await;
}

/// Runs `pgcast serve` with `RUST_LOG=<rust_log>`, lets valid and refused tokens in, events
/// flow, clients leave, then stops it with SIGTERM: neither the JWT secret, the database
/// password, nor any token (or its claims or signature part) may appear in its output.
async fn assert_logs_hold_no_secret(rust_log: &str) {
    let (db, admin) = fresh_db().await;
    let secret = format!("log-test-secret-{}", Uuid::new_v4().simple());
    // The cluster trusts local connections, so a password in the URL is accepted and unused:
    // it must not be printed either.
    let password = format!("pw{}", Uuid::new_v4().simple());
    let url = db
        .url()
        .replacen("://postgres@", &format!("://postgres:{password}@"), 1);
    assert_ne!(url, db.url(), "a password in the URL");
    let mut cmd = serve_command(&url, "127.0.0.1:0", &secret);
    cmd.env("RUST_LOG", rust_log);
    let mut server = Server::ready(Process::spawn(cmd)).await;

    let mechanic = Principal {
        user_id: Uuid::new_v4(),
        role: Role::Mechanic,
        workshop_id: Some(Uuid::new_v4()),
    };
    let service = Principal {
        user_id: Uuid::new_v4(),
        role: Role::Service,
        workshop_id: None,
    };
    let valid_mechanic = token_for(secret.as_bytes(), &mechanic, Duration::from_secs(600));
    let valid_service = token_for(secret.as_bytes(), &service, Duration::from_secs(600));
    let wrong_secret = token_for(
        b"not-the-secret-but-just-as-long-32b",
        &mechanic,
        Duration::from_secs(600),
    );
    let expired = sign(
        secret.as_bytes(),
        &json!({"sub": Uuid::new_v4(), "role": "mechanic", "exp": unix_now() - 3600}),
    );
    let garbage = format!(
        "garbage{}.{}.{}",
        Uuid::new_v4().simple(),
        Uuid::new_v4().simple(),
        Uuid::new_v4().simple()
    );
    // Unsigned (`alg: none`), with the claims of a service.
    let unsigned = {
        let valid = token_for(secret.as_bytes(), &service, Duration::from_secs(600));
        let claims = valid.split('.').nth(1).expect("claims part").to_owned();
        // {"alg":"none","typ":"JWT"}
        format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.")
    };

    // Valid clients subscribe and receive events; one refreshes with its token a second time.
    let mut m = Ws::connect(server.addr, &valid_mechanic).await;
    m.subscribe("queue", json!({"snapshot": true})).await;
    let snapshot = m.recv().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    let mut s = server.client(&valid_service).await;
    s.subscribe("assignments", json!({})).await;
    admin
        .execute(
            "INSERT INTO session_assignments (session_id, status, customer_name) \
             SELECT gen_random_uuid(), 'queued', 'Ana' FROM generate_series(1, 3)",
            &[],
        )
        .await
        .expect("insert");
    m.events(3).await;
    s.events(3).await;
    s.send(json!({"type": "auth", "token": valid_service}))
        .await;
    let again = s.recv().await;
    assert_eq!(again["type"], "ready", "{again}");

    // Refused tokens: an error, then close 1008.
    let refused = [&wrong_secret, &expired, &garbage, &unsigned];
    for token in refused {
        let mut ws = Ws::open(server.addr).await.expect("connect");
        ws.send(json!({"type": "auth", "token": token})).await;
        let reply = ws.recv().await;
        assert_eq!(reply["code"], "unauthorized", "{reply}");
        ws.expect_close(1008).await;
    }
    m.close().await;
    s.close().await;
    // Every refusal is logged (with its reason) before the process is stopped.
    server
        .process
        .wait_stderr(|log| log.matches("websocket authentication failed").count() >= refused.len())
        .await;

    server.process.signal("TERM");
    let status = server.process.wait_exit(LIMIT).await;
    assert!(status.success(), "{status:?}");
    let output = format!("{}{}", server.process.stdout(), server.process.stderr());
    let level = format!(" {} ", rust_log.to_uppercase());
    assert!(
        output.contains(&level),
        "{rust_log} logging is on (else this test proves little):\n{output}"
    );

    let mut secrets = vec![
        ("the JWT secret", secret.clone()),
        ("the database password", password),
    ];
    for (name, token) in [
        ("valid mechanic token", &valid_mechanic),
        ("valid service token", &valid_service),
        ("token signed with another secret", &wrong_secret),
        ("expired token", &expired),
        ("garbage token", &garbage),
        ("unsigned token", &unsigned),
    ] {
        secrets.push((name, token.clone()));
        // Also as the hex dump of a frame's payload.
        secrets.push((name, token.bytes().map(|b| format!("{b:02x}")).collect()));
        // The claims and signature parts on their own (the header part is the same in every
        // HS256 token, and not secret).
        for part in token.split('.').skip(1).filter(|p| p.len() >= 16) {
            secrets.push((name, part.to_owned()));
        }
    }
    let leaks: Vec<String> = secrets
        .iter()
        .filter(|(_, text)| output.contains(text.as_str()))
        .map(|(name, text)| {
            let line = output
                .lines()
                .find(|l| l.contains(text.as_str()))
                .unwrap_or_default();
            format!("{name} ({text}), e.g. in: {}", clip(line, 300))
        })
        .collect();
    assert!(
        leaks.is_empty(),
        "RUST_LOG={rust_log}: {} secrets written to the log:\n{}",
        leaks.len(),
        leaks.join("\n")
    );
}

/// At most `n` bytes of `text` (on a character boundary).
fn clip(text: &str, n: usize) -> &str {
    let mut end = text.len().min(n);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

//! Nothing is lost across faults (docs/architecture.md §3): the listener's output equals the log exactly —
//! same positions, same rows, same operations, no loss, no duplicate, in order — when its
//! connection is killed or PostgreSQL restarts while a writer commits; and the log holds
//! exactly the rows the writer committed.
//!
//! The writer runs until the test has made its faults and then commits more, so every fault
//! falls in the middle of the writes: each test checks that rows committed before and after
//! every fault (and, for the restart, that the writer's own connection broke).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pgcast_events::{AssignmentEvent, EventKind};
use pgcast_listener::{Output, Start, APPLICATION_NAME};
use pgcast_testkit::{PgCluster, TestDb};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

const ROWS: usize = 5_000;
const ROWS_PER_TX: i32 = 10;
/// Transactions the writer still commits after it is told the faults are over.
const AFTER_FAULTS: usize = 20;

/// What the writer did. Rows are named `t<transaction>-<n>` (their `customer_name`).
#[derive(Debug, Default)]
struct Written {
    /// Rows of transactions whose commit was confirmed.
    confirmed: BTreeSet<String>,
    /// Rows of transactions whose outcome is unknown (the connection broke during them):
    /// each may or may not be in the log, but as a whole transaction.
    unknown: BTreeSet<String>,
    /// How many statements failed: the writer's connection broke under it.
    failures: usize,
}

/// A writer committing `ROWS_PER_TX` rows per transaction, reconnecting and retrying through
/// outages, until it has been told to finish ([`finish`](Self::finish)) and has then committed
/// [`AFTER_FAULTS`] more transactions and at least `ROWS` rows in all.
struct Writer {
    finish: watch::Sender<bool>,
    task: JoinHandle<Written>,
}

impl Writer {
    fn spawn(db: TestDb) -> Writer {
        let (finish, mut finishing) = watch::channel(false);
        let task = tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut written = Written::default();
            let mut client: Option<Client> = None;
            let mut tx = 0usize;
            let mut last_tx = None;
            loop {
                if last_tx.is_none() && *finishing.borrow_and_update() {
                    last_tx = Some(tx + AFTER_FAULTS);
                }
                if last_tx.is_some_and(|last| tx >= last) && written.confirmed.len() >= ROWS {
                    return written;
                }
                assert!(Instant::now() < deadline, "writer could not finish");
                let Some(c) = client.as_ref() else {
                    client = db.connect().await.ok();
                    if client.is_none() {
                        // The server is restarting: try the next connection shortly.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    continue;
                };
                let tag = format!("t{tx}-");
                let rows = (1..=ROWS_PER_TX).map(|g| format!("{tag}{g}"));
                let result = c
                    .execute(
                        "INSERT INTO session_assignments (session_id, status, customer_name)
                         SELECT gen_random_uuid(), 'queued', $1 || g
                         FROM generate_series(1, $2) g",
                        &[&tag, &ROWS_PER_TX],
                    )
                    .await;
                match result {
                    Ok(_) => written.confirmed.extend(rows),
                    // Outcome unknown for the in-flight transaction; the log is the truth.
                    Err(_) => {
                        written.unknown.extend(rows);
                        written.failures += 1;
                        client = None;
                    }
                }
                tx += 1;
            }
        });
        Writer { finish, task }
    }

    /// Tells the writer the faults are over; returns what it wrote once it has finished.
    async fn finish(self) -> Written {
        assert!(
            !self.task.is_finished(),
            "the writer stopped before the faults were over"
        );
        self.finish.send(true).expect("writer running");
        self.task.await.expect("writer")
    }
}

/// The log's head position (0 when empty).
async fn head(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT coalesce(max(position), 0) FROM pgcast.assignment_events",
            &[],
        )
        .await
        .expect("read the head")
        .get(0)
}

/// One event as the log holds it and as the listener must emit it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    position: i64,
    op: String,
    assignment: uuid::Uuid,
    customer_name: Option<String>,
}

fn entry(e: &AssignmentEvent) -> Entry {
    Entry {
        position: e.position,
        op: match e.kind {
            EventKind::Created => "insert",
            EventKind::Updated => "update",
            EventKind::Deleted => "delete",
        }
        .to_owned(),
        assignment: e.assignment.id,
        customer_name: e.assignment.customer_name.clone(),
    }
}

/// The whole log, in order, but `assert_quiet`'s markers.
async fn log_entries(client: &Client) -> Vec<Entry> {
    client
        .query(
            "SELECT position, op, assignment_id, payload->'row'->>'customer_name'
             FROM pgcast.assignment_events
             WHERE payload->'row'->>'customer_name' IS DISTINCT FROM $1
             ORDER BY position",
            &[&MARKER],
        )
        .await
        .expect("read the log")
        .iter()
        .map(|r| Entry {
            position: r.get(0),
            op: r.get(1),
            assignment: r.get(2),
            customer_name: r.get(3),
        })
        .collect()
}

/// Adds to `got` until the listener has emitted everything up to the log's head, then checks
/// that `got` is exactly the log — position, operation, row and content — and that nothing
/// more follows.
async fn drain_to_head(running: &mut Running, client: &Client, mut got: Vec<Arc<AssignmentEvent>>) {
    let log = log_entries(client).await;
    let head = log.last().expect("a log").position;
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.last().map(|e: &Arc<AssignmentEvent>| e.position) != Some(head) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, running.events.recv()).await {
            Ok(Some(Output::Event(e))) => got.push(e),
            other => panic!(
                "listener emitted {} events, log has {}; then {other:?}",
                got.len(),
                log.len()
            ),
        }
    }
    running.assert_quiet().await;
    let emitted: Vec<i64> = got.iter().map(|e| e.position).collect();
    let logged: Vec<i64> = log.iter().map(|e| e.position).collect();
    assert_eq!(emitted.len(), log.len(), "count differs from the log");
    assert_eq!(emitted, logged, "listener output differs from the log");
    for (e, l) in got.iter().zip(&log) {
        assert_eq!(entry(e), *l, "event content differs from the log");
    }
}

/// The log against the writer: every row of a confirmed transaction is in it exactly once,
/// each row of a transaction with an unknown outcome at most once (and a transaction's rows
/// all or none), nothing else; and the table holds exactly the logged rows.
async fn log_matches_writes(client: &Client, written: &Written) {
    let log = log_entries(client).await;
    let mut logged = BTreeMap::<String, usize>::new();
    for e in &log {
        assert_eq!(e.op, "insert", "{e:?}");
        let name = e.customer_name.clone().expect("a named row");
        *logged.entry(name).or_default() += 1;
    }
    for name in &written.confirmed {
        assert_eq!(
            logged.remove(name),
            Some(1),
            "committed row {name} not logged once"
        );
    }
    for (name, n) in &logged {
        assert_eq!(*n, 1, "row {name} logged {n} times");
        assert!(
            written.unknown.contains(name),
            "row {name} was never written"
        );
    }
    let per_tx = |name: &String| name.split_once('-').map(|(t, _)| t.to_owned());
    let unknown_tx: BTreeSet<String> = logged.keys().filter_map(per_tx).collect();
    for tx in unknown_tx {
        let in_log = logged
            .keys()
            .filter(|n| per_tx(n).as_ref() == Some(&tx))
            .count();
        assert_eq!(
            in_log, ROWS_PER_TX as usize,
            "transaction {tx} logged in part"
        );
    }
    let table: i64 = client
        .query_one(
            "SELECT count(*) FROM session_assignments WHERE customer_name <> $1",
            &[&MARKER],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(table as usize, log.len(), "table rows and log rows differ");
    assert!(written.confirmed.len() >= ROWS);
}

#[tokio::test]
async fn terminated_listener_connection_loses_nothing() {
    let (db, admin) = migrated_db(PgCluster::shared().unwrap()).await;
    let mut running = start_listener(&db, Start::Head).await;
    let writer = Writer::spawn(db.clone());
    // Kill the LISTEN backend a few times while the writer is busy.
    let mut seen = Vec::new();
    let mut heads = vec![head(&admin).await];
    for _ in 0..3 {
        let batch = running.take(300, Duration::from_secs(30)).await;
        seen.extend(batch);
        let killed: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE (application_name = $1 OR starts_with(application_name, $1 || ':'))
                   AND datname = current_database()",
                &[&APPLICATION_NAME],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(killed, 1, "exactly one LISTEN connection");
        heads.push(head(&admin).await);
    }
    let written = writer.finish().await;
    heads.push(head(&admin).await);
    // Writes were in flight around every kill: the log grew before each and after the last.
    assert!(
        heads.windows(2).all(|w| w[0] < w[1]),
        "the log did not grow between the kills: heads {heads:?}"
    );
    drain_to_head(&mut running, &admin, seen).await;
    log_matches_writes(&admin, &written).await;
    assert!(running.status.snapshot().reconnects >= 3);
    running.stop().await;
}

#[tokio::test]
async fn postgres_restart_under_writes_loses_nothing() {
    let cluster = Arc::new(PgCluster::start().unwrap());
    let (db, admin) = migrated_db(&cluster).await;
    let mut running = start_listener(&db, Start::Head).await;
    let writer = Writer::spawn(db.clone());
    let seen = running.take(500, Duration::from_secs(30)).await;
    let before = head(&admin).await;
    drop(admin);

    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.restart())
        .await
        .unwrap()
        .expect("restart the cluster");

    let written = writer.finish().await;
    let admin = db.connect().await.expect("connect after the restart");
    // The writer was mid-stream: its connection broke under it, and it committed after.
    assert!(
        written.failures >= 1,
        "the restart broke no write of the writer"
    );
    let after = head(&admin).await;
    assert!(
        before > 0 && after > before,
        "no writes after the restart: head {before} → {after}"
    );
    // Draining while the listener reconnects: it blocks on a full output channel otherwise.
    drain_to_head(&mut running, &admin, seen).await;
    log_matches_writes(&admin, &written).await;
    assert!(running.status.snapshot().reconnects >= 1);
    running.stop().await;
}

/// The LISTEN connection's `application_name` carries the listener's position
/// (`pgcast-listener:<position>`, set by its probe every 0.5 s), which is how `pgcast doctor`
/// tells how far behind each listener is.
#[tokio::test]
async fn the_listen_connection_names_its_position() {
    let (db, admin) = migrated_db(PgCluster::shared().unwrap()).await;
    let mut running = start_listener(&db, Start::Head).await;
    admin.execute(INSERT_MANY, &[&3_i32]).await.unwrap();
    let got = running.take(3, Duration::from_secs(30)).await;
    let expected = format!("{APPLICATION_NAME}:{}", got[2].position);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let names: Vec<String> = admin
            .query(
                "SELECT application_name FROM pg_stat_activity
                 WHERE datname = current_database() AND starts_with(application_name, $1)",
                &[&APPLICATION_NAME],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if names == [expected.clone()] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "names {names:?}, expected [{expected}]"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop().await;
}

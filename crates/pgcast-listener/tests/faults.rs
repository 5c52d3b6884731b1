//! Nothing is lost across faults (design §3.3): the listener's output equals the log exactly —
//! no loss, no duplicate, in order — when its connection is killed or PostgreSQL restarts
//! while a writer commits.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pgcast_events::AssignmentEvent;
use pgcast_listener::{Start, APPLICATION_NAME};
use pgcast_testkit::{PgCluster, TestDb};
use tokio::task::JoinHandle;

const ROWS: usize = 5_000;
const ROWS_PER_TX: i32 = 10;

/// Commits `ROWS` rows in small transactions, reconnecting and retrying through outages.
/// Returns how many transactions were confirmed committed.
fn spawn_writer(db: TestDb) -> JoinHandle<usize> {
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut committed = 0;
        let mut client = None;
        while committed * (ROWS_PER_TX as usize) < ROWS {
            assert!(Instant::now() < deadline, "writer could not finish");
            if client.is_none() {
                client = db.connect().await.ok();
                if client.is_none() {
                    // The server is restarting: wait on the next connection attempt.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
            let Some(c) = client.as_ref() else { continue };
            let result = c
                .execute(
                    "INSERT INTO session_assignments (session_id, status, customer_name)
                     SELECT gen_random_uuid(), 'queued', 'w' || g FROM generate_series(1, $1) g",
                    &[&ROWS_PER_TX],
                )
                .await;
            match result {
                Ok(_) => committed += 1,
                // Outcome unknown for the in-flight transaction; the log is the truth.
                Err(_) => client = None,
            }
        }
        committed
    })
}

/// Adds to `got` until the listener has emitted everything up to the log's head, then checks
/// that `got` is exactly the log.
async fn drain_to_head(running: &mut Running, db: &TestDb, mut got: Vec<Arc<AssignmentEvent>>) {
    let client = db.connect().await.unwrap();
    let log = log_positions(&client).await;
    let head = *log.last().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.last().map(|e: &Arc<AssignmentEvent>| e.position) != Some(head) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, running.events.recv()).await {
            Ok(Some(e)) => got.push(e),
            _ => panic!(
                "listener emitted {} events, log has {}",
                got.len(),
                log.len()
            ),
        }
    }
    running.assert_quiet().await;
    let emitted: Vec<i64> = got.iter().map(|e| e.position).collect();
    assert_eq!(emitted.len(), log.len(), "count differs from the log");
    assert_eq!(emitted, log, "listener output differs from the log");
}

#[tokio::test]
async fn terminated_listener_connection_loses_nothing() {
    let (db, admin) = migrated_db(PgCluster::shared().unwrap()).await;
    let mut running = start_listener(&db, Start::Head).await;
    let writer = spawn_writer(db.clone());
    // Kill the LISTEN backend a few times while the writer is busy.
    let mut kills = 0;
    let mut seen = Vec::new();
    while kills < 3 {
        let batch = running.take(300, Duration::from_secs(30)).await;
        seen.extend(batch);
        let killed: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE application_name = $1 AND datname = current_database()",
                &[&APPLICATION_NAME],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(killed, 1, "exactly one LISTEN connection");
        kills += 1;
    }
    let committed = writer.await.unwrap();
    assert!(committed * ROWS_PER_TX as usize >= ROWS);
    drain_to_head(&mut running, &db, seen).await;
    assert!(log_positions(&admin).await.len() >= ROWS);
    assert!(running.status.snapshot().reconnects >= 3);
    running.stop().await;
}

#[tokio::test]
async fn postgres_restart_under_writes_loses_nothing() {
    let cluster = Arc::new(PgCluster::start().unwrap());
    let (db, _admin) = migrated_db(&cluster).await;
    let mut running = start_listener(&db, Start::Head).await;
    let writer = spawn_writer(db.clone());
    let seen = running.take(500, Duration::from_secs(30)).await;

    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.restart())
        .await
        .unwrap()
        .expect("restart the cluster");

    let committed = writer.await.unwrap();
    assert!(committed * ROWS_PER_TX as usize >= ROWS);
    // Draining while the listener reconnects: it blocks on a full output channel otherwise.
    drain_to_head(&mut running, &db, seen).await;
    assert!(running.status.snapshot().reconnects >= 1);
    running.stop().await;
}

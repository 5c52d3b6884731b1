//! Snapshot, replay, live delivery and slow consumers over real sockets (docs/architecture.md §4, §3.5).

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn live_events_reach_a_queue_subscriber() {
    let h = Harness::start().await;
    let who = mechanic(None);
    let mut ws = h.client(&who).await;
    ws.subscribe("queue", json!({})).await;
    let id = h.insert(Uuid::new_v4(), "queued", None, None).await;
    let ev = ws.events(1).await.remove(0);
    assert_eq!(ev["topic"], "queue");
    assert_eq!(ev["event"], "assignment.created");
    assert_eq!(ev["assignment"]["id"], id.to_string());
    assert_eq!(ev["old_status"], serde_json::Value::Null);
    assert!(ev["position"].as_i64().unwrap() > 0);
    ws.send(json!({"type": "ping", "id": "p1"})).await;
    assert_eq!(ws.recv().await, json!({"type": "pong", "id": "p1"}));
    h.stop().await;
}

/// At least this many writes, and at least [`AFTER_SNAPSHOT`] of them after the snapshot, so
/// the snapshot is always taken in the middle of the writes (it must race them to prove
/// anything).
const WRITES: usize = 300;
const AFTER_SNAPSHOT: usize = 50;

#[tokio::test]
async fn snapshot_then_live_under_concurrent_writes_loses_and_doubles_nothing() {
    let h = Harness::start().await;
    let writer_db = h.db.clone();
    let (snapshot_taken, mut taken) = tokio::sync::watch::channel(false);
    // Writes keep committing while the snapshot is taken, and go on after it.
    let writer = tokio::spawn(async move {
        let c = writer_db.connect().await.unwrap();
        let mut ids = Vec::new();
        let mut stop_at = None;
        for i in 0.. {
            if stop_at.is_none() && *taken.borrow_and_update() {
                stop_at = Some((i + AFTER_SNAPSHOT).max(WRITES));
            }
            if stop_at.is_some_and(|end| i >= end) {
                break;
            }
            let id: Uuid = c
                .query_one(
                    "INSERT INTO session_assignments (session_id, status, customer_name)
                     VALUES (gen_random_uuid(), 'queued', $1) RETURNING id",
                    &[&format!("c{i}")],
                )
                .await
                .unwrap()
                .get(0);
            ids.push(id);
            if i % 3 == 0 {
                // Some leave the queue again.
                c.execute(
                    "UPDATE session_assignments SET status = 'cancelled' WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            }
        }
        ids
    });
    // Let the writer get going, then snapshot mid-stream.
    while h.log_head().await < 50 {
        tokio::task::yield_now().await;
    }
    let mut ws = h.client(&mechanic(None)).await;
    let sub = ws.subscribe("queue", json!({"snapshot": true})).await;
    let snap = ws.recv().await;
    snapshot_taken.send(true).unwrap();
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["position"], sub["position"]);
    let ids = writer.await.unwrap();
    let head = h.log_head().await;
    let snapshot_at = snap["position"].as_i64().unwrap();
    // The race happened: writes committed after the snapshot's position, so what follows
    // must be stitched onto it.
    assert!(
        snapshot_at < head,
        "the snapshot ({snapshot_at}) was not taken while writes went on (head {head})"
    );

    // Rebuild the queue from snapshot + events and compare with the table.
    let mut queue: std::collections::BTreeSet<String> = snap["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect();
    let mut last = snapshot_at;
    let mut live = 0;
    while last < head {
        let ev = ws.events(1).await.remove(0);
        let pos = ev["position"].as_i64().unwrap();
        assert!(pos > last, "duplicate or out of order: {pos} after {last}");
        last = pos;
        live += 1;
        let id = ev["assignment"]["id"].as_str().unwrap().to_owned();
        if ev["assignment"]["status"] == "queued" {
            assert!(queue.insert(id), "row doubled");
        } else {
            assert!(queue.remove(&id), "removed a row that was not there");
        }
    }
    // Every write after the snapshot is a queue event (an insert into the general queue).
    assert!(
        live >= AFTER_SNAPSHOT,
        "only {live} live events followed the snapshot"
    );
    let expected: std::collections::BTreeSet<String> = h
        .admin
        .query(
            "SELECT id::text FROM session_assignments WHERE status = 'queued'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(queue, expected);
    assert!(ids.len() >= WRITES);
    assert_eq!(expected.len(), ids.len() - ids.len().div_ceil(3));
    // And nothing after the head: no late duplicate of a snapshot row or a live event.
    let marker = h.marker().await;
    ws.nothing_before(marker).await;
    h.stop().await;
}

#[tokio::test]
async fn since_replays_missed_events_once_then_goes_live() {
    let h = Harness::start().await;
    let who = mechanic(None);
    let session = Uuid::new_v4();
    let first = h.insert(session, "queued", None, None).await;
    let since = h.log_head().await;
    let mut missed = Vec::new();
    for _ in 0..5 {
        missed.push(h.insert(session, "queued", None, None).await);
    }
    // Another workshop's row in between must not be replayed.
    h.insert(session, "queued", None, Some(Uuid::new_v4()))
        .await;
    let mut ws = h.client(&who).await;
    let sub = ws.subscribe("queue", json!({"since": since})).await;
    assert_eq!(sub["position"], since);
    let replayed = ws.events(5).await;
    let got: Vec<String> = replayed
        .iter()
        .map(|e| e["assignment"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        got,
        missed.iter().map(|u| u.to_string()).collect::<Vec<_>>()
    );
    assert!(!got.contains(&first.to_string()));
    let live = h.insert(session, "queued", None, None).await;
    let ev = ws.events(1).await.remove(0);
    assert_eq!(ev["assignment"]["id"], live.to_string());
    h.nothing_more(&mut ws, &who).await;
    h.stop().await;
}

#[tokio::test]
async fn since_older_than_retention_or_ahead_of_the_log_gets_resync() {
    // Without a replay window every resume reads the log (the window would still hold the
    // pruned events and serve them, contiguous).
    let h = Harness::start_with(|c| c.replay_window = 0).await;
    for _ in 0..3 {
        h.insert(Uuid::new_v4(), "queued", None, None).await;
    }
    // Retention removed the first events.
    h.admin
        .execute(
            "UPDATE pgcast.committed_statements SET committed_at = now() - interval '2 days'
             WHERE last_position <= 2",
            &[],
        )
        .await
        .unwrap();
    let pruned: i32 = h
        .admin
        .query_one("SELECT pgcast.prune_events(interval '1 day')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pruned, 2);
    let mut ws = h.client(&service()).await;
    ws.subscribe("assignments", json!({"since": 1})).await;
    let resync = ws.recv().await;
    assert_eq!(resync["type"], "resync", "{resync}");
    assert_eq!(resync["topic"], "assignments");
    ws.subscribe("assignments", json!({"since": 1_000_000}))
        .await;
    assert_eq!(ws.recv().await["type"], "resync");
    // From the retention boundary on, replay works.
    ws.subscribe("assignments", json!({"since": 2})).await;
    let ev = ws.events(1).await.remove(0);
    assert_eq!(ev["position"], 3);
    h.stop().await;
}

/// A gap in the listener's stream (the log pruned past its position while it was cut off)
/// closes every subscribed connection with 1001 (going away: resume) before any event after the gap reaches it,
/// and a resume from before the gap gets `resync` — from the log (`assignments`) and from the
/// replay window (`queue`) alike — never the events after it as if nothing had been missed.
#[tokio::test]
async fn a_gap_in_the_stream_closes_subscribers_and_their_resume_gets_resync() {
    let h = Harness::start().await;
    let who = mechanic(None);
    let mut service_ws = h.client(&service()).await;
    service_ws.subscribe("assignments", json!({})).await;
    let mut queue_ws = h.client(&who).await;
    queue_ws.subscribe("queue", json!({})).await;
    h.insert(Uuid::new_v4(), "queued", None, None).await;
    let seen = service_ws.events(1).await.remove(0)["position"]
        .as_i64()
        .unwrap();
    assert_eq!(queue_ws.events(1).await.remove(0)["position"], seen);

    // Retention removed positions the listener had not read yet (here positions no commit
    // used: the listener cannot tell the difference), then a commit after them rings.
    let boundary: i64 = h
        .admin
        .query_one(
            "SELECT setval('pgcast.event_position', nextval('pgcast.event_position') + 10)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    h.admin
        .execute(
            "UPDATE pgcast.log_state SET pruned_through = $1",
            &[&boundary],
        )
        .await
        .unwrap();
    h.insert(Uuid::new_v4(), "queued", None, None).await;
    for ws in [&mut service_ws, &mut queue_ws] {
        // The very next frame: any event after the gap would come before it.
        match ws.next(WAIT).await {
            Next::Close(Some(f)) => {
                assert_eq!(u16::from(f.code), 1001, "close reason: {}", f.reason);
                assert_eq!(
                    f.reason.as_str(),
                    "gap in the event stream: resume with since"
                )
            }
            Next::Json(v) if v["type"] == "event" => {
                panic!("an event reached a connection that missed the events before it: {v}")
            }
            other => panic!("expected close 1001, got {other:?}"),
        }
    }
    assert_eq!(h.listener.snapshot().gaps, 1);

    // The clients resume from what they had: told to resync, from the log and the window.
    let mut service_ws = h.client(&service()).await;
    service_ws
        .subscribe("assignments", json!({"since": seen}))
        .await;
    let resync = service_ws.recv().await;
    assert_eq!(resync["type"], "resync", "{resync}");
    let mut queue_ws = h.client(&who).await;
    queue_ws.subscribe("queue", json!({"since": seen})).await;
    let resync = queue_ws.recv().await;
    assert_eq!(resync["type"], "resync", "{resync}");
    // A fresh subscription goes on live after the gap.
    queue_ws.subscribe("queue", json!({})).await;
    let live = h.insert(Uuid::new_v4(), "queued", None, None).await;
    let ev = queue_ws.events(1).await.remove(0);
    assert_eq!(ev["assignment"]["id"], live.to_string());
    assert!(ev["position"].as_i64().unwrap() > boundary);
    h.stop().await;
}

#[tokio::test]
async fn a_slow_consumer_is_closed_with_4008_and_others_get_everything() {
    // Closed by the byte budget (the frame count stays far below its bound).
    let h = Harness::start_with(|c| c.outbound_bytes = 8 << 20).await;
    let mut fast = h.client(&service()).await;
    fast.subscribe("assignments", json!({})).await;
    let mut slow = h.client(&service()).await;
    slow.subscribe("assignments", json!({})).await;
    // The slow client never reads: the socket buffers fill (some MB on loopback), then its
    // queue overflows. 20,000 events of 1.5 KB are far more than both.
    let writer_db = h.db.clone();
    let writer = tokio::spawn(async move {
        let c = writer_db.connect().await.unwrap();
        for _ in 0..20 {
            c.execute(
                "INSERT INTO session_assignments (session_id, status, concern)
                 SELECT gen_random_uuid(), 'queued', repeat('x', 1500)
                 FROM generate_series(1, 1000)",
                &[],
            )
            .await
            .unwrap();
        }
    });
    let got = fast.events(20_000).await;
    writer.await.unwrap();
    assert!(got
        .windows(2)
        .all(|w| w[1]["position"].as_i64() > w[0]["position"].as_i64()));
    slow.expect_close(4008).await;
    h.stop().await;
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1001() {
    let h = Harness::start().await;
    let mut ws = h.client(&mechanic(None)).await;
    ws.subscribe("queue", json!({})).await;
    let gateway = h.gateway.clone();
    let closing = tokio::spawn(async move { gateway.shutdown(Duration::from_secs(5)).await });
    ws.expect_close(1001).await;
    assert!(
        closing.await.unwrap(),
        "gateway tasks finished within the grace period"
    );
    h.stop().await;
}

/// Replays race a pruner that deletes the log from its oldest end: every replay is either the
/// whole range, contiguous, or a contiguous start followed by `resync` — never a silent gap.
#[tokio::test]
async fn a_prune_during_replay_gives_resync_or_a_contiguous_stream_never_a_gap() {
    // The replays under test read the log: no replay window.
    let h = Harness::start_with(|c| c.replay_window = 0).await;
    let start = h.log_head().await;
    let mut watcher = h.watcher().await;
    h.admin
        .execute(
            // 2 KB rows: 12 MB per replay, more than loopback socket buffers hold, so the
            // replays are still reading the log while the pruner runs.
            "INSERT INTO session_assignments (session_id, status, customer_name, concern)
             SELECT gen_random_uuid(), 'queued', 'c' || g, repeat('x', 2000)
             FROM generate_series(1, 6000) g",
            &[],
        )
        .await
        .unwrap();
    let head = h.log_head().await;
    assert_eq!(head - start, 6000, "no holes in this test's positions");
    // The live stream of those rows is over before anyone subscribes: the replays alone are
    // under test.
    watcher.until_position(head).await;
    watcher.stop_following("assignments").await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(h.client(&service()).await);
    }
    // Every client subscribes from the start and has its first event (its replay is under
    // way); then the pruner eats the log from its oldest end in small batches.
    for ws in &mut clients {
        ws.send(json!({"type": "subscribe", "id": "r", "topic": "assignments", "since": start}))
            .await;
    }
    let mut firsts = Vec::new();
    for ws in &mut clients {
        let sub = ws.recv().await;
        assert_eq!(sub["type"], "subscribed", "{sub}");
        let first = ws.recv().await;
        assert_eq!(first["position"], start + 1, "{first}");
        firsts.push(first);
    }
    let pruner = {
        let db = h.db.clone();
        tokio::spawn(async move {
            let client = db.connect().await.unwrap();
            loop {
                let n: i32 = client
                    .query_one("SELECT pgcast.prune_events('0 seconds', 150)", &[])
                    .await
                    .unwrap()
                    .get(0);
                if n == 0 {
                    return;
                }
            }
        })
    };
    let mut outcomes = Vec::new();
    for ws in &mut clients {
        let mut expected = start + 2;
        loop {
            match ws.next(WAIT).await {
                Next::Json(v) if v["type"] == "event" => {
                    assert_eq!(v["position"], expected, "a gap in the replay");
                    expected += 1;
                    if expected > head {
                        outcomes.push("complete");
                        break;
                    }
                }
                Next::Json(v) if v["type"] == "resync" => {
                    outcomes.push("resync");
                    break;
                }
                other => panic!("after position {}: {other:?}", expected - 1),
            }
        }
    }
    pruner.await.unwrap();
    eprintln!("replays under pruning: {outcomes:?}");
    // Once the log is gone, a resume from the start is told to resync at once.
    let mut late = h.client(&service()).await;
    late.subscribe("assignments", json!({"since": start})).await;
    assert_eq!(late.recv().await["type"], "resync");
    h.stop().await;
}

/// A connection waiting on the database (a snapshot blocked behind a lock) still closes with
/// 1001 at shutdown, and the gateway's shutdown does not wait for the query.
#[tokio::test]
async fn a_connection_waiting_on_the_database_still_closes_at_shutdown() {
    let h = Harness::start().await;
    let mut locker = h.db.connect().await.unwrap();
    let tx = locker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE session_assignments IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut ws = h.client(&service()).await;
    ws.send(json!({"type": "subscribe", "id": "s", "topic": "assignments", "snapshot": true}))
        .await;
    // The snapshot is now waiting for the lock: nothing comes back meanwhile. (No marker can
    // be written while the table is locked; this only shows the subscribe is still pending.)
    assert!(
        matches!(ws.next(Duration::from_millis(300)).await, Next::Nothing),
        "the snapshot answered while its table was locked"
    );
    assert!(
        h.gateway.shutdown(Duration::from_secs(5)).await,
        "shutdown waited for a connection stuck on the database"
    );
    ws.expect_close(1001).await;
    tx.rollback().await.unwrap();
    h.stop().await;
}

/// `mechanic:` and `workshop:` snapshots hold what a page shows — the open rows — not every
/// finished assignment ever (history comes with `since`).
#[tokio::test]
async fn mechanic_and_workshop_snapshots_hold_open_rows_only() {
    let h = Harness::start().await;
    let w = Uuid::new_v4();
    let m = mechanic(Some(w));
    let open = h
        .insert(Uuid::new_v4(), "accepted", Some(m.user_id), Some(w))
        .await;
    let offered = h
        .insert(Uuid::new_v4(), "offered", Some(m.user_id), Some(w))
        .await;
    for status in ["completed", "cancelled", "declined", "expired"] {
        h.insert(Uuid::new_v4(), status, Some(m.user_id), Some(w))
            .await;
    }
    let mut ws = h.client(&m).await;
    for topic in [format!("mechanic:{}", m.user_id), format!("workshop:{w}")] {
        ws.subscribe(&topic, json!({"snapshot": true})).await;
        let snap = ws.recv().await;
        assert_eq!(snap["type"], "snapshot", "{snap}");
        let mut ids: Vec<String> = snap["assignments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        let mut want = vec![open.to_string(), offered.to_string()];
        want.sort();
        assert_eq!(ids, want, "{topic}");
    }
    h.stop().await;
}

/// An application's own `json` column may hold what `jsonb` refuses (a `\u0000` escape):
/// snapshots read rows as `json` text, as the log stores events, so such a row is in the
/// snapshot and its change arrives live (with `to_jsonb` the snapshot failed, and before schema
/// version 7 the write itself).
#[tokio::test]
async fn a_row_with_what_jsonb_refuses_is_in_the_snapshot_and_live() {
    let h = Harness::start().await;
    h.admin
        .batch_execute(
            r#"ALTER TABLE session_assignments ADD COLUMN notes json DEFAULT '{"a": "x\u0000y"}'"#,
        )
        .await
        .unwrap();
    let before = h.insert(Uuid::new_v4(), "queued", None, None).await;
    let who = mechanic(None);
    let mut ws = h.client(&who).await;
    ws.subscribe("queue", json!({"snapshot": true})).await;
    let snap = ws.recv().await;
    assert_eq!(snap["type"], "snapshot", "{snap}");
    assert_eq!(snap["assignments"][0]["id"], before.to_string(), "{snap}");
    let after = h.insert(Uuid::new_v4(), "queued", None, None).await;
    let ev = ws.events(1).await.remove(0);
    assert_eq!(ev["assignment"]["id"], after.to_string());
    h.stop().await;
}

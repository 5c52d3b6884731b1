//! Resuming and subscribing under a storm (issue 12): `since` replays come from the in-memory
//! replay window when it reaches back far enough, from the log otherwise (`queue` takes a
//! snapshot instead); database reads wait their turn instead of failing; a connection waiting
//! for its turn still notices its peer leaving.

mod common;

use common::{customer, mechanic, service, Harness, Next, WAIT};
use serde_json::{json, Value};
use uuid::Uuid;

/// The positions of `events`.
fn positions(events: &[Value]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e["position"].as_i64().expect("event position"))
        .collect()
}

/// Log positions in `(after, through]`, as the database has them.
async fn log_positions(h: &Harness, after: i64, through: i64) -> Vec<i64> {
    h.admin
        .query(
            "SELECT position FROM pgcast.assignment_events
             WHERE position > $1 AND position <= $2 ORDER BY position",
            &[&after, &through],
        )
        .await
        .expect("log positions")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn a_resume_inside_the_window_reads_nothing_from_the_database() {
    let h = Harness::start_with(|c| c.replay_window = 100).await;
    let start = h.log_head().await;
    let mut watcher = h.watcher().await;
    let m = mechanic(None);
    for _ in 0..5 {
        h.insert(Uuid::new_v4(), "queued", None, None).await;
    }
    // Offered to somebody else: not in this mechanic's queue.
    h.insert(Uuid::new_v4(), "offered", Some(Uuid::new_v4()), None)
        .await;
    let head = h.log_head().await;
    watcher.until_position(head).await;
    let logged = log_positions(&h, start, head).await;

    // Nothing the log holds can be read while this lock is held: a replay that went to the
    // database would hang, a replay from the window does not notice.
    let mut locker = h.db.connect().await.expect("connect");
    let tx = locker.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE pgcast.assignment_events IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock the log");

    let mut ws = h.client(&m).await;
    let sub = ws.subscribe("queue", json!({"since": start})).await;
    assert_eq!(sub["position"], start);
    let got = ws.events(5).await;
    assert_eq!(positions(&got), logged[..5].to_vec());
    let mut all = h.client(&service()).await;
    all.subscribe("assignments", json!({"since": start + 2}))
        .await;
    assert_eq!(
        positions(&all.events(4).await),
        ((start + 3)..=head).collect::<Vec<_>>()
    );
    tx.rollback().await.expect("unlock");
    assert_eq!(h.metric("pgcast_replays_from_window"), 2.0);
    assert_eq!(h.metric("pgcast_replays_from_log"), 0.0);
    // The replay was those five and nothing more (read once the log can be written again).
    h.nothing_more(&mut ws, &m).await;
    h.stop().await;
}

#[tokio::test]
async fn a_resume_older_than_the_window_reads_the_log_and_queue_takes_a_snapshot() {
    let h = Harness::start_with(|c| c.replay_window = 3).await;
    let start = h.log_head().await;
    let mut watcher = h.watcher().await;
    for _ in 0..8 {
        h.insert(Uuid::new_v4(), "queued", None, None).await;
    }
    let head = h.log_head().await;
    watcher.until_position(head).await;

    // The window holds the newest 3: a resume after head - 3 is served from it.
    let mut recent = h.client(&mechanic(None)).await;
    recent.subscribe("queue", json!({"since": head - 3})).await;
    assert_eq!(
        positions(&recent.events(3).await),
        ((head - 2)..=head).collect::<Vec<_>>()
    );
    // Older: the whole range comes from the log, in order, nothing missing.
    let mut service = h.client(&service()).await;
    service
        .subscribe("assignments", json!({"since": start}))
        .await;
    assert_eq!(
        positions(&service.events(8).await),
        log_positions(&h, start, head).await
    );
    // A queue that far behind is told to take a snapshot, and gets one.
    let mut old = h.client(&mechanic(None)).await;
    old.subscribe("queue", json!({"since": start})).await;
    let resync = old.recv().await;
    assert_eq!(resync["type"], "resync", "{resync}");
    assert!(
        resync["reason"]
            .as_str()
            .is_some_and(|r| r.contains("replay window")),
        "{resync}"
    );
    let sub = old.subscribe("queue", json!({"snapshot": true})).await;
    assert_eq!(sub["position"], head);
    let snapshot = old.recv().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    assert_eq!(snapshot["assignments"].as_array().map(Vec::len), Some(8));
    assert_eq!(h.metric("pgcast_replays_from_window"), 1.0);
    assert_eq!(h.metric("pgcast_replays_from_log"), 1.0);
    h.stop().await;
}

/// A replay from the log that passes over many rows that are not its topic's (a customer far
/// behind) stops after `replay_scan_limit` of them: what it found up to there, then `resync`,
/// instead of reading the whole retained log for a few rows. A topic that gets every event
/// (`assignments`) replays the same stretch whole.
#[tokio::test]
async fn a_sparse_replay_reads_a_bounded_part_of_the_log() {
    // At most 30 rows passed over: one page of the log (1,000 rows) is already more.
    let h = Harness::start_with(|c| {
        c.replay_window = 1;
        c.replay_scan_limit = 30;
    })
    .await;
    let owner = customer();
    let session = h.insert_session(owner.user_id).await;
    let start = h.log_head().await;
    let mut watcher = h.watcher().await;
    let first = h.insert(session, "queued", None, None).await;
    h.insert_unrelated(2500).await;
    h.insert(session, "queued", None, None).await;
    let head = h.log_head().await;
    watcher.until_position(head).await;

    let mut ws = h.client(&owner).await;
    let topic = format!("customer:{}", owner.user_id);
    ws.subscribe(&topic, json!({"since": start})).await;
    let found = ws.events(1).await;
    assert_eq!(found[0]["assignment"]["id"], first.to_string());
    let resync = ws.recv().await;
    assert_eq!(resync["type"], "resync", "{resync}");
    assert_eq!(resync["topic"], topic);
    // The snapshot has both rows.
    ws.subscribe(&topic, json!({"snapshot": true})).await;
    let snapshot = ws.recv().await;
    assert_eq!(snapshot["assignments"].as_array().map(Vec::len), Some(2));

    let mut all = h.client(&service()).await;
    all.subscribe("assignments", json!({"since": start})).await;
    assert_eq!(
        positions(&all.events(2502).await),
        log_positions(&h, start, head).await
    );
    h.stop().await;
}

/// A snapshot larger than the limit is refused with a code of its own (asking again cannot
/// help, unlike `unavailable`); following the topic without one, or with `since`, works.
#[tokio::test]
async fn a_snapshot_over_the_limit_is_refused_for_good_not_as_unavailable() {
    let h = Harness::start_with(|c| c.snapshot_limit = 3).await;
    let start = h.log_head().await;
    for _ in 0..4 {
        h.insert(Uuid::new_v4(), "queued", None, None).await;
    }
    let mut ws = h.client(&service()).await;
    ws.send(json!({"type": "subscribe", "id": "big", "topic": "assignments", "snapshot": true}))
        .await;
    let refused = ws.expect_error("snapshot_too_large").await;
    assert_eq!(refused["id"], "big");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("without a snapshot")),
        "{refused}"
    );
    ws.subscribe("assignments", json!({"since": start})).await;
    assert_eq!(ws.events(4).await.len(), 4);
    h.stop().await;
}

/// 300 clients ask for a snapshot at once through one database read at a time: every one gets
/// its snapshot, in turn; nobody is told `unavailable`.
#[tokio::test]
async fn a_snapshot_storm_waits_its_turn_instead_of_failing() {
    const CLIENTS: usize = 300;
    let h = Harness::start_with(|c| c.max_concurrent_reads = 1).await;
    for _ in 0..20 {
        h.insert(Uuid::new_v4(), "queued", None, None).await;
    }
    let head = h.log_head().await;
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(h.client(&mechanic(None)).await);
    }
    // Hold the one read slot, so the others queue up behind it.
    let mut locker = h.db.connect().await.expect("connect");
    let tx = locker.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE session_assignments IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    for ws in &mut clients {
        ws.send(json!({"type": "subscribe", "id": "s", "topic": "queue", "snapshot": true}))
            .await;
    }
    h.until_metric(
        "pgcast_database_reads_waiting",
        (CLIENTS - 1) as f64,
        "the subscribes to queue up",
    )
    .await;
    tx.rollback().await.expect("unlock");
    let readers = clients.into_iter().map(|mut ws| {
        tokio::spawn(async move {
            let sub = ws.recv().await;
            assert_eq!(sub["type"], "subscribed", "{sub}");
            assert_eq!(sub["position"], head);
            let snapshot = ws.recv().await;
            assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
            snapshot["assignments"].as_array().map_or(0, Vec::len)
        })
    });
    for reader in readers.collect::<Vec<_>>() {
        assert_eq!(reader.await.expect("reader"), 20);
    }
    assert_eq!(h.metric("pgcast_database_reads_waiting"), 0.0);
    h.stop().await;
}

/// A client that leaves while its subscribe waits for the database is let go at once: its
/// connection does not sit in CLOSE-WAIT until the read is done.
#[tokio::test]
async fn a_peer_leaving_while_its_subscribe_waits_frees_its_connection() {
    let h = Harness::start_with(|c| c.max_concurrent_reads = 1).await;
    let mut locker = h.db.connect().await.expect("connect");
    let tx = locker.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE session_assignments IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    // One subscribe holds the read slot (blocked on the lock), one waits for it.
    let mut holder = h.client(&service()).await;
    holder
        .send(json!({"type": "subscribe", "id": "s", "topic": "assignments", "snapshot": true}))
        .await;
    let mut waiter = h.client(&service()).await;
    waiter
        .send(json!({"type": "subscribe", "id": "s", "topic": "assignments", "snapshot": true}))
        .await;
    h.until_metric(
        "pgcast_database_reads_waiting",
        1.0,
        "the second subscribe to queue",
    )
    .await;
    // The waiter goes away (FIN); the holder's socket stays open.
    drop(waiter);
    h.until_connections(1, "the waiting connection to end")
        .await;
    assert_eq!(h.metric("pgcast_database_reads_waiting"), 0.0);
    // The holder gets its snapshot once the lock is gone.
    tx.rollback().await.expect("unlock");
    let sub = holder.recv().await;
    assert_eq!(sub["type"], "subscribed", "{sub}");
    match holder.next(WAIT).await {
        Next::Json(v) => assert_eq!(v["type"], "snapshot", "{v}"),
        other => panic!("expected the snapshot, got {other:?}"),
    }
    h.stop().await;
}

/// A resume at the head replays nothing and goes on live; one beyond the log gets `resync`.
#[tokio::test]
async fn a_resume_at_the_head_goes_on_live_and_one_beyond_the_log_resyncs() {
    let h = Harness::start().await;
    let mut watcher = h.watcher().await;
    h.insert(Uuid::new_v4(), "queued", None, None).await;
    let head = h.log_head().await;
    watcher.until_position(head).await;
    let mut ws = h.client(&service()).await;
    let sub = ws.subscribe("assignments", json!({"since": head})).await;
    assert_eq!(sub["position"], head);
    // Nothing is replayed: the next row is the very next frame.
    let next = h.insert(Uuid::new_v4(), "queued", None, None).await;
    let (replayed, ev) = ws.until_marker(next).await;
    assert!(replayed.is_empty(), "replayed at the head: {replayed:?}");
    assert_eq!(ev["position"], h.log_head().await);
    // Beyond the log: resync.
    let mut ahead = h.client(&service()).await;
    ahead
        .subscribe("assignments", json!({"since": head + 1_000}))
        .await;
    assert_eq!(ahead.recv().await["type"], "resync");
    h.stop().await;
}

/// A replay from the log answers the client's pings while it reads: a client that checks its
/// connection with them (the JS client closes one whose pong is 10 s late, and resumes from the
/// same `since`) keeps it through a replay that takes long, whether its reads wait or a quiet
/// topic has nothing to write for page after page.
#[tokio::test]
async fn a_replay_from_the_log_answers_pings_while_it_reads() {
    let h = Harness::start_with(|c| c.replay_window = 1).await;
    let start = h.log_head().await;
    let mut watcher = h.watcher().await;
    for _ in 0..3 {
        h.insert(Uuid::new_v4(), "queued", None, None).await;
    }
    let head = h.log_head().await;
    watcher.until_position(head).await;

    // The log cannot be read while this lock is held: the replay's first read waits.
    let mut locker = h.db.connect().await.expect("connect");
    let tx = locker.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE pgcast.committed_statements IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock the log");
    let mut ws = h.client(&service()).await;
    let sub = ws.subscribe("assignments", json!({"since": start})).await;
    assert_eq!(sub["position"], start);
    for _ in 0..3 {
        ws.ping().await;
    }
    tx.rollback().await.expect("unlock");
    assert_eq!(
        positions(&ws.events(3).await),
        log_positions(&h, start, head).await
    );
    assert_eq!(h.metric("pgcast_replays_from_log"), 1.0);
    ws.ping().await;
    h.stop().await;
}

/// Between the pages of a long replay the connection answers pings too: a ping sent once the
/// replay has started is answered before its last event, not after it.
#[tokio::test]
async fn a_long_replay_answers_pings_between_its_pages() {
    const EVENTS: i64 = 10_000;
    let h = Harness::start_with(|c| c.replay_window = 1).await;
    let start = h.log_head().await;
    let mut watcher = h.watcher().await;
    h.admin
        .execute(
            "INSERT INTO session_assignments (session_id, status, customer_name)
             SELECT gen_random_uuid(), 'queued', 'Ana' FROM generate_series(1, $1::bigint)",
            &[&EVENTS],
        )
        .await
        .expect("insert");
    let head = h.log_head().await;
    assert_eq!(head - start, EVENTS);
    watcher.until_position(head).await;

    let mut ws = h.client(&service()).await;
    ws.subscribe("assignments", json!({"since": start})).await;
    // The first page has been read: its events are coming.
    assert_eq!(ws.recv().await["position"], start + 1);
    ws.send(json!({"type": "ping", "id": "mid-replay"})).await;
    let mut before_pong = 1;
    loop {
        let frame = ws.recv().await;
        match frame["type"].as_str() {
            Some("pong") => break,
            Some("event") => before_pong += 1,
            _ => panic!("unexpected frame {frame}"),
        }
    }
    assert!(
        before_pong < EVENTS,
        "the pong came after the whole replay ({before_pong} events)"
    );
    let rest = ws.events((EVENTS - before_pong) as usize).await;
    assert_eq!(
        rest.last().map(|e| e["position"].clone()),
        Some(json!(head))
    );
    assert_eq!(h.metric("pgcast_replays_from_log"), 1.0);
    h.stop().await;
}

/// A subscribe that waits for the database longer than the heartbeat allows silence (nothing
/// pings the peer meanwhile) does not end in the heartbeat closing a live peer: once it ends,
/// the peer gets its two intervals again to answer a ping.
#[tokio::test]
async fn a_subscribe_longer_than_the_heartbeat_keeps_a_live_peer() {
    let h =
        Harness::start_with(|c| c.heartbeat_interval = std::time::Duration::from_millis(500)).await;
    let mut locker = h.db.connect().await.expect("connect");
    let tx = locker.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE session_assignments IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let mut ws = h.client(&service()).await;
    ws.send(json!({"type": "subscribe", "id": "s", "topic": "assignments", "snapshot": true}))
        .await;
    // Three intervals pass while the snapshot waits: time passing is what this tests.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    tx.rollback().await.expect("unlock");
    assert_eq!(ws.recv().await["type"], "subscribed");
    assert_eq!(ws.recv().await["type"], "snapshot");
    // Still open some intervals later (the client answers the server's pings as it reads).
    for _ in 0..4 {
        ws.ping().await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    h.stop().await;
}

/// A client sends all its subscribes at once (the JS client does, on every connect): while the
/// first waits for the database, a ping sent after the others is answered, and the others are
/// handled in order once the first is done.
#[tokio::test]
async fn subscribes_sent_together_are_handled_in_order_and_pings_answered_meanwhile() {
    let h = Harness::start().await;
    let mut locker = h.db.connect().await.expect("connect");
    let tx = locker.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE session_assignments IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let customer = Uuid::new_v4();
    let mut ws = h.client(&service()).await;
    ws.send(json!({"type": "subscribe", "id": "a", "topic": "assignments", "snapshot": true}))
        .await;
    ws.send(json!({"type": "subscribe", "id": "c", "topic": format!("customer:{customer}")}))
        .await;
    ws.ping().await;
    tx.rollback().await.expect("unlock");
    let mut got = Vec::new();
    for _ in 0..3 {
        let v = ws.recv().await;
        got.push(format!("{} {}", v["type"], v["id"]));
    }
    assert_eq!(
        got,
        [
            r#""subscribed" "a""#,
            r#""snapshot" null"#,
            r#""subscribed" "c""#
        ]
    );
    h.stop().await;
}

//! The NOTIFY channel is a doorbell (docs/architecture.md §8): PostgreSQL lets any role that can connect
//! NOTIFY on it, so whatever a notification carries must never become an event, never make a
//! real event be skipped and never stall the listener. These tests forge notifications from a
//! role that can merely connect.

mod common;

use std::time::Duration;

use common::*;
use pgcast_listener::{Backoff, EventLog, Listener, Output, Start};
use pgcast_testkit::{PgCluster, TestDb};
use tokio_postgres::Client;

const LIMIT: Duration = Duration::from_secs(20);

/// A login role with nothing but the CONNECT that PUBLIC has on every database, and a
/// connection as it.
async fn connect_only_role(db: &TestDb, admin: &Client) -> Client {
    let role = format!("forger_{}", db.name());
    admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN"))
        .await
        .expect("create role");
    let mut config = db.pg_config();
    config.user(&role);
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect as the unprivileged role");
    tokio::spawn(connection);
    // It really is unprivileged: the log is out of its reach.
    assert!(client
        .query("SELECT 1 FROM pgcast.assignment_events", &[])
        .await
        .is_err());
    client
}

#[tokio::test]
async fn forged_events_references_and_garbage_are_never_delivered_and_skip_nothing() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    let forger = connect_only_role(&db, &client).await;
    let mut listener = start_listener(&db, Start::Head).await;

    client.execute(INSERT_ONE, &[&"before"]).await.unwrap();
    let before = listener.take(1, LIMIT).await;
    let next = before[0].position + 1;
    // The real payload of the last event, re-addressed to the next position with other
    // content: exactly what a forger who can read the channel's old traffic would send.
    let real: String = client
        .query_one(
            "SELECT payload::text FROM pgcast.assignment_events WHERE position = $1",
            &[&before[0].position],
        )
        .await
        .unwrap()
        .get(0);
    let mut forged: serde_json::Value = serde_json::from_str(&real).unwrap();
    forged["position"] = next.into();
    forged["row"]["customer_name"] = "forged".into();
    let forged_one = forged.to_string();
    forger
        .execute("SELECT pg_notify('pgcast_assignments', $1)", &[&forged_one])
        .await
        .expect("any role may NOTIFY");
    // A batch of 100 forged events at the next positions, one notification each.
    forger
        .execute(
            "SELECT pg_notify('pgcast_assignments',
                     jsonb_set(jsonb_set($1::text::jsonb, '{position}', to_jsonb($2::bigint + g)),
                               '{row,id}', to_jsonb(gen_random_uuid()))::text)
             FROM generate_series(0, 99) g",
            &[&forged_one, &next],
        )
        .await
        .unwrap();
    for hint in [
        r#"{"position":999999999,"ref":true}"#.to_owned(),
        (next + 1_000_000).to_string(),
        "garbage \u{1F527}".to_owned(),
        "x".repeat(7_000),
    ] {
        forger
            .execute("SELECT pg_notify('pgcast_assignments', $1)", &[&hint])
            .await
            .unwrap();
    }

    // The real events committed after the forgeries all arrive, once, in order, from the log.
    for name in ["after-1", "after-2", "after-3"] {
        client.execute(INSERT_ONE, &[&name]).await.unwrap();
    }
    let got = listener.take(3, LIMIT).await;
    let names: Vec<_> = got
        .iter()
        .map(|e| e.assignment.customer_name.clone().unwrap_or_default())
        .collect();
    assert_eq!(names, ["after-1", "after-2", "after-3"]);
    assert_eq!(
        got[0].position, next,
        "the forged position did not hide the real event"
    );
    let positions: Vec<i64> = got.iter().map(|e| e.position).collect();
    assert_eq!(positions, log_positions(&client).await[1..]);
    listener.assert_quiet().await;

    let status = listener.status.snapshot();
    assert_eq!(status.ignored_payloads, 105, "{status:?}");
    assert_eq!(status.decode_errors, 0, "{status:?}");
    // The four real events and assert_quiet's marker.
    assert_eq!(status.events, 4 + 1, "{status:?}");
    listener.stop().await;
}

#[tokio::test]
async fn a_doorbell_flood_does_not_stall_the_listener() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    let forger = connect_only_role(&db, &client).await;
    let mut listener = start_listener(&db, Start::Head).await;
    // 20,000 distinct notifications (identical ones would collapse into one).
    forger
        .execute(
            "SELECT pg_notify('pgcast_assignments', g::text) FROM generate_series(1, 20000) g",
            &[],
        )
        .await
        .unwrap();
    client.execute(INSERT_ONE, &[&"real"]).await.unwrap();
    let got = listener.take(1, LIMIT).await;
    assert_eq!(got[0].assignment.customer_name.as_deref(), Some("real"));
    listener.assert_quiet().await;
    // Every doorbell was read off the connection: none is left pinning PostgreSQL's queue.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while listener.status.snapshot().notifications < 20_001 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            listener.status.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    listener.stop().await;
}

#[tokio::test]
async fn one_transaction_rings_once_however_many_rows_it_writes() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    let mut listener = start_listener(&db, Start::Head).await;
    let before = listener.status.snapshot().notifications;
    client.execute(INSERT_MANY, &[&100i32]).await.unwrap();
    let got = listener.take(100, LIMIT).await;
    assert!(got.windows(2).all(|w| w[1].position > w[0].position));
    listener.assert_quiet().await;
    let status = listener.status.snapshot();
    // One doorbell for the 100-row transaction, one for assert_quiet's marker.
    assert_eq!(status.notifications - before, 1 + 1, "{status:?}");
    assert_eq!(status.ignored_payloads, 0, "{status:?}");
    listener.stop().await;
}

#[tokio::test]
async fn a_stalled_consumer_never_leaves_doorbells_in_the_database_queue() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    let forger = connect_only_role(&db, &client).await;
    // A consumer that takes one event and then stops reading, like a paused pager.
    let listener = Listener::new(db.pg_config(), EventLog::new(pool(&db))).with_backoff(
        Backoff::new(Duration::from_millis(20), Duration::from_millis(200)),
    );
    let status = listener.status();
    let (tx, mut events) = tokio::sync::mpsc::channel(1);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(listener.run(Start::Head, tx, shutdown.clone()));
    tokio::time::timeout(LIMIT, status.wait_ready())
        .await
        .expect("listener ready");
    for i in 0..20 {
        client
            .execute(INSERT_ONE, &[&format!("row {i}")])
            .await
            .unwrap();
    }
    forger
        .execute(
            "SELECT pg_notify('pgcast_assignments', g::text) FROM generate_series(1, 10000) g",
            &[],
        )
        .await
        .unwrap();
    // Every doorbell is read off the connection although the consumer reads nothing.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while status.snapshot().notifications < 10_020 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "doorbells stuck behind a stalled consumer: {:?}",
            status.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing was lost meanwhile: the consumer, reading again, gets all 20 in order.
    let mut got = Vec::new();
    while got.len() < 20 {
        let output = tokio::time::timeout(LIMIT, events.recv())
            .await
            .expect("events after the stall")
            .expect("listener alive");
        let Output::Event(e) = output else {
            panic!("no gap was possible here: {output:?}");
        };
        got.push(e.assignment.customer_name.clone().unwrap_or_default());
    }
    let expected: Vec<String> = (0..20).map(|i| format!("row {i}")).collect();
    assert_eq!(got, expected);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("listener stops")
        .expect("listener task");
}

/// Sets `pgcast.doorbell_queue_limit()`: 0 makes every commit find the notification queue
/// "past the limit", as a session holding its place in a full queue would (filling PostgreSQL's
/// 8 GB queue is out of a test's reach); 0.5 is the installed value.
async fn set_doorbell_queue_limit(client: &Client, limit: &str) {
    client
        .batch_execute(&format!(
            "CREATE OR REPLACE FUNCTION pgcast.doorbell_queue_limit() RETURNS double precision
                 LANGUAGE sql IMMUTABLE PARALLEL SAFE
                 AS 'SELECT {limit}::double precision'"
        ))
        .await
        .expect("replace the limit");
}

/// A connect-only role can LISTEN and stay idle in a transaction, holding PostgreSQL's
/// notification queue until it fills, and a full queue fails every notifying commit. Past
/// `pgcast.doorbell_queue_limit()` commits ring no doorbell, so writes never fail, and the
/// listener, which probes the queue on a timer of its own, reads the log every 0.5 s: events
/// still arrive, well before the 15 s silence read would have found them, also when the queue
/// fills while the listener is connected.
#[tokio::test]
async fn past_the_queue_limit_commits_ring_no_doorbell_and_events_still_arrive() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    let (spy, mut heard) = connect_as_hearing(&db, &client, "spy", "").await;
    spy.batch_execute("LISTEN pgcast_assignments")
        .await
        .unwrap();
    // The spy hears a commit's doorbell while the queue has room.
    client.execute(INSERT_ONE, &[&"rung"]).await.unwrap();
    tokio::time::timeout(LIMIT, heard.recv())
        .await
        .expect("a doorbell while the queue has room")
        .expect("the spy's connection");

    set_doorbell_queue_limit(&client, "0").await;
    let mut listener = start_listener(&db, Start::Head).await;
    for name in ["quiet 1", "quiet 2", "quiet 3"] {
        client
            .execute(INSERT_ONE, &[&name])
            .await
            .expect("the write commits");
    }
    let events = listener.take(3, Duration::from_secs(10)).await;
    let names: Vec<_> = events
        .iter()
        .map(|e| e.assignment.customer_name.clone().unwrap_or_default())
        .collect();
    assert_eq!(names, ["quiet 1", "quiet 2", "quiet 3"]);
    // A notification sent to the spy arrives before the answer to its next query.
    spy.batch_execute("SELECT 1").await.unwrap();
    assert!(heard.try_recv().is_err(), "a commit rang past the limit");

    // Room again: commits ring, and the spy hears them.
    set_doorbell_queue_limit(&client, "0.5").await;
    client.execute(INSERT_ONE, &[&"rung again"]).await.unwrap();
    tokio::time::timeout(LIMIT, heard.recv())
        .await
        .expect("a doorbell once the queue has room")
        .expect("the spy's connection");
    let events = listener.take(1, LIMIT).await;
    assert_eq!(
        events[0].assignment.customer_name.as_deref(),
        Some("rung again")
    );

    // The queue fills while the listener is connected and hears doorbells: it finds out by
    // its own timer, not only after 15 s without a doorbell.
    set_doorbell_queue_limit(&client, "0").await;
    client.execute(INSERT_ONE, &[&"quiet again"]).await.unwrap();
    let events = listener.take(1, Duration::from_secs(5)).await;
    assert_eq!(
        events[0].assignment.customer_name.as_deref(),
        Some("quiet again")
    );
    listener.stop().await;
}

/// A tool such as `pgcast tail` may follow a database still at schema version 4, which has no
/// `pgcast.doorbell_queue_limit()` (and whose commits always ring): the probe takes doorbells
/// as on, instead of failing the connection and reconnecting for ever.
#[tokio::test]
async fn a_schema_without_the_queue_limit_is_followed_with_doorbells_on() {
    let (db, client) = db_at_version(4).await;
    let mut listener = start_listener(&db, Start::Head).await;
    for name in ["v4 one", "v4 two"] {
        client.execute(INSERT_ONE, &[&name]).await.unwrap();
        let got = listener.take(1, LIMIT).await;
        assert_eq!(got[0].assignment.customer_name.as_deref(), Some(name));
    }
    // The probe ran when it connected, before the first event was read after its doorbell.
    assert_eq!(listener.status.snapshot().reconnects, 0);
    listener.stop().await;
}

//! The delivery guarantees of docs/architecture.md, against a real PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgcast_events::{EventKind, Status};
use pgcast_listener::{installed_version, migrate, MigrationScope, Output, Start, SCHEMA_VERSION};
use pgcast_testkit::PgCluster;
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn migrations_are_idempotent_versioned_and_commented() {
    let (db, mut client) = migrated_db(PgCluster::shared().unwrap()).await;
    assert_eq!(
        migrate(&mut client, MigrationScope::All).await.unwrap(),
        0,
        "second run applies nothing"
    );
    assert_eq!(
        installed_version(&client).await.unwrap(),
        Some(SCHEMA_VERSION)
    );
    // Every realtime object carries a comment a DBA can read in psql.
    let uncommented: Vec<String> = client
        .query(
            "SELECT kind || ' ' || name FROM (
                SELECT 'function' AS kind, p.oid::regprocedure::text AS name,
                       obj_description(p.oid, 'pg_proc') AS c
                FROM pg_proc p WHERE p.pronamespace = 'pgcast'::regnamespace
                UNION ALL
                SELECT 'relation', c.oid::regclass::text, obj_description(c.oid, 'pg_class')
                FROM pg_class c WHERE c.relnamespace = 'pgcast'::regnamespace
                  AND c.relkind IN ('r', 'S') AND c.relname NOT LIKE '%migrations'
                UNION ALL
                SELECT 'trigger', t.tgname, obj_description(t.oid, 'pg_trigger')
                FROM pg_trigger t WHERE t.tgname LIKE 'pgcast%'
                UNION ALL
                SELECT 'schema', 'pgcast', obj_description('pgcast'::regnamespace, 'pg_namespace')
             ) o WHERE c IS NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        uncommented.is_empty(),
        "objects without COMMENT: {uncommented:?}"
    );
    drop(db);
}

#[tokio::test]
async fn realtime_only_installs_onto_an_existing_table_without_touching_rows() {
    let cluster = PgCluster::shared().unwrap();
    let db = cluster.create_database().await.unwrap();
    let mut client = db.connect().await.unwrap();
    // The application's own table, with a column pgcast does not know and existing rows.
    client
        .batch_execute(
            "CREATE TABLE session_assignments (
                id uuid PRIMARY KEY DEFAULT gen_random_uuid(), session_id uuid NOT NULL,
                mechanic_id uuid, workshop_id uuid, status text NOT NULL,
                urgent boolean NOT NULL DEFAULT false, customer_name text, vehicle_summary text,
                concern text, created_at timestamptz DEFAULT now(), updated_at timestamptz,
                billing_code text);
             INSERT INTO session_assignments (session_id, status, billing_code)
             SELECT gen_random_uuid(), 'completed', 'B' || g FROM generate_series(1, 50) g;",
        )
        .await
        .unwrap();
    let before: Vec<String> = client
        .query("SELECT t::text FROM session_assignments t ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    migrate(&mut client, MigrationScope::RealtimeOnly)
        .await
        .unwrap();
    let after: Vec<String> = client
        .query("SELECT t::text FROM session_assignments t ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(before, after);
    let sessions: Option<String> = client
        .query_one("SELECT to_regclass('sessions')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sessions, None, "app tables were not created");
    assert!(
        log_positions(&client).await.is_empty(),
        "no events for old rows"
    );

    let mut listener = start_listener(&db, Start::Head).await;
    client
        .execute(
            "UPDATE session_assignments SET status = 'queued', updated_at = NULL
             WHERE billing_code = 'B7'",
            &[],
        )
        .await
        .unwrap();
    let got = listener.take(1, LIMIT).await;
    assert_eq!(got[0].kind, EventKind::Updated);
    assert_eq!(got[0].old_status(), Some(Status::Completed));
    assert_eq!(got[0].assignment.updated_at, None);
    listener.stop().await;
}

/// A listener whose position the log was pruned past (cut off from the database for longer
/// than the retention) says so once and in order: the gap, then the events after the
/// retention boundary, and no second gap at the doorbells that follow.
#[tokio::test]
async fn a_position_pruned_past_is_one_gap_before_the_events_after_it() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    for i in 0..5 {
        client
            .execute(INSERT_ONE, &[&format!("pruned {i}")])
            .await
            .unwrap();
    }
    let gone = log_positions(&client).await;
    let pruned: i32 = client
        .query_one("SELECT pgcast.prune_events(interval '0 seconds')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pruned, 5);
    let boundary: i64 = client
        .query_one("SELECT pruned_through FROM pgcast.log_state", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(Some(&boundary), gone.last());
    for i in 0..3 {
        client
            .execute(INSERT_ONE, &[&format!("kept {i}")])
            .await
            .unwrap();
    }

    // As if it had read the first event, then lost the database until now.
    let mut listener = start_listener(&db, Start::After(gone[0])).await;
    match listener.next_output(Instant::now() + LIMIT).await {
        Output::Gap {
            after,
            pruned_through,
        } => assert_eq!((after, pruned_through), (gone[0], boundary)),
        other => panic!("the gap must come first: {other:?}"),
    }
    let kept = listener.take(3, LIMIT).await;
    let names: Vec<_> = kept
        .iter()
        .map(|e| e.assignment.customer_name.clone().unwrap_or_default())
        .collect();
    assert_eq!(names, ["kept 0", "kept 1", "kept 2"]);
    assert!(kept.iter().all(|e| e.position > boundary));
    // The marker's doorbell reads on from past the boundary: no second gap (take fails on one).
    listener.assert_quiet().await;
    assert_eq!(listener.status.snapshot().gaps, 1);
    listener.stop().await;
}

/// A log whose head is behind the listener's position (the database restored from a backup,
/// or failed over to a standby that lost the last commits): the positions after its head are
/// drawn again, so reading on after the old position would skip the new events. The listener
/// says so (a gap back to the head) and follows the log from its head.
#[tokio::test]
async fn a_log_behind_the_listeners_position_is_followed_from_its_head() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    for i in 0..3 {
        client
            .execute(INSERT_ONE, &[&format!("before {i}")])
            .await
            .unwrap();
    }
    let seen = log_positions(&client).await;
    // The last two commits are lost, as a restore to just after the first would lose them.
    client
        .batch_execute(&format!(
            "DELETE FROM pgcast.assignment_changes WHERE statement IN
                 (SELECT statement FROM pgcast.committed_statements WHERE last_position > {kept});
             DELETE FROM pgcast.committed_statements WHERE last_position > {kept};
             SELECT setval('pgcast.event_position', {kept});",
            kept = seen[0]
        ))
        .await
        .unwrap();
    // As if it had read all three before the database went back.
    let mut listener = start_listener(&db, Start::After(seen[2])).await;
    match listener.next_output(Instant::now() + LIMIT).await {
        Output::Gap {
            after,
            pruned_through,
        } => assert_eq!((after, pruned_through), (seen[2], seen[0])),
        other => panic!("the gap must come first: {other:?}"),
    }
    client.execute(INSERT_ONE, &[&"after"]).await.unwrap();
    let got = listener.take(1, LIMIT).await;
    assert_eq!(got[0].assignment.customer_name.as_deref(), Some("after"));
    assert_eq!(got[0].position, seen[1], "a position drawn again");
    assert_eq!(listener.status.snapshot().gaps, 1);
    listener.stop().await;
}

#[tokio::test]
async fn every_committed_change_is_one_event_and_rollbacks_none() {
    let (db, mut client) = migrated_db(PgCluster::shared().unwrap()).await;
    let mut listener = start_listener(&db, Start::Head).await;
    let (workshop, mechanic) = (Uuid::new_v4(), Uuid::new_v4());

    let id: Uuid = client
        .query_one(
            "INSERT INTO session_assignments (session_id, workshop_id, status)
             VALUES (gen_random_uuid(), $1, 'queued') RETURNING id",
            &[&workshop],
        )
        .await
        .unwrap()
        .get(0);
    // Rolled back: no event.
    let tx = client.transaction().await.unwrap();
    tx.execute(INSERT_ONE, &[&"rolled back"]).await.unwrap();
    tx.execute(
        "UPDATE session_assignments SET status = 'cancelled' WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    // A savepoint rolled back inside a committed transaction: its change produces nothing.
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "SAVEPOINT s; UPDATE session_assignments SET status = 'expired' WHERE id = '{id}';
         ROLLBACK TO SAVEPOINT s;"
    ))
    .await
    .unwrap();
    tx.execute(
        "UPDATE session_assignments SET status = 'accepted', mechanic_id = $2, workshop_id = NULL
         WHERE id = $1",
        &[&id, &mechanic],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    client
        .execute("DELETE FROM session_assignments WHERE id = $1", &[&id])
        .await
        .unwrap();

    let got = listener.take(3, LIMIT).await;
    listener.assert_quiet().await;
    assert!(got.iter().all(|e| e.assignment.id == id));
    assert_eq!(
        got.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [EventKind::Created, EventKind::Updated, EventKind::Deleted]
    );
    assert!(got.windows(2).all(|w| w[0].position < w[1].position));
    let created = &got[0];
    assert_eq!(created.prior, None);
    assert_eq!(created.assignment.workshop_id, Some(workshop));
    let updated = &got[1];
    let prior = updated.prior.unwrap();
    assert_eq!(prior.status, Status::Queued);
    assert_eq!(prior.workshop_id, Some(workshop));
    assert_eq!(prior.mechanic_id, None);
    assert_eq!(updated.assignment.status, Status::Accepted);
    assert_eq!(updated.assignment.mechanic_id, Some(mechanic));
    let deleted = &got[2];
    let prior = deleted.prior.unwrap();
    assert_eq!(prior.status, Status::Accepted);
    assert_eq!(prior.mechanic_id, Some(mechanic));
    assert_eq!(deleted.assignment.mechanic_id, Some(mechanic));
    // The log agrees: exactly these three positions.
    assert_eq!(
        log_positions(&client).await,
        got.iter().map(|e| e.position).collect::<Vec<_>>()
    );
    listener.stop().await;
}

/// Transaction A writes first and commits last: A must get the higher position, so a reader
/// that saw B's position can never later see a lower one commit.
#[tokio::test]
async fn positions_follow_commit_order_not_write_order() {
    let (db, _client) = migrated_db(PgCluster::shared().unwrap()).await;
    let mut listener = start_listener(&db, Start::Head).await;
    let mut a = db.connect().await.unwrap();
    let mut b = db.connect().await.unwrap();

    let ta = a.transaction().await.unwrap();
    ta.execute(INSERT_ONE, &[&"A"]).await.unwrap();
    let tb = b.transaction().await.unwrap();
    tb.execute(INSERT_ONE, &[&"B"]).await.unwrap();
    tb.commit().await.unwrap();
    let first = listener.take(1, LIMIT).await;
    assert_eq!(first[0].assignment.customer_name.as_deref(), Some("B"));
    ta.commit().await.unwrap();
    let second = listener.take(1, LIMIT).await;
    assert_eq!(second[0].assignment.customer_name.as_deref(), Some("A"));
    assert!(
        second[0].position > first[0].position,
        "A committed last but got position {} <= B's {}",
        second[0].position,
        first[0].position
    );
    listener.stop().await;
}

#[tokio::test]
async fn a_20kb_row_is_written_and_arrives_whole_from_the_log() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    let mut listener = start_listener(&db, Start::Head).await;
    let concern: String = "The engine makes a noise. ".repeat(800); // ~20 KB
    assert!(concern.len() > 20_000);
    client
        .execute(
            "INSERT INTO session_assignments (session_id, status, concern)
             VALUES (gen_random_uuid(), 'queued', $1)",
            &[&concern],
        )
        .await
        .expect("a large row must never fail because of NOTIFY");
    client.execute(INSERT_ONE, &[&"small"]).await.unwrap();
    let got = listener.take(2, LIMIT).await;
    assert_eq!(got[0].assignment.concern.as_deref(), Some(concern.as_str()));
    assert_eq!(got[1].assignment.customer_name.as_deref(), Some("small"));
    listener.stop().await;
}

#[tokio::test]
async fn a_10000_row_insert_arrives_complete_and_in_order() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    let mut listener = start_listener(&db, Start::Head).await;
    client.execute(INSERT_MANY, &[&10000i32]).await.unwrap();
    let got = listener.take(10_000, Duration::from_secs(60)).await;
    listener.assert_quiet().await;
    for (i, e) in got.iter().enumerate() {
        assert_eq!(
            e.assignment.customer_name.as_deref(),
            Some(format!("c{}", i + 1).as_str())
        );
    }
    assert!(got.windows(2).all(|w| w[1].position == w[0].position + 1));
    listener.stop().await;
}

#[tokio::test]
async fn starts_after_a_given_position_from_the_log() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    for name in ["one", "two", "three"] {
        client.execute(INSERT_ONE, &[&name]).await.unwrap();
    }
    let positions = log_positions(&client).await;
    let mut listener = start_listener(&db, Start::After(positions[0])).await;
    let got = listener.take(2, LIMIT).await;
    assert_eq!(
        got.iter().map(|e| e.position).collect::<Vec<_>>(),
        positions[1..]
    );
    listener.assert_quiet().await;
    listener.stop().await;
}

#[tokio::test]
async fn a_log_row_whose_commit_time_cannot_be_read_is_counted_and_skipped() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    for _ in 0..3 {
        client.execute(INSERT_MANY, &[&1i32]).await.unwrap();
    }
    let positions = log_positions(&client).await;
    assert_eq!(positions.len(), 3);
    // The log's owner sets the second statement's commit time by hand to one PostgreSQL
    // accepts and no event can carry.
    let edited = client
        .execute(
            "UPDATE pgcast.committed_statements SET committed_at = 'infinity' \
             WHERE last_position = $1",
            &[&positions[1]],
        )
        .await
        .unwrap();
    assert_eq!(edited, 1);

    let session: Uuid = client
        .query_one(
            "SELECT (payload -> 'row' ->> 'session_id')::uuid FROM pgcast.assignment_events \
             WHERE position = $1",
            &[&positions[1]],
        )
        .await
        .unwrap()
        .get(0);

    let mut listener = start_listener(&db, Start::After(0)).await;
    assert_eq!(
        outputs(&mut listener, 3).await,
        [
            Seen::Event(positions[0]),
            Seen::Undecodable(positions[1], Some(session), false),
            Seen::Event(positions[2]),
        ],
        "the edited row is skipped, in its place and naming its session; the reads before \
         and after it go on"
    );
    listener.assert_quiet().await;
    assert_eq!(listener.status.snapshot().decode_errors, 1);
    listener.stop().await;
}

#[tokio::test]
async fn a_log_row_missing_its_id_is_counted_and_skipped_never_half_delivered() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    client.execute(INSERT_MANY, &[&3i32]).await.unwrap();
    // The log's owner edits the second row by hand: its event no longer names the row's id.
    let edited = client
        .execute(
            "UPDATE pgcast.assignment_changes SET event = event::jsonb #- '{row,id}' WHERE ordinal = 2",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(edited, 1);
    let positions = log_positions(&client).await;
    assert_eq!(positions.len(), 3);

    let mut listener = start_listener(&db, Start::After(0)).await;
    let deadline = Instant::now() + LIMIT;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(match listener.next_output(deadline).await {
            Output::Event(e) => (e.position, e.assignment.customer_name.clone()),
            Output::Undecodable { position, .. } => (position, None),
            gap => panic!("{gap:?}"),
        });
    }
    assert_eq!(
        got,
        [
            (positions[0], Some("c1".to_owned())),
            (positions[1], None),
            (positions[2], Some("c3".to_owned()))
        ],
        "the edited row is skipped in its place, the rows around it arrive whole"
    );
    // Nothing else comes for it later either.
    listener.assert_quiet().await;
    assert_eq!(listener.status.snapshot().decode_errors, 1);
    listener.stop().await;
}

/// What a listener's output was, for comparing sequences.
#[derive(Debug, PartialEq)]
enum Seen {
    Event(i64),
    /// Position, session, whether the commit time came with it.
    Undecodable(i64, Option<Uuid>, bool),
}

/// The listener's next `n` outputs, none of them a gap.
async fn outputs(listener: &mut Running, n: usize) -> Vec<Seen> {
    let deadline = Instant::now() + LIMIT;
    let mut seen = Vec::with_capacity(n);
    for _ in 0..n {
        seen.push(match listener.next_output(deadline).await {
            Output::Event(e) => Seen::Event(e.position),
            Output::Undecodable {
                position,
                committed_at,
                session_id,
            } => Seen::Undecodable(position, session_id, committed_at.is_some()),
            gap => panic!("{gap:?}"),
        });
    }
    seen
}

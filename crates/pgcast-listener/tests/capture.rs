//! Statement capture (version 3 on; version 4 writes each statement's rows to
//! `pgcast.assignment_changes` as it runs, and a deferred step per statement gives them a block
//! of commit-ordered positions at commit, in `pgcast.committed_statements`). What that must keep from the row trigger it replaced:
//! every change once, in write order within a transaction (several statements, multi-row
//! statements), commit order across transactions, nothing from rolled-back savepoints, updates
//! paired with their old routing fields even when `id` changes, and an upgrade from version 2
//! that keeps the log and continues its positions.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use pgcast_events::{EventKind, Status};
use pgcast_listener::{installed_version, migrate, MigrationScope, Start, SCHEMA_VERSION};
use pgcast_testkit::legacy::KEEP_VERSION_2_ROW_TRIGGER;
use pgcast_testkit::PgCluster;
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(30);

/// Names of the events' rows, in delivery order.
fn names(events: &[std::sync::Arc<pgcast_events::AssignmentEvent>]) -> Vec<String> {
    events
        .iter()
        .map(|e| e.assignment.customer_name.clone().unwrap_or_default())
        .collect()
}

/// Every captured row visible once every transaction has ended was published: its statement
/// has its block of positions.
async fn assert_nothing_unpublished(client: &tokio_postgres::Client) {
    let unpublished: i64 = client
        .query_one(
            "SELECT count(*) FROM pgcast.assignment_changes ch
             WHERE NOT EXISTS (SELECT 1 FROM pgcast.committed_statements c
                               WHERE c.statement = ch.statement)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unpublished, 0, "captured rows without positions");
}

#[tokio::test]
async fn several_statements_in_one_transaction_keep_their_order() {
    let (db, mut client) = migrated_db(PgCluster::shared().unwrap()).await;
    let mut listener = start_listener(&db, Start::Head).await;
    let tx = client.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO session_assignments (session_id, status, customer_name)
         SELECT gen_random_uuid(), 'queued', 'a' || g FROM generate_series(1, 3) g",
        &[],
    )
    .await
    .unwrap();
    tx.execute(INSERT_ONE, &[&"b"]).await.unwrap();
    tx.execute(
        "UPDATE session_assignments SET status = 'offered' WHERE customer_name = 'a2'",
        &[],
    )
    .await
    .unwrap();
    tx.execute(
        "DELETE FROM session_assignments WHERE customer_name = 'a1'",
        &[],
    )
    .await
    .unwrap();
    tx.execute(INSERT_ONE, &[&"c"]).await.unwrap();
    // A statement that changes nothing stages nothing.
    tx.execute(
        "UPDATE session_assignments SET status = 'expired' WHERE false",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let got = listener.take(7, LIMIT).await;
    listener.assert_quiet().await;
    assert_eq!(names(&got), ["a1", "a2", "a3", "b", "a2", "a1", "c"]);
    assert_eq!(
        got.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [
            EventKind::Created,
            EventKind::Created,
            EventKind::Created,
            EventKind::Created,
            EventKind::Updated,
            EventKind::Deleted,
            EventKind::Created
        ]
    );
    assert_contiguous(&got);
    assert_eq!(got[4].old_status(), Some(Status::Queued));
    assert_eq!(got[4].assignment.status, Status::Offered);
    assert_eq!(got[5].old_status(), Some(Status::Queued));
    // Each statement is published at commit, in the order the statements ran.
    assert!(got
        .windows(2)
        .all(|w| w[0].committed_at <= w[1].committed_at));
    assert_nothing_unpublished(&client).await;
    listener.stop().await;
}

#[tokio::test]
async fn a_100_row_update_arrives_whole_with_each_rows_old_state() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    // Each row its own workshop, so a row paired with another row's old state shows.
    client
        .execute(
            "INSERT INTO session_assignments (session_id, workshop_id, status, customer_name)
             SELECT gen_random_uuid(), gen_random_uuid(), 'queued', 'r' || g
             FROM generate_series(1, 100) g",
            &[],
        )
        .await
        .unwrap();
    let workshops: HashMap<Uuid, Uuid> = client
        .query("SELECT id, workshop_id FROM session_assignments", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut listener = start_listener(&db, Start::Head).await;
    let mechanic = Uuid::new_v4();
    client
        .execute(
            "UPDATE session_assignments
             SET status = 'accepted', mechanic_id = $1, workshop_id = NULL",
            &[&mechanic],
        )
        .await
        .unwrap();
    let got = listener.take(100, LIMIT).await;
    listener.assert_quiet().await;
    assert_contiguous(&got);
    let mut seen = std::collections::HashSet::new();
    for e in &got {
        assert_eq!(e.kind, EventKind::Updated);
        assert!(seen.insert(e.assignment.id), "one event per row");
        let prior = e.prior.expect("an update carries the old state");
        assert_eq!(prior.status, Status::Queued);
        assert_eq!(prior.mechanic_id, None);
        assert_eq!(
            Some(prior.workshop_id.expect("old workshop")),
            workshops.get(&e.assignment.id).copied(),
            "the old state of this row, not another's"
        );
        assert_eq!(e.assignment.status, Status::Accepted);
        assert_eq!(e.assignment.mechanic_id, Some(mechanic));
        assert_eq!(e.assignment.workshop_id, None);
    }
    assert_eq!(seen.len(), workshops.len());
    listener.stop().await;
}

/// An UPDATE of `id` is each old row's delete and its new row's insert, paired by their order
/// in the transition tables: all the deletes first (rows that swap ids end with both present),
/// each naming the old id with the old row's state, then the inserts, in the same order, naming
/// the new ids.
#[tokio::test]
async fn an_update_that_changes_the_id_is_each_old_rows_delete_and_new_rows_insert() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    client
        .execute(
            "INSERT INTO session_assignments (session_id, workshop_id, status, customer_name)
             SELECT gen_random_uuid(), gen_random_uuid(), 'queued', 'k' || g
             FROM generate_series(1, 20) g",
            &[],
        )
        .await
        .unwrap();
    // customer_name does not change: it says which row an event is about.
    let before: HashMap<String, (Uuid, Uuid)> = client
        .query(
            "SELECT customer_name, id, workshop_id FROM session_assignments",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut listener = start_listener(&db, Start::Head).await;
    client
        .execute(
            "UPDATE session_assignments SET id = gen_random_uuid(), status = 'offered'",
            &[],
        )
        .await
        .unwrap();
    let after: HashMap<String, Uuid> = client
        .query("SELECT customer_name, id FROM session_assignments", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let got = listener.take(40, LIMIT).await;
    listener.assert_quiet().await;
    assert_contiguous(&got);
    // Every old row's delete first, then the inserts, each in the rows' order.
    let (deletes, inserts) = got.split_at(20);
    for (gone, new) in deletes.iter().zip(inserts) {
        let name = gone.assignment.customer_name.clone().expect("name");
        assert_eq!(new.assignment.customer_name.as_deref(), Some(name.as_str()));
        let (old_id, old_workshop) = before[&name];
        assert_eq!(gone.kind, EventKind::Deleted, "{name}");
        assert_eq!(gone.assignment.id, old_id, "the delete names the old id");
        assert_eq!(gone.assignment.status, Status::Queued);
        let prior = gone.prior.expect("old state");
        assert_eq!(prior.workshop_id, Some(old_workshop), "{name}");
        assert_eq!(new.kind, EventKind::Created, "{name}");
        assert_eq!(
            new.assignment.id, after[&name],
            "the insert names the new id"
        );
        assert_eq!(new.assignment.status, Status::Offered);
        assert!(new.prior.is_none());
    }
    listener.stop().await;
}

/// Two rows that swap ids in one statement (a deferrable key): every delete comes before the
/// inserts, so a client that applies the events by id ends with both rows, as the table has.
#[tokio::test]
async fn rows_that_swap_ids_are_both_there_after_their_events() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    client
        .batch_execute(&format!(
            "ALTER TABLE session_assignments DROP CONSTRAINT session_assignments_pkey,
                 ADD PRIMARY KEY (id) DEFERRABLE INITIALLY DEFERRED;
             INSERT INTO session_assignments (id, session_id, status, customer_name)
             VALUES ('{a}', gen_random_uuid(), 'queued', 'a'),
                    ('{b}', gen_random_uuid(), 'queued', 'b');"
        ))
        .await
        .unwrap();
    let mut listener = start_listener(&db, Start::Head).await;
    client
        .batch_execute(&format!(
            "UPDATE session_assignments
             SET id = CASE id WHEN '{a}' THEN '{b}'::uuid ELSE '{a}'::uuid END
             WHERE id IN ('{a}', '{b}')"
        ))
        .await
        .unwrap();
    let got = listener.take(4, LIMIT).await;
    listener.assert_quiet().await;
    let mut by_id = HashMap::new();
    for e in &got {
        match e.kind {
            EventKind::Deleted => by_id.remove(&e.assignment.id),
            _ => by_id.insert(e.assignment.id, e.assignment.customer_name.clone()),
        };
    }
    assert_eq!(by_id.len(), 2, "{got:?}");
    assert_eq!(
        by_id[&a].as_deref(),
        Some("b"),
        "a now holds the row that was b"
    );
    assert_eq!(by_id[&b].as_deref(), Some("a"));
    listener.stop().await;
}

/// Moves an assignment of `from` to `to` in a statement that also updates a row that stays,
/// and returns the three events: the staying row's update, the moved row's delete (in its old
/// session, with its old customer) and insert (in the new one).
async fn move_between_sessions(
    db: &pgcast_testkit::TestDb,
    client: &tokio_postgres::Client,
) -> (
    Uuid,
    Uuid,
    Vec<std::sync::Arc<pgcast_events::AssignmentEvent>>,
) {
    let (customer_a, customer_b) = (Uuid::new_v4(), Uuid::new_v4());
    let a = insert_session(client, customer_a).await;
    let b = insert_session(client, customer_b).await;
    client
        .batch_execute(&format!(
            "INSERT INTO session_assignments (session_id, status, customer_name)
             VALUES ('{a}', 'queued', 'stays'), ('{a}', 'queued', 'moves')"
        ))
        .await
        .unwrap();
    let mut listener = start_listener(db, Start::Head).await;
    client
        .batch_execute(&format!(
            "UPDATE session_assignments
             SET status = 'offered',
                 session_id = CASE customer_name WHEN 'moves' THEN '{b}'::uuid ELSE session_id END
             WHERE session_id = '{a}'"
        ))
        .await
        .unwrap();
    let got = listener.take(3, LIMIT).await;
    listener.assert_quiet().await;
    assert_contiguous(&got);
    let mut by_kind: Vec<_> = got
        .iter()
        .map(|e| {
            (
                e.kind,
                e.assignment.customer_name.clone().unwrap_or_default(),
                e.assignment.session_id,
                e.customer_id,
            )
        })
        .collect();
    by_kind.sort_by_key(|(_, name, _, _)| name.clone());
    assert_eq!(
        by_kind,
        [
            (EventKind::Deleted, "moves".to_owned(), a, Some(customer_a)),
            (EventKind::Created, "moves".to_owned(), b, Some(customer_b)),
            (EventKind::Updated, "stays".to_owned(), a, Some(customer_a)),
        ],
        "whoever saw the row in its old session sees it go"
    );
    let moved: Vec<_> = got
        .iter()
        .filter(|e| e.assignment.customer_name.as_deref() == Some("moves"))
        .collect();
    assert_eq!(moved[0].kind, EventKind::Deleted, "the delete comes first");
    assert_eq!(moved[0].assignment.status, Status::Queued);
    assert_eq!(moved[1].assignment.status, Status::Offered);
    assert_eq!(moved[0].assignment.id, moved[1].assignment.id);
    listener.stop().await;
    (a, b, got)
}

/// An assignment moved to another session leaves the old one: a mechanic who was a member of
/// the old session through it, and that session's customer, are told (a single update named by
/// the new session would reach neither).
#[tokio::test]
async fn an_assignment_moved_to_another_session_is_deleted_from_the_old_one() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    move_between_sessions(&db, &client).await;
    assert_nothing_unpublished(&client).await;
}

/// A session's first capture of an UPDATE plans the pairing of old and new rows for the rows it
/// had (one); up to version 7 that plan was a nested loop, and a later UPDATE of many rows in
/// the same session paired them in time quadratic in their number (2,000 rows: 18 s; these
/// 10,000: minutes, far past the deadline of `take`).
#[tokio::test]
async fn a_large_update_after_a_small_one_in_the_same_session_arrives_whole() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    // An ANALYZE of a table the capture reads or writes would make PostgreSQL plan the large
    // UPDATE's capture afresh, for its size, and hide the cached plan this test is about.
    client
        .batch_execute(
            "ALTER TABLE session_assignments SET (autovacuum_enabled = off);
             ALTER TABLE sessions SET (autovacuum_enabled = off);
             ALTER TABLE pgcast.assignment_changes SET (autovacuum_enabled = off);
             ALTER TABLE pgcast.committed_statements SET (autovacuum_enabled = off);",
        )
        .await
        .unwrap();
    client.execute(INSERT_MANY, &[&10_000_i32]).await.unwrap();
    let mut listener = start_listener(&db, Start::Head).await;
    // A bound, so that the quadratic pairing fails this test instead of hanging it: the
    // linear one takes a second or two here.
    client
        .batch_execute("SET statement_timeout = '60s'")
        .await
        .unwrap();
    client
        .execute(
            "UPDATE session_assignments SET status = 'offered' WHERE customer_name = 'c1'",
            &[],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE session_assignments SET status = 'expired' WHERE customer_name LIKE 'c%'",
            &[],
        )
        .await
        .unwrap();
    let got = listener.take(10_001, LIMIT).await;
    listener.assert_quiet().await;
    assert_eq!(got[0].assignment.status, Status::Offered);
    assert!(got[1..]
        .iter()
        .all(|e| e.kind == EventKind::Updated && e.assignment.status == Status::Expired));
    // Each row paired with its own old row: c1 was offered, every other row queued.
    for e in &got[1..] {
        let was = if e.assignment.customer_name.as_deref() == Some("c1") {
            Status::Offered
        } else {
            Status::Queued
        };
        assert_eq!(
            e.old_status(),
            Some(was),
            "{:?}",
            e.assignment.customer_name
        );
    }
    let names: std::collections::HashSet<String> = names(&got[1..]).into_iter().collect();
    assert_eq!(names.len(), 10_000, "every row once");
    assert_contiguous(&got[1..]);
    listener.stop().await;
}

#[tokio::test]
async fn a_multi_row_delete_carries_each_row_as_it_was() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    let mechanic = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO session_assignments (session_id, mechanic_id, status, customer_name)
             SELECT gen_random_uuid(), $1, 'accepted', 'd' || g FROM generate_series(1, 5) g",
            &[&mechanic],
        )
        .await
        .unwrap();
    let mut listener = start_listener(&db, Start::Head).await;
    client
        .execute(
            "DELETE FROM session_assignments WHERE customer_name LIKE 'd%'",
            &[],
        )
        .await
        .unwrap();
    let got = listener.take(5, LIMIT).await;
    listener.assert_quiet().await;
    assert_contiguous(&got);
    let mut seen: Vec<String> = names(&got);
    seen.sort();
    assert_eq!(seen, ["d1", "d2", "d3", "d4", "d5"]);
    for e in &got {
        assert_eq!(e.kind, EventKind::Deleted);
        assert_eq!(e.assignment.mechanic_id, Some(mechanic));
        let prior = e.prior.expect("old state");
        assert_eq!(prior.status, Status::Accepted);
        assert_eq!(prior.mechanic_id, Some(mechanic));
    }
    listener.stop().await;
}

#[tokio::test]
async fn savepoint_rollbacks_leave_no_events_and_the_rest_still_publishes() {
    let (db, mut client) = migrated_db(PgCluster::shared().unwrap()).await;
    let mut listener = start_listener(&db, Start::Head).await;

    // The transaction's first captured rows are rolled back with their savepoint (and with them
    // their statement's publishing at commit): what follows must still be published.
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(
        "SAVEPOINT s;
         INSERT INTO session_assignments (session_id, status, customer_name)
             SELECT gen_random_uuid(), 'queued', 'gone' || g FROM generate_series(1, 3) g;
         ROLLBACK TO SAVEPOINT s;",
    )
    .await
    .unwrap();
    tx.execute(INSERT_ONE, &[&"kept 1"]).await.unwrap();
    // A savepoint rolled back after the first captured rows.
    tx.batch_execute(
        "SAVEPOINT t;
         INSERT INTO session_assignments (session_id, status, customer_name)
             VALUES (gen_random_uuid(), 'queued', 'gone too');
         UPDATE session_assignments SET status = 'offered' WHERE customer_name = 'kept 1';
         ROLLBACK TO SAVEPOINT t;",
    )
    .await
    .unwrap();
    // A savepoint released is kept.
    tx.batch_execute(
        "SAVEPOINT u;
         INSERT INTO session_assignments (session_id, status, customer_name)
             VALUES (gen_random_uuid(), 'queued', 'kept 2');
         RELEASE SAVEPOINT u;",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    // A whole transaction rolled back.
    let tx = client.transaction().await.unwrap();
    tx.execute(INSERT_ONE, &[&"rolled back"]).await.unwrap();
    tx.rollback().await.unwrap();

    let got = listener.take(2, LIMIT).await;
    listener.assert_quiet().await;
    assert_eq!(names(&got), ["kept 1", "kept 2"]);
    assert!(got.iter().all(|e| e.kind == EventKind::Created));
    assert_contiguous(&got);
    assert_nothing_unpublished(&client).await;
    listener.stop().await;
}

/// A version 2 install with events in its log is upgraded in place: the row trigger is
/// replaced by the statement triggers, the log is untouched, and positions continue.
#[tokio::test]
async fn a_version_2_install_upgrades_in_place_and_positions_continue() {
    let (db, mut client) = db_at_version(2).await;

    let customer = Uuid::new_v4();
    let session = insert_session(&client, customer).await;
    client
        .execute(
            "INSERT INTO session_assignments (session_id, status, customer_name)
             SELECT $1, 'queued', 'v2 row ' || g FROM generate_series(1, 3) g",
            &[&session],
        )
        .await
        .unwrap();
    let old_log: Vec<(i64, String)> = client
        .query(
            "SELECT position, payload::text FROM pgcast.assignment_events ORDER BY position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(old_log.len(), 3);

    assert_eq!(
        upgrade_to_latest(&mut client).await,
        SCHEMA_VERSION as usize - 2
    );
    let triggers: Vec<String> = client
        .query(
            "SELECT tgname::text FROM pg_trigger
             WHERE tgrelid = 'session_assignments'::regclass AND tgname LIKE 'pgcast%'
             ORDER BY tgname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        triggers,
        [
            "pgcast_capture_delete",
            "pgcast_capture_insert",
            "pgcast_capture_truncate",
            "pgcast_capture_update",
            "pgcast_statement_start"
        ]
    );
    let kept: Vec<(i64, String)> = client
        .query(
            "SELECT position, payload::text FROM pgcast.assignment_events ORDER BY position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(kept, old_log, "the log is untouched");

    let mut listener = start_listener(&db, Start::After(0)).await;
    client
        .execute(
            "INSERT INTO session_assignments (session_id, status, customer_name)
             SELECT $1, 'queued', 'v3 row ' || g FROM generate_series(1, 2) g",
            &[&session],
        )
        .await
        .unwrap();
    let got = listener.take(5, LIMIT).await;
    listener.assert_quiet().await;
    assert_eq!(
        names(&got),
        ["v2 row 1", "v2 row 2", "v2 row 3", "v3 row 1", "v3 row 2"]
    );
    assert_eq!(got[3].position, old_log[2].0 + 1, "positions continue");
    assert_contiguous(&got[3..]);
    assert!(
        got.iter().all(|e| e.customer_id == Some(customer)),
        "both versions record the session's customer"
    );
    listener.stop().await;
}

/// A version 3 install is upgraded while a writer is between its first capture and its commit:
/// the upgrade waits for it (version 3 staged that writer's rows for a commit-time move into a
/// table version 4 replaces), the writer's events land in the log, every version 3 event keeps
/// its position and payload through the move, and positions continue.
#[tokio::test]
async fn a_version_3_install_upgrades_under_a_writer_in_flight_and_keeps_its_log() {
    let (db, client) = db_at_version(3).await;
    // A multi-row statement, an update and a delete, as version 3 logged them.
    client
        .batch_execute(
            "INSERT INTO session_assignments (session_id, status, customer_name)
                 SELECT gen_random_uuid(), 'queued', 'v3 row ' || g FROM generate_series(1, 3) g;
             UPDATE session_assignments SET status = 'offered' WHERE customer_name = 'v3 row 2';
             DELETE FROM session_assignments WHERE customer_name = 'v3 row 3';",
        )
        .await
        .unwrap();

    let mut writer = db.connect().await.unwrap();
    let writer_pid = backend_pid(&writer).await;
    let tx = writer.transaction().await.unwrap();
    tx.execute(INSERT_ONE, &[&"in flight"]).await.unwrap();

    let mut upgrader = db.connect().await.unwrap();
    let upgrader_pid = backend_pid(&upgrader).await;
    let upgrade = tokio::spawn(async move {
        migrate(&mut upgrader, MigrationScope::All)
            .await
            .map(|_| ())
    });
    // The upgrade waits for the writer's lock on the table (migrate's lock_timeout is 5 s).
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let waiting: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks w JOIN pg_locks h
                                  ON h.relation = w.relation AND h.granted AND h.pid = $2
                                WHERE w.pid = $1 AND NOT w.granted)",
                &[&upgrader_pid, &writer_pid],
            )
            .await
            .unwrap()
            .get(0);
        if waiting {
            break;
        }
        assert!(
            !upgrade.is_finished(),
            "the upgrade did not wait for the writer"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the upgrade never waited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tx.commit().await.unwrap();
    tokio::time::timeout(LIMIT, upgrade)
        .await
        .expect("the upgrade finishes once the writer committed")
        .unwrap()
        .expect("migrate");
    assert_eq!(
        installed_version(&client).await.unwrap(),
        Some(SCHEMA_VERSION)
    );
    // What version 3 would have shown: the same positions and payloads, now through the view.
    let log: Vec<(i64, String)> = client
        .query(
            "SELECT position, payload::text FROM pgcast.assignment_events ORDER BY position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(log.len(), 6, "{log:?}");
    let old_rows: i64 = client
        .query_one(
            "SELECT count(*) FROM pgcast.committed_statements c
             JOIN pgcast.assignment_changes ch USING (statement)
             WHERE c.first_position = c.last_position AND ch.ordinal = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(old_rows, 6, "each moved event is a statement of one row");

    let mut listener = start_listener(&db, Start::After(0)).await;
    client.execute(INSERT_ONE, &[&"v4 row"]).await.unwrap();
    let got = listener.take(7, LIMIT).await;
    listener.assert_quiet().await;
    assert_eq!(
        names(&got),
        [
            "v3 row 1",
            "v3 row 2",
            "v3 row 3",
            "v3 row 2",
            "v3 row 3",
            "in flight",
            "v4 row"
        ]
    );
    for (event, (position, _)) in got.iter().zip(&log) {
        assert_eq!(event.position, *position);
    }
    assert_contiguous(&got);
    assert_nothing_unpublished(&client).await;
    listener.stop().await;
}

/// Where an upgrade could not replace version 2's row trigger (pgcast's role did not own the
/// table), it still logs every change: since version 4 each row becomes a statement of one row,
/// published in the same commit, in write order, with its old state and its customer.
#[tokio::test]
async fn version_2_row_trigger_kept_by_a_non_owner_still_logs_every_change() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    client
        .batch_execute(KEEP_VERSION_2_ROW_TRIGGER)
        .await
        .unwrap();
    let customer = Uuid::new_v4();
    let session = insert_session(&client, customer).await;
    let mut listener = start_listener(&db, Start::Head).await;
    client
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO session_assignments (session_id, status, customer_name)
                 SELECT '{session}', 'queued', 'row ' || g FROM generate_series(1, 3) g;
             UPDATE session_assignments SET status = 'offered' WHERE customer_name = 'row 2';
             DELETE FROM session_assignments WHERE customer_name = 'row 3';
             COMMIT;"
        ))
        .await
        .unwrap();
    let got = listener.take(5, LIMIT).await;
    listener.assert_quiet().await;
    assert_eq!(names(&got), ["row 1", "row 2", "row 3", "row 2", "row 3"]);
    assert_eq!(
        got.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [
            EventKind::Created,
            EventKind::Created,
            EventKind::Created,
            EventKind::Updated,
            EventKind::Deleted
        ]
    );
    assert_eq!(got[3].old_status(), Some(Status::Queued));
    assert_eq!(got[4].assignment.status, Status::Queued);
    assert!(got.iter().all(|e| e.customer_id == Some(customer)));
    assert_contiguous(&got);
    assert_nothing_unpublished(&client).await;
    listener.stop().await;
}

/// Version 2's row trigger logs a move the same way: the old row's delete, then the insert.
#[tokio::test]
async fn version_2_row_trigger_logs_a_move_as_a_delete_and_an_insert() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    client
        .batch_execute(KEEP_VERSION_2_ROW_TRIGGER)
        .await
        .unwrap();
    move_between_sessions(&db, &client).await;
    assert_nothing_unpublished(&client).await;
}

/// Retention deletes at most a batch of events per call, oldest first: whole statements while
/// they fit, and a statement larger than a batch a batch at a time, the boundary moving within
/// it (a 1,000,000-row statement deleted in one call would outlast the pruner's statement
/// timeout, and be tried again, and fail again, forever).
#[tokio::test]
async fn pruning_deletes_at_most_a_batch_of_events_per_call() {
    let (_db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    // Four transactions: a statement is published (and can be backdated) at its commit.
    for sql in [
        "INSERT INTO session_assignments (session_id, status, customer_name)
         SELECT gen_random_uuid(), 'queued', 'old ' || g FROM generate_series(1, 3) g",
        "INSERT INTO session_assignments (session_id, status, customer_name)
         VALUES (gen_random_uuid(), 'queued', 'old 4')",
        "INSERT INTO session_assignments (session_id, status, customer_name)
         VALUES (gen_random_uuid(), 'queued', 'old 5')",
        "UPDATE pgcast.committed_statements SET committed_at = now() - interval '1 hour'",
        "INSERT INTO session_assignments (session_id, status, customer_name)
         VALUES (gen_random_uuid(), 'queued', 'new')",
    ] {
        client.execute(sql, &[]).await.unwrap();
    }
    let positions = log_positions(&client).await;
    assert_eq!(positions.len(), 6);
    let prune = |batch: i32| {
        let client = &client;
        async move {
            let deleted: i32 = client
                .query_one("SELECT pgcast.prune_events('1 minute', $1)", &[&batch])
                .await
                .unwrap()
                .get(0);
            let row = client
                .query_one(
                    "SELECT (SELECT count(*) FROM pgcast.committed_statements),
                            (SELECT pruned_through FROM pgcast.log_state)",
                    &[],
                )
                .await
                .unwrap();
            let left = log_positions(client).await;
            (deleted, row.get::<_, i64>(0), row.get::<_, i64>(1), left)
        }
    };
    // The 3-row statement does not fit a batch of 2: its first two events go, it stays.
    assert_eq!(
        prune(2).await,
        (2, 4, positions[1], positions[2..].to_vec())
    );
    // Its last event, and with it the statement.
    assert_eq!(
        prune(2).await,
        (1, 3, positions[2], positions[3..].to_vec())
    );
    // Two 1-row statements fit one batch; the new one is not due.
    assert_eq!(
        prune(2).await,
        (2, 1, positions[4], positions[5..].to_vec())
    );
    assert_eq!(
        prune(2).await,
        (0, 1, positions[4], positions[5..].to_vec())
    );
}

/// Transaction A writes 50 rows first and commits last: all of A's positions are above all of
/// B's. Then many writers commit multi-row transactions at once while the listener reads: a
/// position that became visible before a lower one committed would be skipped by the
/// listener (it reads after its last position), so every row must arrive, each transaction's
/// rows as one block in write order.
#[tokio::test]
async fn concurrent_multi_row_transactions_get_positions_in_commit_order() {
    let (db, _client) = migrated_db(PgCluster::shared().unwrap()).await;
    let mut listener = start_listener(&db, Start::Head).await;

    let mut a = db.connect().await.unwrap();
    let mut b = db.connect().await.unwrap();
    let ta = a.transaction().await.unwrap();
    ta.execute(
        "INSERT INTO session_assignments (session_id, status, customer_name)
         SELECT gen_random_uuid(), 'queued', 'A' || g FROM generate_series(1, 50) g",
        &[],
    )
    .await
    .unwrap();
    let tb = b.transaction().await.unwrap();
    tb.execute(
        "INSERT INTO session_assignments (session_id, status, customer_name)
         SELECT gen_random_uuid(), 'queued', 'B' || g FROM generate_series(1, 50) g",
        &[],
    )
    .await
    .unwrap();
    tb.commit().await.unwrap();
    let first = listener.take(50, LIMIT).await;
    assert!(names(&first).iter().all(|n| n.starts_with('B')));
    ta.commit().await.unwrap();
    let second = listener.take(50, LIMIT).await;
    assert_eq!(
        names(&second),
        (1..=50).map(|g| format!("A{g}")).collect::<Vec<_>>()
    );
    assert!(second[0].position > first[49].position);

    const WRITERS: usize = 6;
    const TRANSACTIONS: usize = 15;
    const ROWS: i32 = 20;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = db.connect().await.unwrap();
            for t in 0..TRANSACTIONS {
                let tx = client.transaction().await.unwrap();
                tx.execute(
                    "INSERT INTO session_assignments (session_id, status, customer_name)
                     SELECT gen_random_uuid(), 'queued', $1 || '-' || g
                     FROM generate_series(1, $2) g",
                    &[&format!("w{w}t{t}"), &ROWS],
                )
                .await
                .unwrap();
                // A second statement in every other transaction.
                if t.is_multiple_of(2) {
                    tx.execute(
                        "UPDATE session_assignments SET status = 'offered'
                         WHERE customer_name = $1",
                        &[&format!("w{w}t{t}-1")],
                    )
                    .await
                    .unwrap();
                }
                tx.commit().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let per_tx = |t: usize| ROWS as usize + usize::from(t.is_multiple_of(2));
    let expected: usize = WRITERS * (0..TRANSACTIONS).map(per_tx).sum::<usize>();
    let got = listener.take(expected, Duration::from_secs(60)).await;
    listener.assert_quiet().await;
    assert!(got.windows(2).all(|w| w[0].position < w[1].position));
    // Each transaction: one contiguous block, its rows in write order, then its update.
    let mut i = 0;
    let mut blocks = 0;
    while i < got.len() {
        let name = got[i].assignment.customer_name.clone().unwrap_or_default();
        let tx = name.split('-').next().unwrap_or_default().to_owned();
        let t: usize = tx
            .split('t')
            .nth(1)
            .and_then(|t| t.parse().ok())
            .expect("tx");
        let block = &got[i..i + per_tx(t)];
        assert_contiguous(block);
        let mut want: Vec<String> = (1..=ROWS).map(|g| format!("{tx}-{g}")).collect();
        if t.is_multiple_of(2) {
            want.push(format!("{tx}-1"));
            assert_eq!(block.last().map(|e| e.kind), Some(EventKind::Updated));
        }
        assert_eq!(names(block), want);
        i += block.len();
        blocks += 1;
    }
    assert_eq!(blocks, WRITERS * TRANSACTIONS);
    listener.stop().await;
}

/// An application's own table may use `timestamp` without time zone and a nullable `urgent`:
/// its changes are still events (times read as UTC, a null `urgent` as not urgent), never
/// undecodable rows skipped.
#[tokio::test]
async fn an_applications_timestamp_and_nullable_columns_are_read() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    client
        .batch_execute(
            "ALTER TABLE session_assignments
                 ALTER COLUMN created_at TYPE timestamp USING created_at AT TIME ZONE 'UTC',
                 ALTER COLUMN updated_at TYPE timestamp USING updated_at AT TIME ZONE 'UTC',
                 ALTER COLUMN urgent DROP NOT NULL,
                 ALTER COLUMN urgent DROP DEFAULT",
        )
        .await
        .unwrap();
    let mut listener = start_listener(&db, Start::Head).await;
    client
        .execute(
            "INSERT INTO session_assignments (session_id, status, customer_name, created_at)
             VALUES (gen_random_uuid(), 'queued', 'naive', '2026-11-29 04:05:06.5')",
            &[],
        )
        .await
        .unwrap();
    let events = listener.take(1, LIMIT).await;
    assert_eq!(names(&events), ["naive"]);
    let a = &events[0].assignment;
    assert!(!a.urgent, "a null urgent is not urgent");
    let utc: chrono::DateTime<chrono::Utc> = "2026-11-29T04:05:06.5Z".parse().unwrap();
    assert_eq!(a.created_at, Some(utc));
    listener.stop().await;
}

/// CHECK constraints on the log's tables, by table.
async fn log_checks(client: &tokio_postgres::Client) -> Vec<(String, i64)> {
    client
        .query(
            "SELECT t.relname::text, count(con.oid)
             FROM (VALUES ('pgcast.assignment_changes'::regclass),
                          ('pgcast.committed_statements'::regclass)) AS t0(oid)
             JOIN pg_class t ON t.oid = t0.oid
             LEFT JOIN pg_constraint con ON con.conrelid = t.oid AND con.contype = 'c'
             GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Version 6 drops the log tables' CHECK constraints (they were prepared again for every
/// captured and every published statement): an install at version 5 upgrades with its log
/// whole, and captures and publishes as before.
#[tokio::test]
async fn a_version_5_install_upgrades_to_log_tables_without_checks() {
    let (db, mut client) = db_at_version(5).await;
    assert_eq!(
        log_checks(&client).await,
        [
            ("assignment_changes".to_owned(), 2),
            ("committed_statements".to_owned(), 1)
        ],
        "version 5 has them"
    );
    client.execute(INSERT_MANY, &[&2i32]).await.unwrap();
    let before = log_positions(&client).await;
    assert_eq!(before.len(), 2);

    upgrade_to_latest(&mut client).await;
    assert_eq!(
        log_checks(&client).await,
        [
            ("assignment_changes".to_owned(), 0),
            ("committed_statements".to_owned(), 0)
        ]
    );
    assert_eq!(log_positions(&client).await, before, "the log as it was");

    let mut listener = start_listener(&db, Start::After(0)).await;
    client.execute(INSERT_MANY, &[&2i32]).await.unwrap();
    client.execute(INSERT_ONE, &[&"after"]).await.unwrap();
    let got = listener.take(5, LIMIT).await;
    assert_eq!(names(&got), ["c1", "c2", "c1", "c2", "after"]);
    let positions: Vec<_> = got.iter().map(|e| e.position).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    listener.assert_quiet().await;
    listener.stop().await;
}

/// The log's column type of each event: `jsonb` up to version 6, `json` since version 7.
async fn event_column_type(client: &tokio_postgres::Client) -> String {
    client
        .query_one(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
             WHERE a.attrelid = 'pgcast.assignment_changes'::regclass AND a.attname = 'event'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Every payload the view `pgcast.assignment_events` shows, in position order (but the
/// listener's own probes).
async fn view_payloads(client: &tokio_postgres::Client) -> Vec<(i64, serde_json::Value)> {
    client
        .query(
            "SELECT position, payload::text FROM pgcast.assignment_events
             WHERE payload->'row'->>'customer_name' IS DISTINCT FROM $1
             ORDER BY position",
            &[&MARKER],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let text: String = r.get(1);
            (r.get(0), serde_json::from_str(&text).unwrap())
        })
        .collect()
}

/// A name JSON has to escape (quotes, a backslash, a newline, letters beyond ASCII).
const ESCAPED: &str = "Zoë \"Ann\" O\\Brien\n✓";

/// One change of each kind the capture has a branch for, on one new row: an insert (with a
/// session that has a customer), an update, a move to another session (a delete and an insert)
/// and a delete. Five events.
async fn one_change_of_each_kind(client: &tokio_postgres::Client) {
    let first = insert_session(client, Uuid::new_v4()).await;
    let second = insert_session(client, Uuid::new_v4()).await;
    let id: Uuid = client
        .query_one(
            "INSERT INTO session_assignments (session_id, status, customer_name, concern)
             VALUES ($1, 'queued', $2, $2) RETURNING id",
            &[&first, &ESCAPED],
        )
        .await
        .unwrap()
        .get(0);
    for (sql, session) in [
        (
            "UPDATE session_assignments SET status = 'offered', urgent = true WHERE id = $1 AND $2::uuid IS NOT NULL",
            first,
        ),
        (
            "UPDATE session_assignments SET session_id = $2 WHERE id = $1",
            second,
        ),
        (
            "DELETE FROM session_assignments WHERE id = $1 AND $2::uuid IS NOT NULL",
            second,
        ),
    ] {
        assert_eq!(client.execute(sql, &[&id, &session]).await.unwrap(), 1);
    }
}

/// What two rounds of [`one_change_of_each_kind`] have in common: all but ids, times and
/// positions (kind, status, old status, urgent, name, concern, whether a customer is named).
type Shape = (
    EventKind,
    Status,
    Option<Status>,
    bool,
    Option<String>,
    Option<String>,
    bool,
);

fn shape(events: &[std::sync::Arc<pgcast_events::AssignmentEvent>]) -> Vec<Shape> {
    events
        .iter()
        .map(|e| {
            (
                e.kind,
                e.assignment.status,
                e.old_status(),
                e.assignment.urgent,
                e.assignment.customer_name.clone(),
                e.assignment.concern.clone(),
                e.customer_id.is_some(),
            )
        })
        .collect()
}

/// Version 7 stores each event as json text instead of jsonb (PostgreSQL never looks inside
/// one, and printing jsonb back to text cost every read): an install at version 6 upgrades with
/// its log read back event for event as before, the view shows the same payloads, and every
/// kind of change is captured as before.
#[tokio::test]
async fn a_version_6_install_upgrades_to_a_log_of_json_events() {
    let (db, mut client) = db_at_version(6).await;
    assert_eq!(event_column_type(&client).await, "jsonb");
    one_change_of_each_kind(&client).await;
    let mut listener = start_listener(&db, Start::After(0)).await;
    let before = listener.take(5, LIMIT).await;
    listener.stop().await;
    assert_eq!(
        shape(&before).iter().map(|s| s.0).collect::<Vec<_>>(),
        [
            EventKind::Created,
            EventKind::Updated,
            EventKind::Deleted,
            EventKind::Created,
            EventKind::Deleted
        ]
    );
    assert!(before
        .iter()
        .all(|e| e.assignment.customer_name.as_deref() == Some(ESCAPED)));
    let payloads = view_payloads(&client).await;
    assert_eq!(payloads.len(), 5);

    upgrade_to_latest(&mut client).await;
    assert_eq!(event_column_type(&client).await, "json");
    assert_eq!(view_payloads(&client).await, payloads, "the view as it was");

    let mut listener = start_listener(&db, Start::After(0)).await;
    assert_eq!(
        listener.take(5, LIMIT).await,
        before,
        "the log read back as it was"
    );
    one_change_of_each_kind(&client).await;
    let after = listener.take(5, LIMIT).await;
    assert_eq!(shape(&after), shape(&before), "captured as before");
    assert!(after[0].position > before[4].position);
    assert_contiguous(&after[2..4]);
    listener.assert_quiet().await;
    listener.stop().await;
    assert_eq!(view_payloads(&client).await.len(), 10);
    assert_nothing_unpublished(&client).await;
}

/// A write never fails because of notification, whatever the application's own columns hold:
/// `jsonb` refuses a `\u0000` escape that a `json` column keeps, so before version 7 such a row
/// made the capture, and with it the application's write, fail. Now it is logged and read.
#[tokio::test]
async fn a_row_with_what_jsonb_refuses_is_written_and_read() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    client
        .batch_execute("ALTER TABLE session_assignments ADD COLUMN notes json")
        .await
        .unwrap();
    let mut listener = start_listener(&db, Start::Head).await;
    client
        .execute(
            r#"INSERT INTO session_assignments (session_id, status, customer_name, notes)
               VALUES (gen_random_uuid(), 'queued', 'nul', '{"a": "x\u0000y"}')"#,
            &[],
        )
        .await
        .expect("the application's write commits");
    let got = listener.take(1, LIMIT).await;
    assert_eq!(names(&got), ["nul"]);
    listener.assert_quiet().await;
    listener.stop().await;
}

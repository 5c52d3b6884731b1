//! A TRUNCATE of `session_assignments` (version 9): logged as a delete of every row it removed,
//! each with its row, old status and session's customer, in one block of commit-ordered
//! positions; nothing when it rolls back; also when it comes by `TRUNCATE … CASCADE` from a
//! table the assignments reference; and an upgrade from version 8 adds the trigger.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use pgcast_events::{EventKind, Status};
use pgcast_listener::Start;
use pgcast_testkit::PgCluster;
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_truncate_is_a_delete_of_every_row_it_removed() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    let customer = Uuid::new_v4();
    let session = insert_session(&client, customer).await;
    client
        .execute(
            "INSERT INTO session_assignments (session_id, status, customer_name)
             SELECT $1, 'queued', 'c' || g FROM generate_series(1, 50) g",
            &[&session],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE session_assignments SET status = 'offered' WHERE customer_name = 'c1'",
            &[],
        )
        .await
        .unwrap();
    let mut listener = start_listener(&db, Start::Head).await;
    // Rolled back: nothing.
    client
        .batch_execute("BEGIN; TRUNCATE session_assignments; ROLLBACK;")
        .await
        .unwrap();
    // Committed, with a write after it in the same transaction: the deletes come first.
    client
        .batch_execute(
            "BEGIN;
             TRUNCATE session_assignments;
             INSERT INTO session_assignments (session_id, status, customer_name)
             VALUES (gen_random_uuid(), 'queued', 'after');
             COMMIT;",
        )
        .await
        .unwrap();
    let got = listener.take(51, LIMIT).await;
    listener.assert_quiet().await;
    assert_contiguous(&got);
    let (deletes, rest) = got.split_at(50);
    assert!(deletes.iter().all(|e| e.kind == EventKind::Deleted));
    let names: HashSet<String> = deletes
        .iter()
        .map(|e| e.assignment.customer_name.clone().unwrap_or_default())
        .collect();
    assert_eq!(names.len(), 50, "every row once");
    for e in deletes {
        assert_eq!(e.assignment.session_id, session);
        assert_eq!(e.customer_id, Some(customer), "the session's customer");
        let was = if e.assignment.customer_name.as_deref() == Some("c1") {
            Status::Offered
        } else {
            Status::Queued
        };
        assert_eq!(e.old_status(), Some(was));
    }
    assert_eq!(rest[0].kind, EventKind::Created);
    assert_eq!(rest[0].assignment.customer_name.as_deref(), Some("after"));
    // An empty table: a TRUNCATE logs nothing.
    client
        .batch_execute("DELETE FROM session_assignments; TRUNCATE session_assignments;")
        .await
        .unwrap();
    let got = listener.take(2, LIMIT).await;
    assert!(
        got.iter().all(|e| e.kind == EventKind::Deleted),
        "the DELETE's rows: the last write and assert_quiet's marker"
    );
    listener.assert_quiet().await;
    listener.stop().await;
}

/// Truncating a table the assignments reference, with CASCADE, truncates them too: their
/// deletes are logged as well.
#[tokio::test]
async fn a_truncate_cascaded_from_another_table_is_logged() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    let session = insert_session(&client, Uuid::new_v4()).await;
    client
        .batch_execute(
            "ALTER TABLE session_assignments ADD FOREIGN KEY (session_id) REFERENCES sessions (id)",
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO session_assignments (session_id, status, customer_name)
             SELECT $1, 'queued', 'c' || g FROM generate_series(1, 3) g",
            &[&session],
        )
        .await
        .unwrap();
    let mut listener = start_listener(&db, Start::Head).await;
    client
        .batch_execute("TRUNCATE sessions CASCADE")
        .await
        .unwrap();
    let got = listener.take(3, LIMIT).await;
    assert!(got
        .iter()
        .all(|e| e.kind == EventKind::Deleted && e.assignment.session_id == session));
    // (assert_quiet's marker has no session.)
    client
        .batch_execute(
            "ALTER TABLE session_assignments DROP CONSTRAINT session_assignments_session_id_fkey",
        )
        .await
        .unwrap();
    listener.assert_quiet().await;
    listener.stop().await;
}

/// A version 8 install, whose TRUNCATE logged nothing, upgraded: the trigger is added and a
/// TRUNCATE after the upgrade is logged.
#[tokio::test]
async fn an_upgrade_from_version_8_logs_truncates() {
    let (db, mut client) = db_at_version(8).await;
    client.execute(INSERT_MANY, &[&2_i32]).await.unwrap();
    client
        .batch_execute("TRUNCATE session_assignments")
        .await
        .unwrap();
    assert_eq!(
        log_positions(&client).await.len(),
        2,
        "version 8 logged the inserts, not the TRUNCATE"
    );
    assert_eq!(upgrade_to_latest(&mut client).await, 1);
    client.execute(INSERT_MANY, &[&2_i32]).await.unwrap();
    let mut listener = start_listener(&db, Start::Head).await;
    client
        .batch_execute("TRUNCATE session_assignments")
        .await
        .unwrap();
    let got = listener.take(2, LIMIT).await;
    assert!(got.iter().all(|e| e.kind == EventKind::Deleted));
    listener.stop().await;
}

/// Under REPEATABLE READ (or SERIALIZABLE) the trigger's read of the rows uses the
/// transaction's snapshot, which may not show rows committed since; TRUNCATE removes them
/// anyway. Such a TRUNCATE is refused, with a hint, rather than logged with rows missing.
#[tokio::test]
async fn a_truncate_outside_read_committed_is_refused() {
    let (db, mut client) = migrated_db(PgCluster::shared().unwrap()).await;
    client.execute(INSERT_MANY, &[&2_i32]).await.unwrap();
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    // The snapshot is taken; another session commits a row it cannot see.
    tx.query_one("SELECT count(*) FROM session_assignments", &[])
        .await
        .unwrap();
    let other = db.connect().await.unwrap();
    other.execute(INSERT_ONE, &[&"unseen"]).await.unwrap();
    let error = tx
        .batch_execute("TRUNCATE session_assignments")
        .await
        .expect_err("refused");
    let db_error = error.as_db_error().expect("a database error");
    assert!(
        db_error.message().contains("READ COMMITTED"),
        "{}",
        db_error.message()
    );
    assert!(
        db_error.hint().is_some_and(|h| h.contains("DELETE")),
        "{db_error:?}"
    );
    drop(tx);
    let left: i64 = client
        .query_one("SELECT count(*) FROM session_assignments", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 3, "nothing was removed");
}

//! What a database role without pgcast's privileges can and cannot do (docs/architecture.md §8): it may
//! LISTEN and NOTIFY (PostgreSQL allows that to every role that can connect) and take advisory
//! locks, but it learns no row data from the channel, cannot attach pgcast's trigger function,
//! cannot write the log and cannot take the locks that order commits or pruning.

mod common;

use std::time::Duration;

use common::*;
use pgcast_listener::{migrate, migrate_within, ListenerError, MigrationScope};
use pgcast_testkit::PgCluster;

const LIMIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_role_that_can_only_connect_hears_doorbells_without_row_data() {
    let (db, mut client) = migrated_db(PgCluster::shared().unwrap()).await;
    let (snoop, mut heard) = connect_as_hearing(&db, &client, "snoop", "").await;
    snoop
        .batch_execute("LISTEN pgcast_assignments")
        .await
        .expect("PostgreSQL lets any role LISTEN");
    let tx = client.transaction().await.unwrap();
    for name in ["Ana Secret", "Ben Private", "Cy Hidden"] {
        tx.execute(INSERT_ONE, &[&name]).await.unwrap();
    }
    tx.commit().await.unwrap();
    client.execute(INSERT_ONE, &[&"Dee Quiet"]).await.unwrap();
    // Two transactions, two doorbells, both empty.
    for _ in 0..2 {
        let payload = tokio::time::timeout(LIMIT, heard.recv())
            .await
            .expect("a doorbell")
            .expect("connection alive");
        assert_eq!(payload, "", "the channel carries no row data");
    }
    // And the log itself is out of reach.
    denied(&snoop, "SELECT payload FROM pgcast.assignment_events").await;
}

#[tokio::test]
async fn a_role_with_usage_on_the_schema_cannot_attach_write_or_lock() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    let (intruder, _) = connect_as_hearing(
        &db,
        &client,
        "intruder",
        "GRANT USAGE ON SCHEMA pgcast TO {role}",
    )
    .await;

    // Attaching the SECURITY DEFINER function to its own temp table: no EXECUTE.
    intruder
        .batch_execute(
            "CREATE TEMP TABLE fake (id uuid, session_id uuid, mechanic_id uuid, workshop_id uuid,
                                     status text)",
        )
        .await
        .unwrap();
    denied(
        &intruder,
        "CREATE CONSTRAINT TRIGGER fake_emit AFTER INSERT ON fake DEFERRABLE INITIALLY DEFERRED
         FOR EACH ROW EXECUTE FUNCTION pgcast.emit_assignment_event()",
    )
    .await;
    denied(&intruder, "SELECT pgcast.emit_assignment_event()").await;
    denied(&intruder, "SELECT pgcast.prune_events('1 second')").await;
    denied(&intruder, "SELECT nextval('pgcast.event_position')").await;
    // The log's two tables (version 4): a captured row becomes an event when its statement is
    // published, so writing either would forge or erase events; the functions and sequence
    // that write them are pgcast's alone. The view over them is not writable at all.
    denied(
        &intruder,
        "INSERT INTO pgcast.assignment_changes
         VALUES (0, 1, 1, 'insert', gen_random_uuid(), '{}')",
    )
    .await;
    denied(&intruder, "DELETE FROM pgcast.assignment_changes").await;
    denied(
        &intruder,
        "INSERT INTO pgcast.committed_statements VALUES (999999, 999999, 0, now())",
    )
    .await;
    denied(&intruder, "DELETE FROM pgcast.committed_statements").await;
    denied(&intruder, "SELECT payload FROM pgcast.assignment_events").await;
    denied(
        &intruder,
        "CREATE TRIGGER fake_capture AFTER INSERT ON fake
         FOR EACH STATEMENT EXECUTE FUNCTION pgcast.capture_assignment_changes()",
    )
    .await;
    denied(&intruder, "SELECT pgcast.capture_assignment_changes()").await;
    denied(&intruder, "SELECT pgcast.publish_statement()").await;
    denied(&intruder, "SELECT pgcast.install_capture()").await;
    denied(&intruder, "SELECT nextval('pgcast.capture_statement')").await;
    // The commit-order lock and the prune lock.
    denied(
        &intruder,
        "BEGIN; LOCK TABLE pgcast.commit_order IN EXCLUSIVE MODE",
    )
    .await;
    intruder.batch_execute("ROLLBACK").await.unwrap();
    denied(
        &intruder,
        "BEGIN; SELECT * FROM pgcast.log_state FOR UPDATE",
    )
    .await;
    intruder.batch_execute("ROLLBACK").await.unwrap();

    // What it can take — the advisory keys pgcast used to rely on, and an open transaction
    // that touched what it could — stalls nothing: writes commit and pruning runs.
    intruder
        .batch_execute(
            "SELECT pg_advisory_lock(7277017001), pg_advisory_lock(7277017002);
             BEGIN; SELECT count(*) FROM pg_class; SELECT pg_advisory_xact_lock(7277017001);",
        )
        .await
        .unwrap();
    let mut listener = start_listener(&db, pgcast_listener::Start::Head).await;
    tokio::time::timeout(LIMIT, client.execute(INSERT_ONE, &[&"still writes"]))
        .await
        .expect("a write commits while the intruder holds what it can")
        .unwrap();
    let got = listener.take(1, LIMIT).await;
    assert_eq!(
        got[0].assignment.customer_name.as_deref(),
        Some("still writes")
    );
    assert_prune_runs(&client, LIMIT).await;
    listener.stop().await;
}

#[tokio::test]
async fn the_trigger_function_refuses_any_other_table() {
    let (_db, mut client) = migrated_db(PgCluster::shared().unwrap()).await;
    // A superuser bypasses EXECUTE; the function itself still refuses.
    client
        .batch_execute(
            "CREATE TABLE other_assignments (LIKE session_assignments INCLUDING DEFAULTS);
             CREATE CONSTRAINT TRIGGER other_emit AFTER INSERT ON other_assignments
                 DEFERRABLE INITIALLY DEFERRED
                 FOR EACH ROW EXECUTE FUNCTION pgcast.emit_assignment_event();",
        )
        .await
        .unwrap();
    let before = log_positions(&client).await;
    let tx = client.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO other_assignments (session_id, status) VALUES (gen_random_uuid(), 'queued')",
        &[],
    )
    .await
    .unwrap();
    let err = tx
        .commit()
        .await
        .expect_err("the foreign table's commit is refused");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(
        message.contains("only the table it was installed on"),
        "{err}"
    );
    assert_eq!(log_positions(&client).await, before, "nothing was logged");
    // The real table still works.
    client.execute(INSERT_ONE, &[&"real"]).await.unwrap();
    assert_eq!(log_positions(&client).await.len(), before.len() + 1);
}

#[tokio::test]
async fn a_version_1_install_upgrades_keeping_its_log() {
    let (db, mut client) = db_at_version(1).await;
    for name in ["old one", "old two"] {
        client.execute(INSERT_ONE, &[&name]).await.unwrap();
    }
    let old = log_positions(&client).await;
    assert_eq!(old.len(), 2);

    let applied = pgcast_listener::migrate(&mut client, pgcast_listener::MigrationScope::All)
        .await
        .unwrap();
    assert!(applied >= 1);
    assert_eq!(
        pgcast_listener::installed_version(&client).await.unwrap(),
        Some(pgcast_listener::SCHEMA_VERSION)
    );
    // The old rows are still there and readable; new writes continue the positions.
    let mut listener = start_listener(&db, pgcast_listener::Start::After(0)).await;
    client.execute(INSERT_ONE, &[&"new"]).await.unwrap();
    let got = listener.take(3, LIMIT).await;
    let names: Vec<_> = got
        .iter()
        .map(|e| e.assignment.customer_name.clone().unwrap_or_default())
        .collect();
    assert_eq!(names, ["old one", "old two", "new"]);
    assert!(got[2].position > old[1]);
    listener.stop().await;
}

/// Any role can take the migration lock's advisory key. A `migrate` with nothing to do (every
/// restart of `serve --migrate`) does not wait for it; one with work waits a bounded time and
/// then fails naming the session that holds it.
#[tokio::test]
async fn a_role_holding_the_migration_key_stalls_no_restart_and_is_named() {
    let (db, mut client) = migrated_db(PgCluster::shared().unwrap()).await;
    let (_, holder) = connect_as(&db, &client, "keyholder", "").await;
    let pid = backend_pid(&holder).await;
    holder
        .batch_execute("SELECT pg_advisory_lock(7277017000)")
        .await
        .expect("any role can take an advisory key");

    let applied = tokio::time::timeout(LIMIT, migrate(&mut client, MigrationScope::All))
        .await
        .expect("nothing to do: migrate does not wait for the lock")
        .expect("migrate");
    assert_eq!(applied, 0);

    // Something to do: the realtime history no longer records the latest version.
    client
        .batch_execute(
            "DELETE FROM pgcast.realtime_migrations
             WHERE version = (SELECT max(version) FROM pgcast.realtime_migrations)",
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let error = tokio::time::timeout(
        LIMIT,
        migrate_within(&mut client, MigrationScope::All, Duration::from_secs(1)),
    )
    .await
    .expect("a bounded wait")
    .expect_err("the lock is held");
    assert!(
        matches!(&error, ListenerError::MigrationLockHeld { holder, .. }
            if holder.contains(&format!("pid {pid} ")) && holder.contains("keyholder")),
        "{error}"
    );
    assert!(started.elapsed() >= Duration::from_secs(1), "it waited");
    // The session's own lock_timeout is back.
    let timeout: String = client
        .query_one("SELECT current_setting('lock_timeout')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "0");

    // Once the holder lets go, the pending work is done under the lock: the latest version
    // runs again, and either applies (one that can run twice) or fails inside its own
    // transaction (one whose objects exist already); either way past the lock.
    holder
        .batch_execute("SELECT pg_advisory_unlock(7277017000)")
        .await
        .unwrap();
    match tokio::time::timeout(LIMIT, migrate(&mut client, MigrationScope::All))
        .await
        .expect("the lock is free")
    {
        Ok(applied) => assert_eq!(applied, 1),
        Err(ListenerError::Migration(_)) => {}
        Err(other) => panic!("the pending version did not run: {other}"),
    }
}

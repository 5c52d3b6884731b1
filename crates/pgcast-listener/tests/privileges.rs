//! The locks and checks behind docs/architecture.md §8, attacked the way PostgreSQL actually lets a role
//! without privileges reach them (the basics — no EXECUTE, no writes, empty doorbells — are in
//! `roles.rs`):
//!
//! - `PREPARE` takes its relation locks at parse time, before any permission check, and keeps
//!   them until the transaction ends: a role with `USAGE` on schema `pgcast` can hold ROW SHARE
//!   (`… FOR UPDATE`) or ROW EXCLUSIVE (`INSERT …`) on any pgcast table for as long as it likes.
//!   The commit-order lock must not conflict with those, or that role stalls every write.
//! - Pruners skip each other instead of queueing.
//! - `SET CONSTRAINTS ALL IMMEDIATE` holds the commit-order lock from the statement to commit,
//!   and commit order still holds.
//! - The trigger function serves only the table it was installed on, whatever the schema, also
//!   after an upgrade from version 1.
//! - A migration that cannot get a table lock fails after a few seconds instead of queueing
//!   every later statement on that table behind it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgcast_listener::{
    installed_version, migrate, ListenerError, MigrationScope, Start, SCHEMA_VERSION,
};
use pgcast_testkit::PgCluster;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

/// Bound on anything that must happen; never reached when things work.
const LIMIT: Duration = Duration::from_secs(20);
/// A write or a prune that takes longer than this while an intruder holds locks is stalled.
const STALL: Duration = Duration::from_secs(10);

/// Runs `sql` inside the open transaction of `client` under a savepoint: kept (with whatever
/// locks it took) when it succeeds, rolled back when it fails. Returns the failure's SQLSTATE.
async fn attempt(client: &Client, sql: &str) -> Result<(), SqlState> {
    client.batch_execute("SAVEPOINT attempt").await.unwrap();
    match client.batch_execute(sql).await {
        Ok(()) => {
            client
                .batch_execute("RELEASE SAVEPOINT attempt")
                .await
                .unwrap();
            Ok(())
        }
        Err(err) => {
            client
                .batch_execute("ROLLBACK TO SAVEPOINT attempt")
                .await
                .unwrap();
            Err(err
                .as_db_error()
                .unwrap_or_else(|| panic!("{sql}: {err}"))
                .code()
                .clone())
        }
    }
}

/// The relation lock modes `pid` holds on `table`, sorted.
async fn held_modes(admin: &Client, pid: i32, table: &str) -> Vec<String> {
    admin
        .query(
            "SELECT mode FROM pg_locks
             WHERE pid = $1 AND locktype = 'relation' AND granted
               AND relation = to_regclass($2) ORDER BY mode",
            &[&pid, &table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Polls `cond` (a cheap catalog query) until it holds, failing after [`LIMIT`].
async fn wait_for(what: &str, admin: &Client, sql: &str, pid: i32) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let holds: bool = admin.query_one(sql, &[&pid]).await.unwrap().get(0);
        if holds {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn what_a_role_with_usage_can_hold_stalls_no_commit_and_no_prune() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    let (_, intruder) = connect_as(
        &db,
        &client,
        "holder",
        // USAGE on pgcast, and a schema of its own to create tables in, like an app role.
        "GRANT USAGE ON SCHEMA pgcast TO {role}; CREATE SCHEMA AUTHORIZATION {role}",
    )
    .await;
    let mut listener = start_listener(&db, Start::Head).await;
    client.execute(INSERT_ONE, &[&"before"]).await.unwrap();
    listener.take(1, LIMIT).await;

    intruder.batch_execute("BEGIN").await.unwrap();
    // Parse-time locks, kept to the end of the transaction although the statements could
    // never run: ROW SHARE and ROW EXCLUSIVE on every pgcast table.
    for (i, table) in [
        "pgcast.commit_order",
        "pgcast.log_state",
        "pgcast.assignment_changes",
        "pgcast.committed_statements",
    ]
    .iter()
    .enumerate()
    {
        for sql in [
            format!("PREPARE lock_rs_{i} AS SELECT 1 FROM {table} FOR UPDATE"),
            format!("PREPARE lock_rx_{i} AS DELETE FROM {table}"),
        ] {
            assert_eq!(attempt(&intruder, &sql).await, Ok(()), "{sql}");
        }
    }
    // Also a view over them (ACCESS SHARE), the advisory keys pgcast once used, and an ANALYZE
    // that PostgreSQL skips with a warning for a non-owner.
    for sql in [
        "CREATE TEMP VIEW peek AS SELECT * FROM pgcast.log_state",
        "SELECT pg_advisory_xact_lock(7277017001), pg_advisory_xact_lock(7277017002)",
        "ANALYZE pgcast.commit_order",
    ] {
        assert_eq!(attempt(&intruder, sql).await, Ok(()), "{sql}");
    }
    // Everything that would take a stronger lock is refused before it locks anything it keeps.
    for sql in [
        "LOCK TABLE pgcast.commit_order IN ACCESS SHARE MODE",
        "LOCK TABLE pgcast.commit_order IN SHARE UPDATE EXCLUSIVE MODE",
        "LOCK TABLE pgcast.log_state IN EXCLUSIVE MODE",
        "SELECT 1 FROM pgcast.log_state FOR UPDATE",
        "SELECT 1 FROM pgcast.log_state FOR KEY SHARE",
        "COMMENT ON TABLE pgcast.commit_order IS 'mine'",
        "CREATE TABLE heir () INHERITS (pgcast.commit_order)",
        "CREATE TABLE child (p bigint REFERENCES pgcast.committed_statements)",
        "CREATE TABLE child (s boolean REFERENCES pgcast.log_state)",
        "CREATE INDEX ON pgcast.commit_order ((1))",
    ] {
        let outcome = attempt(&intruder, sql).await;
        assert_eq!(outcome, Err(SqlState::INSUFFICIENT_PRIVILEGE), "{sql}");
    }
    // The intruder really holds what a naive EXCLUSIVE commit lock would wait for.
    let pid = backend_pid(&intruder).await;
    let held = held_modes(&client, pid, "pgcast.commit_order").await;
    assert_eq!(held, ["RowExclusiveLock", "RowShareLock"], "{held:?}");

    // Writes commit, and reach the listener, while the intruder sits in its transaction.
    let tx_write = async {
        let mut writer = db.connect().await.unwrap();
        let tx = writer.transaction().await.unwrap();
        tx.execute(INSERT_ONE, &[&"in a transaction"])
            .await
            .unwrap();
        tx.commit().await.unwrap();
    };
    tokio::time::timeout(STALL, tx_write)
        .await
        .expect("a transaction commits while the intruder holds what it can");
    tokio::time::timeout(STALL, client.execute(INSERT_ONE, &[&"autocommit"]))
        .await
        .expect("an autocommit write commits while the intruder holds what it can")
        .unwrap();
    let got = listener.take(2, LIMIT).await;
    assert_eq!(
        got.iter()
            .map(|e| e.assignment.customer_name.clone().unwrap_or_default())
            .collect::<Vec<_>>(),
        ["in a transaction", "autocommit"]
    );
    // Pruning runs and records its run.
    assert_prune_runs(&client, STALL).await;

    intruder.batch_execute("ROLLBACK").await.unwrap();
    listener.stop().await;
}

#[tokio::test]
async fn a_second_pruner_skips_instead_of_waiting() {
    let (db, mut first) = migrated_db(PgCluster::shared().unwrap()).await;
    let second = db.connect().await.unwrap();
    let tx = first.transaction().await.unwrap();
    let pruned: i32 = tx
        .query_one("SELECT pgcast.prune_events('1 hour')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pruned, 0);
    // The first pruner's transaction is still open, holding the prune lock: the second returns
    // at once without pruning and without recording a run.
    let before: Option<f64> = second
        .query_one(
            "SELECT extract(epoch FROM last_pruned_at)::float8 FROM pgcast.log_state",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        before, None,
        "the open transaction's run is not visible yet"
    );
    let skipped: i32 = tokio::time::timeout(
        STALL,
        second.query_one("SELECT pgcast.prune_events('1 hour')", &[]),
    )
    .await
    .expect("a concurrent pruner does not wait")
    .unwrap()
    .get(0);
    assert_eq!(skipped, 0);
    let recorded: Option<f64> = second
        .query_one(
            "SELECT extract(epoch FROM last_pruned_at)::float8 FROM pgcast.log_state",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, None, "the skipping pruner recorded nothing");
    tx.commit().await.unwrap();
    let recorded: Option<f64> = second
        .query_one(
            "SELECT extract(epoch FROM last_pruned_at)::float8 FROM pgcast.log_state",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(recorded.is_some(), "the first pruner's run is recorded");
}

/// `SET CONSTRAINTS ALL IMMEDIATE` fires the deferred trigger at the statement: the lock is
/// then held until that transaction ends, other writers wait for it, and positions still
/// follow commit order.
#[tokio::test]
async fn set_constraints_immediate_holds_the_lock_to_commit_and_keeps_the_order() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    let mut listener = start_listener(&db, Start::Head).await;
    let early = db.connect().await.unwrap();
    early
        .batch_execute("BEGIN; SET CONSTRAINTS ALL IMMEDIATE")
        .await
        .unwrap();
    early.execute(INSERT_ONE, &[&"early"]).await.unwrap();
    let early_pid = backend_pid(&early).await;
    assert!(
        held_modes(&client, early_pid, "pgcast.commit_order")
            .await
            .contains(&"ShareUpdateExclusiveLock".to_owned()),
        "the statement took the commit-order lock"
    );

    let late = db.connect().await.unwrap();
    let late_pid = backend_pid(&late).await;
    let late_write = tokio::spawn(async move {
        late.execute(INSERT_ONE, &[&"late"]).await.unwrap();
    });
    wait_for(
        "the late writer to wait for the commit-order lock",
        &client,
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted
                          AND relation = 'pgcast.commit_order'::regclass)",
        late_pid,
    )
    .await;
    assert!(!late_write.is_finished());
    // A statement after the first publishing is published too, before the late writer's.
    early.execute(INSERT_ONE, &[&"early, again"]).await.unwrap();
    early.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(LIMIT, late_write)
        .await
        .expect("the late writer commits once the lock is free")
        .unwrap();

    let got = listener.take(3, LIMIT).await;
    let names: Vec<_> = got
        .iter()
        .map(|e| e.assignment.customer_name.as_deref())
        .collect();
    assert_eq!(names, [Some("early"), Some("early, again"), Some("late")]);
    assert!(got.windows(2).all(|w| w[0].position < w[1].position));
    listener.stop().await;
}

/// An application whose tables live in their own schema, installed at version 1 and upgraded:
/// the log is kept, the trigger keeps working, and the function refuses a look-alike
/// `session_assignments` in another schema.
#[tokio::test]
async fn an_upgraded_install_in_its_own_schema_serves_only_its_table() {
    let db = PgCluster::shared()
        .unwrap()
        .create_database()
        .await
        .unwrap();
    let mut client = db.connect().await.unwrap();
    client
        .batch_execute("CREATE SCHEMA shop; SET search_path = shop; CREATE SCHEMA pgcast")
        .await
        .unwrap();
    install_version(&mut client, 1).await;
    client.execute(INSERT_ONE, &[&"v1 row"]).await.unwrap();
    let old = log_positions(&client).await;
    assert_eq!(old.len(), 1);

    migrate(&mut client, MigrationScope::RealtimeOnly)
        .await
        .unwrap();
    assert_eq!(
        installed_version(&client).await.unwrap(),
        Some(SCHEMA_VERSION)
    );
    let source: String = client
        .query_one("SELECT source_table::text FROM pgcast.log_state", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        source, "session_assignments",
        "resolved on search_path shop"
    );

    // A table of the same name in another schema, with the function attached by a superuser.
    client
        .batch_execute(
            "CREATE TABLE public.session_assignments (LIKE shop.session_assignments INCLUDING ALL);
             CREATE CONSTRAINT TRIGGER look_alike AFTER INSERT ON public.session_assignments
                 DEFERRABLE INITIALLY DEFERRED
                 FOR EACH ROW EXECUTE FUNCTION pgcast.emit_assignment_event();",
        )
        .await
        .unwrap();
    let err = client
        .execute(
            "INSERT INTO public.session_assignments (session_id, status)
             VALUES (gen_random_uuid(), 'queued')",
            &[],
        )
        .await
        .expect_err("the look-alike's commit is refused");
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.message().contains("only the table it was installed on")),
        "{err}"
    );
    assert_eq!(log_positions(&client).await, old, "nothing was logged");

    let mut listener = start_listener(&db, Start::After(0)).await;
    client.execute(INSERT_ONE, &[&"v2 row"]).await.unwrap();
    let got = listener.take(2, LIMIT).await;
    assert_eq!(got[0].position, old[0]);
    assert_eq!(got[0].assignment.customer_name.as_deref(), Some("v1 row"));
    assert_eq!(got[1].assignment.customer_name.as_deref(), Some("v2 row"));
    listener.stop().await;
}

#[tokio::test]
async fn a_migration_that_cannot_get_its_lock_fails_fast_and_leaves_nothing_half_done() {
    let (db, mut client) = db_at_version(1).await;
    // Version 2 alters pgcast.log_state; a role with USAGE on the schema holds a parse-time
    // ACCESS SHARE lock on it for as long as its transaction stays open.
    let (_, holder) = connect_as(
        &db,
        &client,
        "blocker",
        "GRANT USAGE ON SCHEMA pgcast TO {role}",
    )
    .await;
    holder
        .batch_execute("BEGIN; PREPARE peek AS SELECT 1 FROM pgcast.log_state")
        .await
        .unwrap();

    let err = tokio::time::timeout(LIMIT, migrate(&mut client, MigrationScope::All))
        .await
        .expect("the migration gives up instead of waiting for ever")
        .expect_err("the migration cannot get its lock");
    let ListenerError::Migration(refinery_error) = &err else {
        panic!("not a migration error: {err}");
    };
    let code = match refinery_error.kind() {
        refinery::error::Kind::Connection(_, source) => source
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(|e| e.code().cloned()),
        _ => None,
    };
    assert_eq!(code, Some(SqlState::LOCK_NOT_AVAILABLE), "{err}");
    assert_eq!(
        installed_version(&client).await.unwrap(),
        Some(1),
        "nothing half-done"
    );
    let lock_timeout: String = client
        .query_one("SHOW lock_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        lock_timeout, "0",
        "the session's own lock_timeout is restored"
    );
    client
        .execute(INSERT_ONE, &[&"still writes"])
        .await
        .unwrap();

    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        migrate(&mut client, MigrationScope::All).await.unwrap(),
        SCHEMA_VERSION as usize - 1,
        "every version after 1 applies once the lock is free"
    );
    assert_eq!(
        installed_version(&client).await.unwrap(),
        Some(SCHEMA_VERSION)
    );
    assert_eq!(log_positions(&client).await.len(), 1, "the log is kept");
}

/// The README's least privileges for pgcast's own role, end to end: the first install as a
/// member of the application table's owner with CREATE on the database; then, with both taken
/// away and only SELECT on the application tables left, an upgrade, live events (the trigger
/// function reads `sessions` as that role at every commit) and pruning.
#[tokio::test]
async fn a_least_privileged_pgcast_role_installs_upgrades_and_serves() {
    let db = PgCluster::shared()
        .unwrap()
        .create_database()
        .await
        .unwrap();
    let mut admin = db.connect().await.unwrap();
    admin.batch_execute("CREATE SCHEMA pgcast").await.unwrap();
    embedded::app::migrations::runner()
        .set_migration_table_name("pgcast.app_migrations")
        .run_async(&mut admin)
        .await
        .unwrap();
    // The application owns its tables; pgcast's role is a plain login role. (The schema pgcast
    // made for the app's history table is handed over: normally the DBA creates none.)
    let name = db.name().to_owned();
    let (owner, app_owner) = (format!("pgcast_{name}"), format!("app_{name}"));
    admin
        .batch_execute(&format!(
            "CREATE ROLE {app_owner};
             ALTER TABLE session_assignments OWNER TO {app_owner};
             ALTER TABLE sessions OWNER TO {app_owner};"
        ))
        .await
        .unwrap();
    let (_, mut pgcast) = connect_as(
        &db,
        &admin,
        "pgcast",
        &format!(
            "GRANT CREATE ON DATABASE {name} TO {{role}}; GRANT {app_owner} TO {{role}};
             ALTER SCHEMA pgcast OWNER TO {{role}};
             ALTER TABLE pgcast.app_migrations OWNER TO {{role}};"
        ),
    )
    .await;
    let mut v1 = embedded::realtime::migrations::runner().set_target(refinery::Target::Version(1));
    v1.set_migration_table_name("pgcast.realtime_migrations");
    v1.run_async(&mut pgcast)
        .await
        .expect("install as pgcast's role");

    // After the install: no privilege on the database, not the application's owner any more.
    admin
        .batch_execute(&format!(
            "REVOKE CREATE ON DATABASE {name} FROM {owner};
             REVOKE {app_owner} FROM {owner};
             GRANT SELECT ON session_assignments, sessions TO {owner};"
        ))
        .await
        .unwrap();
    admin.execute(INSERT_ONE, &[&"v1 row"]).await.unwrap();
    assert_eq!(
        migrate(&mut pgcast, MigrationScope::RealtimeOnly)
            .await
            .expect("upgrade as pgcast's role without CREATE on the database"),
        SCHEMA_VERSION as usize - 1
    );
    assert_eq!(
        installed_version(&pgcast).await.unwrap(),
        Some(SCHEMA_VERSION)
    );

    // Serving as pgcast's role: the listener and its pool connect as it.
    let mut config = db.pg_config();
    config.user(&owner);
    let pool =
        deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(config.clone(), NoTls))
            .max_size(2)
            .build()
            .unwrap();
    let listener = pgcast_listener::Listener::new(config, pgcast_listener::EventLog::new(pool));
    let status = listener.status();
    let (tx, mut events) = tokio::sync::mpsc::channel(16);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(listener.run(Start::After(0), tx, shutdown.clone()));
    tokio::time::timeout(LIMIT, status.wait_ready())
        .await
        .expect("listener ready");

    let customer = uuid::Uuid::new_v4();
    let session = insert_session(&admin, customer).await;
    admin
        .execute(
            "INSERT INTO session_assignments (session_id, status, customer_name)
             VALUES ($1, 'queued', 'v2 row')",
            &[&session],
        )
        .await
        .expect("a write commits: the trigger function reads sessions as pgcast's role");
    let mut got = Vec::new();
    while got.len() < 2 {
        let output = tokio::time::timeout(LIMIT, events.recv())
            .await
            .expect("an event")
            .expect("listener running");
        let pgcast_listener::Output::Event(event) = output else {
            panic!("nothing was pruned: {output:?}");
        };
        got.push(event);
    }
    assert_eq!(got[0].assignment.customer_name.as_deref(), Some("v1 row"));
    assert_eq!(got[1].assignment.customer_name.as_deref(), Some("v2 row"));
    assert_eq!(got[1].customer_id, Some(customer));

    let pruned: i32 = pgcast
        .query_one("SELECT pgcast.prune_events('0 seconds')", &[])
        .await
        .expect("pgcast's role prunes")
        .get(0);
    assert_eq!(pruned, 2);
    shutdown.cancel();
    task.await.unwrap();
}

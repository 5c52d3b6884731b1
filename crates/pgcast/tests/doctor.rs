//! `pgcast doctor` on real databases: healthy when migrated, and failing with the problem named
//! when the trigger is disabled or dropped or the installed SQL is older than the binary.

mod common;

use std::time::{Duration, Instant};

use common::{fresh_db, migrated_db, pgcast, run};
use pgcast::{diagnose, pool, DoctorReport, Verdict};
use pgcast_listener::{EventLog, Listener, Start};
use pgcast_testkit::TestDb;
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// Runs the library check and the binary, asserts that they agree, and returns the report.
async fn doctor(db: &TestDb, client: &Client) -> DoctorReport {
    let report = diagnose(client).await.expect("doctor runs");
    let out = run({
        let mut cmd = pgcast(["doctor"]);
        cmd.env("DATABASE_URL", db.url());
        cmd
    })
    .await;
    let expected = if report.is_healthy() { 0 } else { 1 };
    assert_eq!(out.code, Some(expected), "{}\n{}", out.stdout, out.stderr);
    for check in &report.checks {
        assert!(
            out.stdout.contains(check.name),
            "binary report lacks {}: {}",
            check.name,
            out.stdout
        );
    }
    report
}

fn failed<'r>(report: &'r DoctorReport, name: &str) -> &'r str {
    let check = report
        .check(name)
        .unwrap_or_else(|| panic!("no {name} check in {report}"));
    assert_eq!(check.verdict, Verdict::Fail, "{report}");
    let names: Vec<_> = report.problems().map(|c| c.name).collect();
    assert_eq!(names, [name], "only {name} fails: {report}");
    &check.detail
}

#[tokio::test]
async fn healthy_on_a_migrated_database_with_a_listener() {
    let (db, client) = migrated_db().await;
    client
        .execute(
            "INSERT INTO session_assignments (session_id, status) VALUES (gen_random_uuid(), 'queued')",
            &[],
        )
        .await
        .expect("insert");

    let report = doctor(&db, &client).await;
    assert!(report.is_healthy(), "{report}");
    for name in ["schema", "trigger", "notify queue", "event log"] {
        let check = report.check(name).expect("check ran");
        assert_eq!(check.verdict, Verdict::Ok, "{report}");
    }
    let log = &report.check("event log").expect("log check").detail;
    assert!(log.starts_with("1 row,"), "{log}");
    assert!(log.contains("oldest position 1"), "{log}");
    assert_eq!(
        report.check("listeners").map(|c| c.verdict),
        Some(Verdict::Warn),
        "no listener yet: {report}"
    );

    // With a listener connected, doctor counts it.
    let listener = Listener::new(
        db.pg_config(),
        EventLog::new(pool(&db.pg_config(), 2).expect("pool")),
    );
    let status = listener.status();
    let (tx, _rx) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(listener.run(Start::Head, tx, shutdown.clone()));
    wait_until("listener ready", || status.is_ready()).await;
    let report = doctor(&db, &client).await;
    let listeners = report.check("listeners").expect("listener check");
    assert_eq!(listeners.verdict, Verdict::Ok, "{report}");
    assert!(listeners.detail.starts_with("1 connected"), "{report}");
    shutdown.cancel();
    task.await.expect("listener stops");
}

#[tokio::test]
async fn disabled_trigger_is_a_failure() {
    let (db, client) = migrated_db().await;
    client
        .batch_execute(
            "ALTER TABLE session_assignments DISABLE TRIGGER pgcast_emit_assignment_event",
        )
        .await
        .expect("disable");
    let report = doctor(&db, &client).await;
    let detail = failed(&report, "trigger");
    assert!(detail.contains("disabled"), "{detail}");

    client
        .batch_execute(
            "ALTER TABLE session_assignments ENABLE REPLICA TRIGGER pgcast_emit_assignment_event",
        )
        .await
        .expect("replica only");
    let report = doctor(&db, &client).await;
    assert!(failed(&report, "trigger").contains("replica"), "{report}");

    client
        .batch_execute(
            "ALTER TABLE session_assignments ENABLE TRIGGER pgcast_emit_assignment_event",
        )
        .await
        .expect("enable");
    assert!(doctor(&db, &client).await.is_healthy());
}

#[tokio::test]
async fn dropped_trigger_is_a_failure() {
    let (db, client) = migrated_db().await;
    client
        .batch_execute("DROP TRIGGER pgcast_emit_assignment_event ON session_assignments")
        .await
        .expect("drop");
    let report = doctor(&db, &client).await;
    let detail = failed(&report, "trigger");
    assert!(detail.contains("missing"), "{detail}");
}

#[tokio::test]
async fn older_installed_version_is_a_failure() {
    let (db, client) = migrated_db().await;
    client
        .batch_execute(
            "CREATE OR REPLACE FUNCTION pgcast.version() RETURNS integer LANGUAGE sql AS 'SELECT 0'",
        )
        .await
        .expect("downgrade version");
    let report = doctor(&db, &client).await;
    let detail = failed(&report, "schema");
    assert!(detail.contains("version 0 is older"), "{detail}");
}

#[tokio::test]
async fn unmigrated_database_names_what_is_missing() {
    let (db, client) = fresh_db().await;
    let report = doctor(&db, &client).await;
    assert!(!report.is_healthy());
    let schema = &report.check("schema").expect("schema check").detail;
    assert!(
        schema.contains("table pgcast.assignment_events"),
        "{schema}"
    );
    let trigger = &report.check("trigger").expect("trigger check").detail;
    assert!(
        trigger.contains("session_assignments not found"),
        "{trigger}"
    );
}

#[tokio::test]
async fn unreachable_database_fails_without_showing_the_password() {
    let out = run({
        let mut cmd = pgcast(["doctor"]);
        cmd.env("DATABASE_URL", "postgres://app:hunter2@127.0.0.1:1/none");
        cmd
    })
    .await;
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("could not connect"), "{}", out.stderr);
    assert!(!out.stderr.contains("hunter2") && !out.stdout.contains("hunter2"));
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn dangerous_grants_are_a_failure() {
    let (db, client) = migrated_db().await;
    let report = doctor(&db, &client).await;
    assert_eq!(
        report.check("grants").map(|c| c.verdict),
        Some(Verdict::Ok),
        "{report}"
    );
    let role = format!("helper_{}", db.name());
    client
        .batch_execute(&format!(
            "CREATE ROLE {role};
             GRANT EXECUTE ON FUNCTION pgcast.emit_assignment_event() TO PUBLIC;
             GRANT INSERT ON pgcast.assignment_events TO {role};
             GRANT CREATE ON SCHEMA pgcast TO {role};"
        ))
        .await
        .expect("grant");
    let report = doctor(&db, &client).await;
    let detail = failed(&report, "grants");
    for grant in [
        "EXECUTE on function pgcast.emit_assignment_event() to PUBLIC".to_owned(),
        format!("INSERT on table pgcast.assignment_events to {role}"),
        format!("CREATE on schema pgcast to {role}"),
    ] {
        assert!(detail.contains(&grant), "{grant} not in {detail}");
    }
    // A read grant for a monitor role is not dangerous.
    client
        .batch_execute(&format!(
            "REVOKE EXECUTE ON FUNCTION pgcast.emit_assignment_event() FROM PUBLIC;
             REVOKE INSERT ON pgcast.assignment_events FROM {role};
             REVOKE CREATE ON SCHEMA pgcast FROM {role};
             GRANT USAGE ON SCHEMA pgcast TO {role};
             GRANT SELECT ON ALL TABLES IN SCHEMA pgcast TO {role};"
        ))
        .await
        .expect("revoke");
    assert!(doctor(&db, &client).await.is_healthy());
}

#[tokio::test]
async fn a_commit_lock_held_by_an_idle_transaction_is_a_failure() {
    let (db, client) = migrated_db().await;
    let holder = db.connect().await.expect("connect");
    // What an ORM's SET CONSTRAINTS ALL IMMEDIATE does: the deferred trigger fires at the
    // statement and its lock stays until the transaction ends.
    holder
        .batch_execute(
            "BEGIN; SET CONSTRAINTS ALL IMMEDIATE;
             INSERT INTO session_assignments (session_id, status) VALUES (gen_random_uuid(), 'queued');",
        )
        .await
        .expect("hold the lock");
    let started = Instant::now();
    let report = doctor(&db, &client).await;
    assert_eq!(
        report.check("commit lock").map(|c| c.verdict),
        Some(Verdict::Ok),
        "held only briefly so far: {report}"
    );
    // Past the threshold (5 s of holding) it is a failure naming the session.
    let wait = Duration::from_secs(6).saturating_sub(started.elapsed());
    tokio::time::sleep(wait).await;
    let report = doctor(&db, &client).await;
    let detail = failed(&report, "commit lock");
    assert!(detail.contains("idle in transaction"), "{detail}");
    assert!(detail.contains("pg_terminate_backend("), "{detail}");
    holder.batch_execute("COMMIT").await.expect("commit");
    let report = doctor(&db, &client).await;
    assert_eq!(
        report
            .check("commit lock")
            .map(|c| (c.verdict, c.detail.as_str())),
        Some((Verdict::Ok, "not held")),
        "{report}"
    );
}

#[tokio::test]
async fn pruning_that_stopped_is_a_failure() {
    let (db, client) = migrated_db().await;
    let report = doctor(&db, &client).await;
    let pruning = report.check("pruning").expect("pruning check");
    assert_eq!(pruning.verdict, Verdict::Warn, "never ran yet: {report}");
    client
        .query_one("SELECT pgcast.prune_events('1 day')", &[])
        .await
        .expect("prune");
    let report = doctor(&db, &client).await;
    assert_eq!(
        report.check("pruning").map(|c| c.verdict),
        Some(Verdict::Ok),
        "{report}"
    );
    client
        .batch_execute("UPDATE pgcast.log_state SET last_pruned_at = now() - interval '3 hours'")
        .await
        .expect("age the last run");
    let report = doctor(&db, &client).await;
    let detail = failed(&report, "pruning");
    assert!(detail.contains("last ran 3h"), "{detail}");
}

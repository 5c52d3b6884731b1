//! `pgcast doctor` on real databases: healthy when migrated, and failing with the problem named
//! when the trigger is disabled or dropped, the installed SQL is older than the binary, a
//! dangerous privilege is granted, the commit-order lock is held too long or pruning stopped.

mod common;

use std::time::{Duration, Instant};

use common::{fresh_db, migrated_db, pgcast, run};
use pgcast::{diagnose, pool, DoctorReport, Verdict};
use pgcast_listener::{migrate, MigrationScope};
use pgcast_listener::{EventLog, Listener, Start};
use pgcast_testkit::legacy::{CREATE_VERSION_2_ROW_TRIGGER, KEEP_VERSION_2_ROW_TRIGGER};
use pgcast_testkit::{PgCluster, TestDb};
use tokio::sync::mpsc;
use tokio_postgres::{Client, NoTls};
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
        EventLog::new(pool(&db.pg_config().into(), 2).expect("pool")),
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

/// A listener whose position (its `application_name`, `pgcast-listener:<position>`) stays
/// behind events committed more than 30 s ago is stalled: a failure that names it. Here a
/// session stands in for a listener stuck at the first event, and the next one is backdated.
#[tokio::test]
async fn a_listener_behind_the_log_is_a_failure() {
    let (db, client) = migrated_db().await;
    for _ in 0..3 {
        client
            .execute(
                "INSERT INTO session_assignments (session_id, status) VALUES (gen_random_uuid(), 'queued')",
                &[],
            )
            .await
            .expect("insert");
    }
    let first: i64 = client
        .query_one("SELECT min(position) FROM pgcast.assignment_events", &[])
        .await
        .expect("first position")
        .get(0);
    // Any role may name its session so; one that may not read the log is no listener, and
    // makes the check neither fail nor pass.
    let (_, spoof) = connect_as(&db, &client, "spoof", "").await;
    spoof
        .batch_execute("SET application_name = 'pgcast-listener:0'")
        .await
        .expect("name the session");
    let report = doctor(&db, &client).await;
    let listeners = report.check("listeners").expect("listener check");
    assert_eq!(listeners.verdict, Verdict::Warn, "{report}");
    assert!(
        listeners.detail.starts_with("no pgcast listener"),
        "{report}"
    );
    let mut config = db.pg_config();
    config.application_name(format!("pgcast-listener:{first}"));
    let (stuck, connection) = config.connect(NoTls).await.expect("connect");
    tokio::spawn(connection);
    // Two events behind, both just committed: healthy.
    let report = doctor(&db, &client).await;
    let listeners = report.check("listeners").expect("listener check");
    assert_eq!(listeners.verdict, Verdict::Ok, "{report}");
    assert!(listeners.detail.contains("2 event(s) to read"), "{report}");
    client
        .execute(
            "UPDATE pgcast.committed_statements SET committed_at = now() - interval '1 minute'",
            &[],
        )
        .await
        .expect("backdate");
    let detail = failed(&doctor(&db, &client).await, "listeners").to_owned();
    let pid = backend_pid(&stuck).await;
    assert!(
        detail.contains(&format!(
            "pid {pid} at position {first} is 2 event(s) behind"
        )),
        "{detail}"
    );
    // Caught up (its position is the head): healthy again, however old the events.
    stuck
        .batch_execute(&format!(
            "SET application_name = 'pgcast-listener:{}'",
            first + 2
        ))
        .await
        .expect("move on");
    let report = doctor(&db, &client).await;
    let listeners = report.check("listeners").expect("listener check");
    assert_eq!(listeners.verdict, Verdict::Ok, "{report}");
    assert!(listeners.detail.contains("caught up"), "{report}");
}

#[tokio::test]
async fn disabled_trigger_is_a_failure() {
    let (db, client) = migrated_db().await;
    // Each of the statement triggers that capture changes, and the deferred trigger that
    // publishes them at commit.
    for (table, trigger) in [
        ("session_assignments", "pgcast_capture_insert"),
        ("session_assignments", "pgcast_capture_update"),
        ("session_assignments", "pgcast_capture_delete"),
        ("pgcast.assignment_changes", "pgcast_publish_at_commit"),
    ] {
        client
            .batch_execute(&format!("ALTER TABLE {table} DISABLE TRIGGER {trigger}"))
            .await
            .expect("disable");
        let report = doctor(&db, &client).await;
        let detail = failed(&report, "trigger");
        assert!(detail.contains("disabled"), "{detail}");
        assert!(detail.contains(trigger), "{detail}");

        client
            .batch_execute(&format!(
                "ALTER TABLE {table} ENABLE REPLICA TRIGGER {trigger}"
            ))
            .await
            .expect("replica only");
        let report = doctor(&db, &client).await;
        assert!(failed(&report, "trigger").contains("replica"), "{report}");

        client
            .batch_execute(&format!("ALTER TABLE {table} ENABLE TRIGGER {trigger}"))
            .await
            .expect("enable");
        assert!(doctor(&db, &client).await.is_healthy());
    }
}

/// Captured rows whose statement has no positions: changes that were captured and never
/// published.
async fn unpublished(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pgcast.assignment_changes a WHERE NOT EXISTS \
             (SELECT 1 FROM pgcast.committed_statements c WHERE c.statement = a.statement)",
            &[],
        )
        .await
        .expect("count unpublished")
        .get(0)
}

#[tokio::test]
async fn capture_that_fires_in_replica_mode_without_its_publisher_is_a_failure() {
    let (db, client) = migrated_db().await;
    let insert_as_replica = "SET session_replication_role = replica; \
        INSERT INTO session_assignments (session_id, status) VALUES (gen_random_uuid(), 'queued'); \
        RESET session_replication_role";
    // As a logical replication subscriber would want it: the capture triggers fire for the
    // changes its apply writes in replica mode.
    for trigger in ["insert", "update", "delete"] {
        client
            .batch_execute(&format!(
                "ALTER TABLE session_assignments ENABLE ALWAYS TRIGGER pgcast_capture_{trigger}"
            ))
            .await
            .expect("enable always");
    }
    // What the doctor warns of: the publishing trigger stays silent in that mode.
    client
        .batch_execute(insert_as_replica)
        .await
        .expect("write");
    assert_eq!(unpublished(&client).await, 1, "captured, never published");
    let report = doctor(&db, &client).await;
    let problems: Vec<_> = report.problems().map(|c| c.name).collect();
    assert_eq!(problems, ["trigger", "unpublished"], "{report}");
    let detail = &report.check("trigger").expect("trigger check").detail;
    assert!(detail.contains("pgcast_capture_insert"), "{detail}");
    assert!(
        detail.contains("ENABLE ALWAYS TRIGGER pgcast_publish_at_commit"),
        "{detail}"
    );

    // Its advice, followed: what is captured in replica mode is published too. The change
    // captured before stays unpublished, and doctor counts it and says how to remove it.
    client
        .batch_execute(
            "ALTER TABLE pgcast.assignment_changes ENABLE ALWAYS TRIGGER pgcast_publish_at_commit",
        )
        .await
        .expect("enable always");
    let report = doctor(&db, &client).await;
    let detail = failed(&report, "unpublished");
    assert!(detail.starts_with("1 captured change "), "{detail}");
    // Every change is published now; the start trigger, still ordinary, would leave statements
    // run inside triggers in replica mode unordered: a warning with its own advice.
    let check = report.check("trigger").expect("trigger check");
    assert_eq!(check.verdict, Verdict::Warn, "{report}");
    assert!(
        check
            .detail
            .contains("ENABLE ALWAYS TRIGGER pgcast_statement_start"),
        "{report}"
    );
    let remedy = detail
        .split_once("DELETE FROM")
        .map(|(_, rest)| format!("DELETE FROM{rest}"))
        .expect("the detail names the statement that removes them");
    assert_eq!(
        client.execute(remedy.as_str(), &[]).await.expect("remedy"),
        1
    );
    assert!(doctor(&db, &client).await.is_healthy());
    client
        .batch_execute(insert_as_replica)
        .await
        .expect("write");
    assert_eq!(
        unpublished(&client).await,
        0,
        "the new change was published"
    );
    assert_eq!(
        doctor(&db, &client)
            .await
            .check("unpublished")
            .map(|c| c.verdict),
        Some(Verdict::Ok)
    );
    client
        .batch_execute(
            "ALTER TABLE session_assignments ENABLE ALWAYS TRIGGER pgcast_statement_start;
             ALTER TABLE session_assignments ENABLE ALWAYS TRIGGER pgcast_capture_truncate;",
        )
        .await
        .expect("enable always");
    let report = doctor(&db, &client).await;
    assert_eq!(
        report.check("trigger").map(|c| c.verdict),
        Some(Verdict::Ok),
        "{report}"
    );
}

#[tokio::test]
async fn dropped_trigger_is_a_failure() {
    let (db, client) = migrated_db().await;
    client
        .batch_execute("DROP TRIGGER pgcast_capture_update ON session_assignments")
        .await
        .expect("drop");
    let report = doctor(&db, &client).await;
    let detail = failed(&report, "trigger");
    assert!(detail.contains("missing"), "{detail}");
    assert!(detail.contains("pgcast_capture_update"), "{detail}");
}

/// Without the start trigger every change is still logged, and a statement run inside a
/// trigger may come before the one it ran in: a warning that says so and how to mend it.
#[tokio::test]
async fn start_trigger_missing_or_disabled_is_a_warning() {
    let (db, client) = migrated_db().await;
    client
        .batch_execute("ALTER TABLE session_assignments DISABLE TRIGGER pgcast_statement_start")
        .await
        .expect("disable");
    let report = doctor(&db, &client).await;
    let check = report.check("trigger").expect("trigger check");
    assert_eq!(check.verdict, Verdict::Warn, "{report}");
    assert!(
        check
            .detail
            .contains("ENABLE TRIGGER pgcast_statement_start"),
        "{report}"
    );
    assert!(report.is_healthy(), "{report}");

    client
        .batch_execute("DROP TRIGGER pgcast_statement_start ON session_assignments")
        .await
        .expect("drop");
    let report = doctor(&db, &client).await;
    let check = report.check("trigger").expect("trigger check");
    assert_eq!(check.verdict, Verdict::Warn, "{report}");
    assert!(
        check.detail.contains("missing") && check.detail.contains("pgcast migrate"),
        "{report}"
    );
    // A capture trigger's problem is still a failure, and says so first.
    client
        .batch_execute("ALTER TABLE session_assignments DISABLE TRIGGER pgcast_capture_insert")
        .await
        .expect("disable capture");
    assert!(failed(&doctor(&db, &client).await, "trigger").contains("pgcast_capture_insert"));
    client
        .batch_execute(
            "ALTER TABLE session_assignments ENABLE TRIGGER pgcast_capture_insert;
             SELECT pgcast.install_capture();",
        )
        .await
        .expect("`pgcast migrate` puts it back");
    let report = doctor(&db, &client).await;
    let check = report.check("trigger").expect("trigger check");
    assert_eq!(check.verdict, Verdict::Ok, "{report}");
    assert!(check.detail.contains("pgcast_statement_start"), "{report}");
}

/// Without the TRUNCATE trigger every other change is still logged: a warning that says what
/// is not, and how to mend it.
#[tokio::test]
async fn truncate_trigger_missing_or_disabled_is_a_warning() {
    let (db, client) = migrated_db().await;
    client
        .batch_execute("ALTER TABLE session_assignments DISABLE TRIGGER pgcast_capture_truncate")
        .await
        .expect("disable");
    let report = doctor(&db, &client).await;
    let check = report.check("trigger").expect("trigger check");
    assert_eq!(check.verdict, Verdict::Warn, "{report}");
    assert!(
        check.detail.contains("TRUNCATE")
            && check
                .detail
                .contains("ENABLE TRIGGER pgcast_capture_truncate"),
        "{report}"
    );
    assert!(report.is_healthy(), "{report}");
    // Firing in replica mode while the publishing trigger does not: what it captures there
    // would never be published, a failure.
    client
        .batch_execute(
            "ALTER TABLE session_assignments ENABLE ALWAYS TRIGGER pgcast_capture_truncate",
        )
        .await
        .expect("enable always");
    let detail = failed(&doctor(&db, &client).await, "trigger").to_owned();
    assert!(
        detail.contains("pgcast_capture_truncate")
            && detail.contains("ENABLE ALWAYS TRIGGER pgcast_publish_at_commit"),
        "{detail}"
    );
    client
        .batch_execute(
            "DROP TRIGGER pgcast_capture_truncate ON session_assignments;
             SELECT pgcast.install_capture();",
        )
        .await
        .expect("`pgcast migrate` puts it back");
    let check = doctor(&db, &client).await;
    let check = check.check("trigger").expect("trigger check");
    assert_eq!(check.verdict, Verdict::Ok);
    assert!(
        check.detail.contains("pgcast_capture_truncate"),
        "{}",
        check.detail
    );
}

/// An install upgraded by a role that did not own the table keeps version 2's row trigger:
/// events flow (a warning says how to finish the upgrade); disabled, it is a failure; next to
/// the statement triggers, every change would be logged twice.
#[tokio::test]
async fn version_2_row_trigger_left_by_an_upgrade_is_a_warning() {
    let (db, client) = migrated_db().await;
    client
        .batch_execute(KEEP_VERSION_2_ROW_TRIGGER)
        .await
        .expect("version 2's trigger");
    let report = doctor(&db, &client).await;
    let check = report.check("trigger").expect("trigger check");
    assert_eq!(check.verdict, Verdict::Warn, "{report}");
    assert!(check.detail.contains("pgcast migrate"), "{report}");
    assert!(report.is_healthy(), "{report}");

    client
        .batch_execute(
            "ALTER TABLE session_assignments DISABLE TRIGGER pgcast_emit_assignment_event",
        )
        .await
        .expect("disable");
    assert!(
        failed(&doctor(&db, &client).await, "trigger").contains("disabled"),
        "disabled"
    );
    // The row trigger's rows are published at commit by the publishing trigger: in replica
    // mode too only if both fire there, and never without the publisher.
    client
        .batch_execute(
            "ALTER TABLE session_assignments ENABLE ALWAYS TRIGGER pgcast_emit_assignment_event",
        )
        .await
        .expect("enable always");
    let detail = failed(&doctor(&db, &client).await, "trigger").to_owned();
    assert!(detail.contains("pgcast_emit_assignment_event"), "{detail}");
    assert!(
        detail.contains("ENABLE ALWAYS TRIGGER pgcast_publish_at_commit"),
        "{detail}"
    );
    client
        .batch_execute(
            "ALTER TABLE pgcast.assignment_changes DISABLE TRIGGER pgcast_publish_at_commit",
        )
        .await
        .expect("disable the publisher");
    let detail = failed(&doctor(&db, &client).await, "trigger").to_owned();
    assert!(
        detail.contains("pgcast_publish_at_commit") && detail.contains("disabled"),
        "{detail}"
    );
    client
        .batch_execute(
            "ALTER TABLE pgcast.assignment_changes ENABLE ALWAYS TRIGGER pgcast_publish_at_commit",
        )
        .await
        .expect("both always");
    let check = doctor(&db, &client).await;
    let check = check.check("trigger").expect("trigger check");
    assert_eq!(check.verdict, Verdict::Warn, "both fire in replica mode");

    // `pgcast migrate` as the table's owner finishes the swap.
    client
        .batch_execute("SELECT pgcast.install_capture()")
        .await
        .expect("install the statement triggers");
    assert!(doctor(&db, &client).await.is_healthy());
    client
        .batch_execute(CREATE_VERSION_2_ROW_TRIGGER)
        .await
        .expect("both");
    assert!(
        failed(&doctor(&db, &client).await, "trigger").contains("twice"),
        "both"
    );
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
        schema.contains("table pgcast.assignment_changes"),
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

/// The privileges the README gives a read-only DBA / monitor role that runs `doctor`: enough
/// for every check, and no event content (the log's positions and commit times, in
/// `pgcast.committed_statements`, not its rows).
const MONITOR_GRANTS: &str = "GRANT pg_monitor TO {role}; GRANT USAGE ON SCHEMA pgcast TO {role};
     GRANT SELECT ON pgcast.committed_statements, pgcast.log_state TO {role};
     GRANT SELECT (statement) ON pgcast.assignment_changes TO {role};";

/// Creates login role `<name>_<db>` with `grants` (`{role}` stands for its name) and connects
/// as it. Roles belong to the cluster, hence the database name in theirs.
async fn connect_as(db: &TestDb, admin: &Client, name: &str, grants: &str) -> (String, Client) {
    let role = format!("{name}_{}", db.name());
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; {}",
            grants.replace("{role}", &role)
        ))
        .await
        .expect("create role");
    let mut config = db.pg_config();
    config.user(&role);
    let (client, connection) = config.connect(NoTls).await.expect("connect as the role");
    tokio::spawn(connection);
    (role, client)
}

async fn backend_pid(client: &Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0)
}

/// Polls the library check until `name` fails, within `limit`.
async fn until_failed(client: &Client, name: &str, limit: Duration) -> DoctorReport {
    let deadline = Instant::now() + limit;
    loop {
        let report = diagnose(client).await.expect("doctor runs");
        if report.check(name).map(|c| c.verdict) == Some(Verdict::Fail) {
            return report;
        }
        assert!(Instant::now() < deadline, "{name} never failed: {report}");
        tokio::time::sleep(Duration::from_millis(200)).await;
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
             GRANT SELECT ON pgcast.assignment_events TO PUBLIC;
             GRANT INSERT ON pgcast.assignment_changes TO {role};
             GRANT REFERENCES ON pgcast.log_state TO {role};
             GRANT UPDATE ON SEQUENCE pgcast.event_position TO {role};
             GRANT CREATE ON SCHEMA pgcast TO {role};
             GRANT UPDATE (first_position) ON pgcast.committed_statements TO {role};
             GRANT SELECT (event) ON pgcast.assignment_changes TO PUBLIC;"
        ))
        .await
        .expect("grant");
    let report = doctor(&db, &client).await;
    let detail = failed(&report, "grants");
    for grant in [
        "EXECUTE on function pgcast.emit_assignment_event() to PUBLIC".to_owned(),
        "SELECT on view pgcast.assignment_events to PUBLIC".to_owned(),
        format!("INSERT on table pgcast.assignment_changes to {role}"),
        format!("REFERENCES on table pgcast.log_state to {role}"),
        format!("UPDATE on sequence pgcast.event_position to {role}"),
        format!("CREATE on schema pgcast to {role}"),
        // A column is enough: to reorder the log, or to read every event.
        format!("UPDATE on table pgcast.committed_statements to {role}"),
        "SELECT on table pgcast.assignment_changes to PUBLIC".to_owned(),
    ] {
        assert!(detail.contains(&grant), "{grant} not in {detail}");
    }
    // PUBLIC's EXECUTE is named once, not again for every role (which all inherit it).
    assert_eq!(
        detail.matches("emit_assignment_event").count(),
        1,
        "{detail}"
    );

    // Read grants for a monitor role are not dangerous, and with them the role runs doctor.
    client
        .batch_execute(&format!(
            "REVOKE EXECUTE ON FUNCTION pgcast.emit_assignment_event() FROM PUBLIC;
             REVOKE SELECT ON pgcast.assignment_events, pgcast.assignment_changes FROM PUBLIC;
             REVOKE ALL ON pgcast.assignment_changes, pgcast.log_state,
                 pgcast.committed_statements FROM {role};
             REVOKE ALL ON SEQUENCE pgcast.event_position FROM {role};
             REVOKE CREATE ON SCHEMA pgcast FROM {role};"
        ))
        .await
        .expect("revoke");
    let (monitor_role, monitor) = connect_as(&db, &client, "monitor", MONITOR_GRANTS).await;
    let report = doctor(&db, &monitor).await;
    assert!(report.is_healthy(), "{report}");
    assert!(
        monitor
            .query("SELECT payload FROM pgcast.assignment_events", &[])
            .await
            .is_err(),
        "the monitor role cannot read event content"
    );
    assert!(
        monitor
            .query("SELECT event FROM pgcast.assignment_changes", &[])
            .await
            .is_err(),
        "the monitor role counts captured changes and cannot read them"
    );
    for name in ["grants", "unpublished"] {
        assert_eq!(
            report.check(name).map(|c| c.verdict),
            Some(Verdict::Ok),
            "{report}"
        );
    }
    // A monitor role granted as before the count existed: doctor says what it did not count.
    client
        .batch_execute(&format!(
            "REVOKE SELECT (statement) ON pgcast.assignment_changes FROM {monitor_role}"
        ))
        .await
        .expect("revoke the column");
    let report = doctor(&db, &monitor).await;
    assert!(report.is_healthy(), "{report}");
    let unpublished = report.check("unpublished").expect("unpublished check");
    assert_eq!(unpublished.verdict, Verdict::Warn, "{report}");
    assert!(
        unpublished.detail.contains("GRANT SELECT (statement)"),
        "{report}"
    );
}

/// Membership in a predefined role is a grant too: pg_write_all_data may write — and lock —
/// every table. On a private cluster, because role membership is cluster-wide and would show in
/// the other tests' reports.
#[tokio::test]
async fn a_member_of_pg_write_all_data_is_a_dangerous_grant() {
    let cluster = PgCluster::start().expect("private cluster");
    let db = cluster.create_database().await.expect("create database");
    let mut client = db.connect().await.expect("connect");
    migrate(&mut client, MigrationScope::All)
        .await
        .expect("migrate");
    let (writer, _) = connect_as(&db, &client, "writer", "GRANT pg_write_all_data TO {role}").await;
    let report = doctor(&db, &client).await;
    let detail = failed(&report, "grants");
    for grant in [
        format!("INSERT, UPDATE, DELETE on table pgcast.assignment_changes to {writer}"),
        format!("INSERT, UPDATE, DELETE on table pgcast.committed_statements to {writer}"),
        format!("INSERT, UPDATE, DELETE on table pgcast.commit_order to {writer}"),
        format!("UPDATE on sequence pgcast.event_position to {writer}"),
    ] {
        assert!(detail.contains(&grant), "{grant} not in {detail}");
    }
    assert!(!detail.contains("pg_write_all_data"), "{detail}");
}

#[tokio::test]
async fn a_commit_lock_held_by_an_idle_transaction_is_a_failure() {
    let (db, client) = migrated_db().await;
    // A role with USAGE on schema pgcast holds what it can on the lock table: ROW SHARE and ROW
    // EXCLUSIVE through PREPARE. Those delay nobody and must never be reported as the lock.
    let (_, decoy) = connect_as(
        &db,
        &client,
        "decoy",
        "GRANT USAGE ON SCHEMA pgcast TO {role}",
    )
    .await;
    decoy
        .batch_execute(
            "BEGIN;
             PREPARE rs AS SELECT 1 FROM pgcast.commit_order FOR UPDATE;
             PREPARE rx AS DELETE FROM pgcast.commit_order;",
        )
        .await
        .expect("hold parse-time locks");
    let decoy_pid = backend_pid(&decoy).await;
    let (_, monitor) = connect_as(&db, &client, "monitor", MONITOR_GRANTS).await;

    let holder = db.connect().await.expect("connect");
    let holder_pid = backend_pid(&holder).await;
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
    let check = report.check("commit lock").expect("commit lock check");
    assert_eq!(
        check.verdict,
        Verdict::Ok,
        "held only briefly so far: {report}"
    );
    assert!(
        check.detail.contains(&format!("pid {holder_pid} ")),
        "{report}"
    );

    // Past the threshold (5 s of holding) it is a failure naming the session, for the monitor
    // role too (pg_monitor lets it see another role's session state).
    until_failed(&monitor, "commit lock", Duration::from_secs(20)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(4500),
        "failed after {:?}, before the 5 s threshold",
        started.elapsed()
    );
    for report in [
        doctor(&db, &client).await,
        diagnose(&monitor)
            .await
            .expect("doctor runs as the monitor"),
    ] {
        let detail = failed(&report, "commit lock");
        assert!(detail.contains(&format!("pid {holder_pid} ")), "{detail}");
        assert!(detail.contains("idle in transaction"), "{detail}");
        assert!(
            detail.contains(&format!("pg_terminate_backend({holder_pid})")),
            "{detail}"
        );
        assert!(!detail.contains(&decoy_pid.to_string()), "{detail}");
    }
    holder.batch_execute("COMMIT").await.expect("commit");
    let report = doctor(&db, &client).await;
    assert_eq!(
        report
            .check("commit lock")
            .map(|c| (c.verdict, c.detail.as_str())),
        Some((Verdict::Ok, "not held")),
        "the decoy still holds its weak locks, and they are not the commit lock: {report}"
    );
    decoy.batch_execute("ROLLBACK").await.expect("rollback");
}

/// Waits (up to 10 s) until backend `pid` holds the commit-order lock (`granted`) or waits
/// for it.
async fn until_commit_lock(client: &Client, pid: i32, granted: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND granted = $2
                                  AND relation = 'pgcast.commit_order'::regclass)",
                &[&pid, &granted],
            )
            .await
            .expect("pg_locks")
            .get(0);
        if found {
            return;
        }
        let what = if granted { "held" } else { "waited for" };
        assert!(
            Instant::now() < deadline,
            "pid {pid} never {what} the commit lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A session that holds the lock while busy (not idle) is not flagged for its own state, but
/// writers queueing behind it for more than 5 s are.
#[tokio::test]
async fn writers_waiting_for_the_commit_lock_are_a_failure() {
    let (db, client) = migrated_db().await;
    let holder = db.connect().await.expect("connect");
    let holder_pid = backend_pid(&holder).await;
    let busy = tokio::spawn(async move {
        let result = holder
            .batch_execute(
                "BEGIN; SET CONSTRAINTS ALL IMMEDIATE;
                 INSERT INTO session_assignments (session_id, status)
                 VALUES (gen_random_uuid(), 'queued');
                 SELECT pg_sleep(60);",
            )
            .await;
        (holder, result)
    });
    // The holder takes the lock first: a writer that committed before it would never wait.
    until_commit_lock(&client, holder_pid, true).await;
    let writer = db.connect().await.expect("connect");
    let writer_pid = backend_pid(&writer).await;
    let write = tokio::spawn(async move {
        writer
            .execute(
                "INSERT INTO session_assignments (session_id, status)
                 VALUES (gen_random_uuid(), 'queued')",
                &[],
            )
            .await
    });
    // The writer queues behind the busy holder.
    until_commit_lock(&client, writer_pid, false).await;
    let report = until_failed(&client, "commit lock", Duration::from_secs(20)).await;
    let detail = failed(&report, "commit lock");
    assert!(detail.contains(&format!("pid {holder_pid} ")), "{detail}");
    assert!(detail.contains("active"), "{detail}");
    assert!(detail.contains("1 writer(s) waiting"), "{detail}");
    let binary = doctor(&db, &client).await;
    assert!(!binary.is_healthy(), "{binary}");

    // Ending the busy transaction lets the writer commit.
    client
        .execute("SELECT pg_cancel_backend($1)", &[&holder_pid])
        .await
        .expect("cancel");
    let (holder, result) = busy.await.expect("holder task");
    assert!(result.is_err(), "the sleep was cancelled");
    holder.batch_execute("ROLLBACK").await.expect("rollback");
    tokio::time::timeout(Duration::from_secs(10), write)
        .await
        .expect("the writer commits once the lock is free")
        .expect("writer task")
        .expect("insert");
    assert_eq!(
        doctor(&db, &client)
            .await
            .check("commit lock")
            .map(|c| c.detail.clone()),
        Some("not held".to_owned())
    );
}

#[tokio::test]
async fn pruning_that_stopped_while_events_are_overdue_is_a_failure() {
    let (db, client) = migrated_db().await;
    let report = doctor(&db, &client).await;
    let pruning = report.check("pruning").expect("pruning check");
    assert_eq!(pruning.verdict, Verdict::Warn, "never ran yet: {report}");
    assert!(report.is_healthy(), "{report}");

    client
        .query_one("SELECT pgcast.prune_events('1 day')", &[])
        .await
        .expect("prune");
    let report = doctor(&db, &client).await;
    let pruning = report.check("pruning").expect("pruning check");
    assert_eq!(pruning.verdict, Verdict::Ok, "{report}");
    assert!(pruning.detail.contains("with retention 1day"), "{report}");

    // No run for 3 hours, but nothing older than the retention: worth knowing, not broken.
    client
        .batch_execute(
            "INSERT INTO session_assignments (session_id, status) VALUES (gen_random_uuid(), 'queued');
             UPDATE pgcast.log_state SET last_pruned_at = now() - interval '3 hours';",
        )
        .await
        .expect("age the last run");
    let report = doctor(&db, &client).await;
    let pruning = report.check("pruning").expect("pruning check");
    assert_eq!(pruning.verdict, Verdict::Warn, "{report}");
    assert!(pruning.detail.contains("nothing overdue"), "{report}");

    // An event older than the retention that nobody pruned: retention is not enforced.
    client
        .batch_execute(
            "UPDATE pgcast.committed_statements SET committed_at = now() - interval '2 days'",
        )
        .await
        .expect("age the event");
    let report = doctor(&db, &client).await;
    let detail = failed(&report, "pruning");
    assert!(detail.contains("last ran 3h"), "{detail}");
    assert!(detail.contains("oldest event 2days"), "{detail}");

    // A run puts it right.
    let pruned: i32 = client
        .query_one("SELECT pgcast.prune_events('1 day')", &[])
        .await
        .expect("prune")
        .get(0);
    assert_eq!(pruned, 1);
    let report = doctor(&db, &client).await;
    assert_eq!(
        report.check("pruning").map(|c| c.verdict),
        Some(Verdict::Ok),
        "{report}"
    );
}

/// A NOTIFY that fails (here: a role that may not call `pg_notify`; in production a full queue
/// or a standby) fails the listen probe and the report is still printed whole.
#[tokio::test]
async fn a_notify_that_fails_is_a_failed_probe_not_a_lost_report() {
    let (db, client) = migrated_db().await;
    // The README's monitor role, in a database where PUBLIC may not notify.
    let (role, _monitor) = connect_as(&db, &client, "probe", MONITOR_GRANTS).await;
    client
        .batch_execute("REVOKE EXECUTE ON FUNCTION pg_notify(text, text) FROM PUBLIC")
        .await
        .expect("nobody but the superuser may notify");
    let url = db
        .url()
        .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    assert_ne!(
        url,
        db.url(),
        "the test database's URL names the postgres user"
    );
    let out = run({
        let mut cmd = pgcast(["doctor"]);
        cmd.env("DATABASE_URL", &url);
        cmd
    })
    .await;
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let probe = out
        .stdout
        .lines()
        .find(|l| l.contains("listen probe"))
        .unwrap_or_else(|| panic!("no listen probe line: {}\n{}", out.stdout, out.stderr));
    assert!(
        probe.contains("could not send a NOTIFY") && probe.contains("permission denied"),
        "{probe}"
    );
    assert!(out.stdout.contains("notify queue"), "{}", out.stdout);
}

/// A prepared transaction can hold the commit-order lock (one that wrote
/// `session_assignments` while the doorbell was off rings no NOTIFY, so its PREPARE succeeds):
/// every write waits until it is committed or rolled back. Its lock has no session (no pid in
/// `pg_locks`): doctor names the prepared transaction and fails, instead of failing to read the
/// lock's holder.
#[tokio::test]
async fn a_prepared_transaction_holding_the_commit_lock_is_a_failure() {
    let cluster = PgCluster::start_with(
        pgcast_testkit::ClusterOptions::new().setting("max_prepared_transactions", "2"),
    )
    .expect("a cluster that allows prepared transactions");
    let db = cluster.create_database().await.expect("database");
    let mut client = db.connect().await.expect("connect");
    migrate(&mut client, MigrationScope::All)
        .await
        .expect("migrate");
    client
        .batch_execute(
            "BEGIN;
             LOCK TABLE pgcast.commit_order IN SHARE UPDATE EXCLUSIVE MODE;
             PREPARE TRANSACTION 'pgcast-doctor-test';",
        )
        .await
        .expect("prepare a transaction holding the lock");
    let report = doctor(&db, &client).await;
    let check = report.check("commit lock").expect("commit lock check");
    assert_eq!(check.verdict, Verdict::Fail, "{report}");
    assert!(
        check
            .detail
            .contains("prepared transaction 'pgcast-doctor-test'")
            && check
                .detail
                .contains("ROLLBACK PREPARED 'pgcast-doctor-test'"),
        "{report}"
    );
    client
        .batch_execute("ROLLBACK PREPARED 'pgcast-doctor-test'")
        .await
        .expect("rollback prepared");
    let report = doctor(&db, &client).await;
    assert_eq!(
        report
            .check("commit lock")
            .map(|c| (c.verdict, c.detail.as_str())),
        Some((Verdict::Ok, "not held")),
        "{report}"
    );
}

//! `pgcast migrate` through the binary: the full set on a fresh database, and `--realtime-only`
//! onto an application-owned `session_assignments` without touching its rows.

mod common;

use common::{fresh_db, pgcast, run, Run};
use pgcast::diagnose;
use pgcast_testkit::TestDb;

async fn migrate(db: &TestDb, extra: &[&str]) -> Run {
    let mut cmd = pgcast(["migrate"]);
    cmd.args(extra).env("DATABASE_URL", db.url());
    let out = run(cmd).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    out
}

async fn table_exists(client: &tokio_postgres::Client, name: &str) -> bool {
    client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await
        .expect("to_regclass")
        .get(0)
}

#[tokio::test]
async fn migrate_installs_everything_once() {
    let (db, client) = fresh_db().await;
    let out = migrate(&db, &[]).await;
    assert_eq!(out.stdout, "applied 10 migrations; pgcast.version() = 9\n");
    for table in [
        "sessions",
        "session_assignments",
        "pgcast.assignment_events",
    ] {
        assert!(table_exists(&client, table).await, "{table}");
    }
    let report = diagnose(&client).await.expect("doctor");
    assert!(report.is_healthy(), "{report}");

    let again = migrate(&db, &[]).await;
    assert_eq!(again.stdout, "applied 0 migrations; pgcast.version() = 9\n");
}

#[tokio::test]
async fn realtime_only_installs_onto_the_applications_table() {
    let (db, client) = fresh_db().await;
    // The application's own table: extra columns, its own defaults, rows already there.
    client
        .batch_execute(
            "CREATE TABLE session_assignments (
                 id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                 session_id uuid NOT NULL,
                 mechanic_id uuid,
                 workshop_id uuid,
                 status text NOT NULL,
                 urgent boolean NOT NULL DEFAULT false,
                 customer_name text,
                 vehicle_summary text,
                 concern text,
                 created_at timestamptz NOT NULL DEFAULT now(),
                 updated_at timestamptz NOT NULL DEFAULT now(),
                 price_cents integer
             );
             INSERT INTO session_assignments (session_id, status, price_cents)
             SELECT gen_random_uuid(), 'queued', 1000 * g FROM generate_series(1, 3) g;",
        )
        .await
        .expect("application table");
    let before: Vec<String> = rows(&client).await;

    let out = migrate(&db, &["--realtime-only"]).await;
    assert_eq!(out.stdout, "applied 9 migrations; pgcast.version() = 9\n");
    assert!(
        !table_exists(&client, "sessions").await,
        "app tables skipped"
    );
    assert_eq!(rows(&client).await, before, "existing rows untouched");

    // From now on every change is an event.
    client
        .execute(
            "UPDATE session_assignments SET status = 'cancelled' WHERE price_cents = 1000",
            &[],
        )
        .await
        .expect("update");
    let events: i64 = client
        .query_one("SELECT count(*) FROM pgcast.assignment_events", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(events, 1);
    let report = diagnose(&client).await.expect("doctor");
    assert!(report.is_healthy(), "{report}");
}

async fn rows(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT t::text FROM session_assignments t ORDER BY price_cents",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

//! Statements that run inside other statements (version 8). An application's trigger on
//! `session_assignments` may change the table again: its statement ends, and is captured,
//! before the statement it ran in. Each row's events must still follow the order its versions
//! were written, so that a row's last event is the row as it stands; statements of a trigger on
//! another table keep their place; a forged `pgcast.nesting` setting moves nothing of another
//! transaction.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use pgcast_events::{AssignmentEvent, EventKind, Status};
use pgcast_listener::Start;
use pgcast_testkit::PgCluster;
use tokio_postgres::Client;
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(30);

/// The application's own triggers: an assignment offered is at once accepted (an AFTER UPDATE
/// row trigger that updates the same row again), and one inserted with a name starting with
/// `auto` is at once offered (an AFTER INSERT row trigger; the update it runs is accepted in
/// turn, three statements deep).
const AUTO_ACCEPT: &str = "
    CREATE FUNCTION app_accept_offers() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.status = 'offered' THEN
            UPDATE session_assignments SET status = 'accepted' WHERE id = NEW.id;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER app_accept_offers AFTER UPDATE ON session_assignments
        FOR EACH ROW EXECUTE FUNCTION app_accept_offers();
    CREATE FUNCTION app_offer_auto() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.customer_name LIKE 'auto%' THEN
            UPDATE session_assignments SET status = 'offered' WHERE id = NEW.id;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER app_offer_auto AFTER INSERT ON session_assignments
        FOR EACH ROW EXECUTE FUNCTION app_offer_auto();";

/// Each event's kind, name and status, in log order.
fn shape(events: &[Arc<AssignmentEvent>]) -> Vec<(EventKind, String, Status)> {
    events
        .iter()
        .map(|e| {
            let name = e.assignment.customer_name.clone().unwrap_or_default();
            (e.kind, name, e.assignment.status)
        })
        .collect()
}

/// Every row's last event is the row as the table holds it (status and name), and every row of
/// the table (but the listener's marker) has events.
async fn assert_last_events_are_the_rows(client: &Client, events: &[Arc<AssignmentEvent>]) {
    let mut last: HashMap<Uuid, &AssignmentEvent> = HashMap::new();
    for e in events {
        last.insert(e.assignment.id, e);
    }
    let rows = client
        .query(
            "SELECT id, status, customer_name FROM session_assignments
             WHERE customer_name IS DISTINCT FROM $1",
            &[&MARKER],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), last.len(), "every row has events");
    for row in rows {
        let id: Uuid = row.get(0);
        let status: String = row.get(1);
        let name: Option<String> = row.get(2);
        let e = last.get(&id).expect("the row's events");
        assert_ne!(e.kind, EventKind::Deleted, "a row that exists");
        assert_eq!(
            (e.assignment.status.as_str(), &e.assignment.customer_name),
            (status.as_str(), &name),
            "the last event of {name:?} is the row as it stands"
        );
    }
}

#[tokio::test]
async fn a_row_a_trigger_changes_again_ends_in_its_latest_state() {
    let (db, mut client) = migrated_db(PgCluster::shared().unwrap()).await;
    client.batch_execute(AUTO_ACCEPT).await.unwrap();
    let mut listener = start_listener(&db, Start::Head).await;

    // Three statements deep: the insert, its trigger's offer, that update's trigger's accept.
    client.execute(INSERT_ONE, &[&"auto 1"]).await.unwrap();
    let got = listener.take(3, LIMIT).await;
    assert_eq!(
        shape(&got),
        [
            (EventKind::Created, "auto 1".into(), Status::Queued),
            (EventKind::Updated, "auto 1".into(), Status::Offered),
            (EventKind::Updated, "auto 1".into(), Status::Accepted),
        ]
    );
    assert_eq!(got[1].old_status(), Some(Status::Queued));
    assert_eq!(got[2].old_status(), Some(Status::Offered));
    assert_contiguous(&got);
    let mut all = got;

    // A statement of three rows, each accepted by the trigger (a statement of its own per
    // row): the outer statement's three events first, then the three it ran, in that order.
    // In one transaction with a plain insert before and after.
    let tx = client.transaction().await.unwrap();
    tx.execute(INSERT_ONE, &[&"before"]).await.unwrap();
    tx.execute(
        "INSERT INTO session_assignments (session_id, status, customer_name)
         SELECT gen_random_uuid(), 'queued', 'r' || g FROM generate_series(1, 3) g",
        &[],
    )
    .await
    .unwrap();
    tx.execute(
        "UPDATE session_assignments SET status = 'offered' WHERE customer_name LIKE 'r%'",
        &[],
    )
    .await
    .unwrap();
    tx.execute(INSERT_ONE, &[&"after"]).await.unwrap();
    tx.commit().await.unwrap();
    let got = listener.take(11, LIMIT).await;
    listener.assert_quiet().await;
    let statuses: Vec<(String, Status)> = shape(&got).into_iter().map(|(_, n, s)| (n, s)).collect();
    assert_eq!(statuses[0], ("before".into(), Status::Queued));
    assert_eq!(statuses[10], ("after".into(), Status::Queued));
    assert!(statuses[1..4].iter().all(|(_, s)| *s == Status::Queued));
    assert!(
        statuses[4..7].iter().all(|(_, s)| *s == Status::Offered),
        "{statuses:?}"
    );
    assert!(
        statuses[7..10].iter().all(|(_, s)| *s == Status::Accepted),
        "{statuses:?}"
    );
    // Each of the three rows: inserted, offered, accepted, in that order.
    for name in ["r1", "r2", "r3"] {
        let seq: Vec<Status> = statuses
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(
            seq,
            [Status::Queued, Status::Offered, Status::Accepted],
            "{name}"
        );
    }
    assert_contiguous(&got);
    all.extend(got);
    assert_last_events_are_the_rows(&client, &all).await;
    listener.stop().await;
}

#[tokio::test]
async fn statements_of_a_trigger_on_another_table_keep_their_place() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    // A new session gets its first assignment from a trigger on `sessions`: a statement on
    // session_assignments inside a statement that is not one.
    client
        .batch_execute(
            "CREATE FUNCTION app_first_assignment() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO session_assignments (session_id, status, customer_name)
                 VALUES (NEW.id, 'queued', 'first of ' || NEW.kind);
                 RETURN NULL;
             END $$;
             CREATE TRIGGER app_first_assignment AFTER INSERT ON sessions
                 FOR EACH ROW EXECUTE FUNCTION app_first_assignment();",
        )
        .await
        .unwrap();
    // And offers accepted at once: the update below runs a statement of its own inside it,
    // after the statement inside the session's insert, which it must not take for its own.
    client.batch_execute(AUTO_ACCEPT).await.unwrap();
    let mut listener = start_listener(&db, Start::Head).await;

    // One message, one transaction: the session (and its assignment from the trigger), then
    // an update of that assignment (and its accept), then a delete. Each comes after the one
    // before.
    client
        .batch_execute(
            "INSERT INTO sessions (customer_id, kind) VALUES (gen_random_uuid(), 'free');
             UPDATE session_assignments SET status = 'offered' WHERE customer_name = 'first of free';
             INSERT INTO sessions (customer_id, kind) VALUES (gen_random_uuid(), 'paid');
             DELETE FROM session_assignments WHERE customer_name = 'first of free';",
        )
        .await
        .unwrap();
    let got = listener.take(5, LIMIT).await;
    listener.assert_quiet().await;
    assert_eq!(
        shape(&got),
        [
            (EventKind::Created, "first of free".into(), Status::Queued),
            (EventKind::Updated, "first of free".into(), Status::Offered),
            (EventKind::Updated, "first of free".into(), Status::Accepted),
            (EventKind::Created, "first of paid".into(), Status::Queued),
            (EventKind::Deleted, "first of free".into(), Status::Accepted),
        ]
    );
    assert_contiguous(&got);
    assert_last_events_are_the_rows(&client, &got[3..4]).await;
    listener.stop().await;
}

#[tokio::test]
async fn a_nested_statement_rolled_back_leaves_the_rest_in_order() {
    let (db, mut client) = migrated_db(PgCluster::shared().unwrap()).await;
    // The application tries to expire an offer and gives up: the statement inside its trigger
    // is rolled back with the block's savepoint. Then it accepts it for good.
    client
        .batch_execute(
            "CREATE FUNCTION app_try() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.status = 'offered' THEN
                     BEGIN
                         UPDATE session_assignments SET status = 'expired' WHERE id = NEW.id;
                         RAISE EXCEPTION 'changed my mind';
                     EXCEPTION WHEN raise_exception THEN
                         NULL;
                     END;
                     UPDATE session_assignments SET status = 'accepted' WHERE id = NEW.id;
                 END IF;
                 RETURN NULL;
             END $$;
             CREATE TRIGGER app_try AFTER UPDATE ON session_assignments
                 FOR EACH ROW EXECUTE FUNCTION app_try();",
        )
        .await
        .unwrap();
    let mut listener = start_listener(&db, Start::Head).await;
    let tx = client.transaction().await.unwrap();
    tx.execute(INSERT_ONE, &[&"tried"]).await.unwrap();
    tx.execute(
        "UPDATE session_assignments SET status = 'offered' WHERE customer_name = 'tried'",
        &[],
    )
    .await
    .unwrap();
    tx.execute(INSERT_ONE, &[&"next"]).await.unwrap();
    tx.commit().await.unwrap();
    let got = listener.take(4, LIMIT).await;
    listener.assert_quiet().await;
    assert_eq!(
        shape(&got),
        [
            (EventKind::Created, "tried".into(), Status::Queued),
            (EventKind::Updated, "tried".into(), Status::Offered),
            (EventKind::Updated, "tried".into(), Status::Accepted),
            (EventKind::Created, "next".into(), Status::Queued),
        ]
    );
    assert_contiguous(&got);
    assert_last_events_are_the_rows(&client, &got).await;
    listener.stop().await;
}

/// The events of the log, as the view shows them, by position.
async fn view_events(client: &Client) -> Vec<(i64, serde_json::Value)> {
    client
        .query(
            "SELECT position, payload FROM pgcast.assignment_events ORDER BY position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn a_forged_nesting_setting_moves_nothing_of_another_transaction() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    client.batch_execute(AUTO_ACCEPT).await.unwrap();
    // Another transaction's statements, one of them run inside a trigger (its first row names
    // that transaction), all committed.
    client.execute(INSERT_ONE, &[&"auto victim"]).await.unwrap();
    client
        .execute(INSERT_ONE, &[&"plain victim"])
        .await
        .unwrap();
    let statements: Vec<i64> = client
        .query(
            "SELECT DISTINCT statement FROM pgcast.assignment_changes ORDER BY statement",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(statements.len(), 4, "three statements deep, and one");
    let before = view_events(&client).await;

    // A writer that may only write the table sets the settings while its own statement runs
    // (after the start trigger): a start mark of 0, which takes in every statement before its
    // own, and the flag that makes its capture look; then garbage for a mark, which orders
    // nothing and fails nothing.
    let (_, writer) = connect_as(
        &db,
        &client,
        "writer",
        "GRANT USAGE ON SCHEMA public TO {role};
         GRANT SELECT, INSERT, UPDATE ON session_assignments TO {role};",
    )
    .await;
    writer.execute(INSERT_ONE, &[&"mine"]).await.unwrap();
    let forge = "UPDATE session_assignments
                 SET concern = set_config('pgcast.start_0', $1, true)
                               || set_config('pgcast.nesting', 'set', true)
                 WHERE customer_name = 'mine'";
    writer.execute(forge, &[&"0"]).await.unwrap();
    // The same inside a transaction whose update runs a statement inside a trigger (the
    // writer's own events are reordered, the other transaction's are not), with garbage for
    // the mark of the statement inside (which its own start trigger sets again).
    writer
        .batch_execute(
            "BEGIN;
             UPDATE session_assignments
             SET status = 'offered',
                 concern = set_config('pgcast.start_0', '0', true)
                           || set_config('pgcast.start_1', '-1', true)
                           || set_config('pgcast.nesting', 'set', true)
             WHERE customer_name = 'mine';
             COMMIT;",
        )
        .await
        .unwrap();
    writer.execute(forge, &[&"0; garbage"]).await.unwrap();

    let after = view_events(&client).await;
    assert_eq!(
        after[..before.len()],
        before[..],
        "the other transaction's events"
    );
    let mine: Vec<(String, Option<String>)> = after[before.len()..]
        .iter()
        .map(|(_, p)| {
            (
                p["row"]["status"].as_str().unwrap_or_default().to_owned(),
                p["row"]["concern"].as_str().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(
        mine,
        [
            ("queued".to_owned(), None),
            ("queued".to_owned(), Some("0set".to_owned())),
            ("offered".to_owned(), Some("0-1set".to_owned())),
            ("accepted".to_owned(), Some("0-1set".to_owned())),
            ("accepted".to_owned(), Some("0; garbageset".to_owned())),
        ],
        "the writer's own events, each once, in order"
    );
}

#[tokio::test]
async fn an_upsert_that_inserts_and_updates_is_logged_before_what_its_triggers_ran() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    client.batch_execute(AUTO_ACCEPT).await.unwrap();
    let existing: Uuid = client
        .query_one(INSERT_ONE, &[&"existing"])
        .await
        .unwrap()
        .get(0);
    let mut listener = start_listener(&db, Start::Head).await;
    // One statement, captured twice (its updates, then its inserts): an existing row updated,
    // a new one inserted, whose trigger offers it, which the next trigger accepts.
    client
        .execute(
            "INSERT INTO session_assignments (id, session_id, status, customer_name)
             VALUES ($1, gen_random_uuid(), 'queued', 'existing again'),
                    (gen_random_uuid(), gen_random_uuid(), 'queued', 'auto new')
             ON CONFLICT (id) DO UPDATE SET customer_name = EXCLUDED.customer_name",
            &[&existing],
        )
        .await
        .unwrap();
    let got = listener.take(4, LIMIT).await;
    listener.assert_quiet().await;
    let mut shapes = shape(&got);
    // The upsert's own two events (in either order) come first.
    shapes[..2].sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        shapes,
        [
            (EventKind::Created, "auto new".into(), Status::Queued),
            (EventKind::Updated, "existing again".into(), Status::Queued),
            (EventKind::Updated, "auto new".into(), Status::Offered),
            (EventKind::Updated, "auto new".into(), Status::Accepted),
        ]
    );
    assert_contiguous(&got);
    listener.stop().await;
}

#[tokio::test]
async fn thousands_of_statements_inside_one_are_ordered_in_one_pass() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    client.batch_execute(AUTO_ACCEPT).await.unwrap();
    client.execute(INSERT_MANY, &[&2_000_i32]).await.unwrap();
    let mut listener = start_listener(&db, Start::Head).await;
    // One statement of 2,000 rows, and 2,000 statements run by its row trigger.
    client
        .execute(
            "UPDATE session_assignments SET status = 'offered' WHERE customer_name LIKE 'c%'",
            &[],
        )
        .await
        .unwrap();
    let got = listener.take(4_000, LIMIT).await;
    listener.assert_quiet().await;
    assert!(got[..2_000]
        .iter()
        .all(|e| e.assignment.status == Status::Offered));
    assert!(got[2_000..]
        .iter()
        .all(|e| e.assignment.status == Status::Accepted));
    assert_contiguous(&got);
    assert_last_events_are_the_rows(&client, &got).await;
    listener.stop().await;
}

#[tokio::test]
async fn a_version_7_install_upgrades_to_nested_statements_in_order() {
    let (db, mut client) = db_at_version(7).await;
    client.batch_execute(AUTO_ACCEPT).await.unwrap();
    client.execute(INSERT_ONE, &[&"auto at 7"]).await.unwrap();
    // Version 7 logged the statements as they ended: the trigger's accept first, then the
    // offer it ran inside, then the insert. The row's last event is not the row.
    let at_7: Vec<(String, String)> = view_events(&client)
        .await
        .iter()
        .map(|(_, p)| {
            (
                p["op"].as_str().unwrap_or_default().to_owned(),
                p["row"]["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        at_7,
        [
            ("update".to_owned(), "accepted".to_owned()),
            ("update".to_owned(), "offered".to_owned()),
            ("insert".to_owned(), "queued".to_owned()),
        ]
    );

    let kept = view_events(&client).await;
    upgrade_to_latest(&mut client).await;
    assert_eq!(view_events(&client).await, kept, "the log is kept");
    let mut listener = start_listener(&db, Start::Head).await;
    client.execute(INSERT_ONE, &[&"auto at 8"]).await.unwrap();
    let got = listener.take(3, LIMIT).await;
    listener.assert_quiet().await;
    assert_eq!(
        shape(&got),
        [
            (EventKind::Created, "auto at 8".into(), Status::Queued),
            (EventKind::Updated, "auto at 8".into(), Status::Offered),
            (EventKind::Updated, "auto at 8".into(), Status::Accepted),
        ]
    );
    assert!(got[0].position > kept.last().map_or(0, |(p, _)| *p));
    listener.stop().await;
}

#[tokio::test]
async fn without_the_start_trigger_statements_are_logged_as_captured() {
    let (db, client) = migrated_db(PgCluster::shared().unwrap()).await;
    client.batch_execute(AUTO_ACCEPT).await.unwrap();
    // As an upgrade by a role that is no longer a member of the table's owner leaves it.
    client
        .batch_execute("DROP TRIGGER pgcast_statement_start ON session_assignments")
        .await
        .unwrap();
    let mut listener = start_listener(&db, Start::Head).await;
    // Version 7's order: the accept inside the update first; and the transaction's statements
    // after it keep their place (nothing of it is moved in front of earlier statements).
    client
        .batch_execute(
            "BEGIN;
             INSERT INTO session_assignments (session_id, status, customer_name)
                 VALUES (gen_random_uuid(), 'queued', 'kept');
             UPDATE session_assignments SET status = 'offered' WHERE customer_name = 'kept';
             UPDATE session_assignments SET concern = 'later' WHERE customer_name = 'kept';
             COMMIT;",
        )
        .await
        .unwrap();
    let got = listener.take(4, LIMIT).await;
    listener.assert_quiet().await;
    let concern: Vec<Option<String>> = got.iter().map(|e| e.assignment.concern.clone()).collect();
    assert_eq!(
        shape(&got),
        [
            (EventKind::Created, "kept".into(), Status::Queued),
            (EventKind::Updated, "kept".into(), Status::Accepted),
            (EventKind::Updated, "kept".into(), Status::Offered),
            (EventKind::Updated, "kept".into(), Status::Accepted),
        ]
    );
    assert_eq!(
        concern[3].as_deref(),
        Some("later"),
        "the last statement last"
    );
    let flagged: i64 = client
        .query_one(
            "SELECT count(*) FROM pgcast.assignment_changes WHERE nested_xact IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(flagged, 0, "nothing flagged without marks");
    listener.stop().await;
}

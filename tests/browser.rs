//! The pages and the browser client in a real browser: headless Chromium (Debian's `chromium`
//! and `chromedriver`) against pgcast running in this process on a throwaway database.
//!
//! - The mechanic queue shows exactly the assignments the mechanic may take, live; after pgcast
//!   stops and starts again on the same address, the page reconnects by itself and shows exactly
//!   what changed meanwhile, once.
//! - The customer page follows its session: waiting → mechanic assigned → ended, without reload.
//!
//! Both save screenshots (desktop and phone) under `target/screenshots/`.

#[path = "support/pgcast_server.rs"]
mod pgcast_server;
#[path = "support/webdriver.rs"]
mod webdriver;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use pgcast::ServeOptions;
use pgcast_events::{Principal, Role};
use pgcast_listener::{migrate, MigrationScope};
use pgcast_testkit::{PgCluster, TestDb};
use serde_json::Value;
use tokio_postgres::Client;
use uuid::Uuid;

use pgcast_server::Pgcast;
use webdriver::{Browser, DESKTOP, PHONE};

const SECRET: &[u8] = b"pgcast browser test secret, 32+ bytes";
/// Bound of every wait on the page; reached only when something is wrong.
const LIMIT: Duration = Duration::from_secs(20);

/// A migrated database of its own and pgcast's options for it.
async fn database() -> (TestDb, Client, ServeOptions) {
    let db = PgCluster::shared()
        .expect("test cluster")
        .create_database()
        .await
        .expect("create database");
    let mut client = db.connect().await.expect("connect");
    migrate(&mut client, MigrationScope::All)
        .await
        .expect("migrate");
    let options = ServeOptions {
        pg: db.pg_config(),
        jwt_secret: SECRET.to_vec(),
        jwt_issuer: None,
        jwt_audience: None,
        retention: Duration::from_secs(3600),
        migrate: false,
        links: Vec::new(),
    };
    (db, client, options)
}

fn token(user_id: Uuid, role: Role, workshop_id: Option<Uuid>) -> String {
    let who = Principal {
        user_id,
        role,
        workshop_id,
    };
    pgcast_gateway::mint_token(SECRET, &who, Duration::from_secs(3600)).expect("mint token")
}

/// One `session_assignments` row to insert.
#[derive(Clone, Copy)]
struct Row<'a> {
    session: Option<Uuid>,
    mechanic: Option<Uuid>,
    workshop: Option<Uuid>,
    status: &'a str,
    urgent: bool,
    customer: &'a str,
    vehicle: &'a str,
    concern: &'a str,
    minutes_ago: i32,
}

impl Default for Row<'_> {
    fn default() -> Self {
        Row {
            session: None,
            mechanic: None,
            workshop: None,
            status: "queued",
            urgent: false,
            customer: "Alex Morgan",
            vehicle: "2015 Toyota Corolla 1.8",
            concern: "Check engine light came on this morning.",
            minutes_ago: 0,
        }
    }
}

async fn insert(db: &Client, row: Row<'_>) -> Uuid {
    let session = row.session.unwrap_or_else(Uuid::new_v4);
    db.query_one(
        "INSERT INTO session_assignments (session_id, mechanic_id, workshop_id, status, urgent, \
             customer_name, vehicle_summary, concern, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
             now() - make_interval(mins => $9), now() - make_interval(mins => $9)) \
         RETURNING id",
        &[
            &session,
            &row.mechanic,
            &row.workshop,
            &row.status,
            &row.urgent,
            &row.customer,
            &row.vehicle,
            &row.concern,
            &row.minutes_ago,
        ],
    )
    .await
    .expect("insert assignment")
    .get(0)
}

async fn set_status(db: &Client, id: Uuid, status: &str, mechanic: Option<Uuid>) {
    let n = db
        .execute(
            "UPDATE session_assignments SET status = $2, \
                 mechanic_id = COALESCE($3, mechanic_id), updated_at = now() \
             WHERE id = $1",
            &[&id, &status, &mechanic],
        )
        .await
        .expect("update assignment");
    assert_eq!(n, 1, "assignment {id} exists");
}

/// What the mechanic's queue must show, straight from the table (design §5): queued or offered
/// to them directly, or queued with no mechanic for everybody or for their workshop.
async fn expected_queue(db: &Client, mechanic: Uuid, workshop: Uuid) -> BTreeSet<String> {
    db.query(
        "SELECT id FROM session_assignments \
         WHERE (mechanic_id = $1 AND status IN ('queued', 'offered')) \
            OR (mechanic_id IS NULL AND status = 'queued' \
                AND (workshop_id IS NULL OR workshop_id = $2))",
        &[&mechanic, &workshop],
    )
    .await
    .expect("expected queue")
    .iter()
    .map(|r| r.get::<_, Uuid>(0).to_string())
    .collect()
}

fn ids(ids: &[Uuid]) -> BTreeSet<String> {
    ids.iter().map(Uuid::to_string).collect()
}

/// The mechanic page as the test sees it: card ids in DOM order, the count, the indicator.
const MECHANIC_VIEW: &str = r#"
const cards = [...document.querySelectorAll('#cards > li')];
return {
  ids: cards.map((li) => li.dataset.id),
  count: document.getElementById('count').textContent.trim(),
  state: document.getElementById('status').dataset.state,
  states: window.pgcast ? window.pgcast.states : [],
  stats: window.pgcast ? window.pgcast.stats : null,
  queue: window.pgcast ? [...window.pgcast.queue.keys()] : [],
  marker: window.__testMarker ?? null,
};"#;

/// Sets a marker on `window`: it survives everything but a reload.
const SET_MARKER: &str = "window.__testMarker = 'loaded once'; return true;";

fn id_list(view: &Value, key: &str) -> Vec<String> {
    view[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The page shows exactly `expected`: each once, the count agrees, and it is live.
fn shows_exactly(view: &Value, expected: &BTreeSet<String>) -> bool {
    let shown = id_list(view, "ids");
    let set: BTreeSet<String> = shown.iter().cloned().collect();
    shown.len() == set.len()
        && &set == expected
        && view["count"] == Value::String(expected.len().to_string())
        && view["state"] == "live"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mechanic_queue_is_live_and_catches_up_after_a_restart() {
    let (_db, db, options) = database().await;
    let workshop = Uuid::new_v4();
    let other_workshop = Uuid::new_v4();
    let me = Uuid::new_v4();
    let other_mechanic = Uuid::new_v4();
    let token = token(me, Role::Mechanic, Some(workshop));

    // Before the page opens: it arrives with the snapshot.
    let early = insert(
        &db,
        Row {
            urgent: true,
            customer: "Dana Whitfield",
            vehicle: "2017 Honda Civic 1.5 Turbo",
            concern: "Brakes grind loudly when stopping; the pedal feels soft.",
            minutes_ago: 14,
            ..Row::default()
        },
    )
    .await;
    let early_other = insert(
        &db,
        Row {
            workshop: Some(other_workshop),
            customer: "Not for me",
            ..Row::default()
        },
    )
    .await;

    let server = Pgcast::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), options.clone()).await;
    let addr = server.addr();
    let browser = Browser::start().await;
    browser.set_viewport(DESKTOP).await;
    browser
        .goto(&server.url(&format!("/mechanic?token={token}")))
        .await;
    browser.eval(SET_MARKER).await;
    browser
        .wait_for("the snapshot", LIMIT, MECHANIC_VIEW, |v| {
            shows_exactly(v, &ids(&[early]))
        })
        .await;

    // Live: one of each kind of row; only some are this mechanic's.
    let general = insert(
        &db,
        Row {
            customer: "Marco Ruiz",
            vehicle: "2012 Ford Focus 2.0 (petrol)",
            concern: "Car shakes at idle and the engine light flashes when accelerating.",
            minutes_ago: 6,
            ..Row::default()
        },
    )
    .await;
    let ours = insert(
        &db,
        Row {
            workshop: Some(workshop),
            customer: "Priya Natarajan",
            vehicle: "2019 Volkswagen Golf TDI",
            concern: "Warning light for the diesel particulate filter stays on after a long drive.",
            minutes_ago: 3,
            ..Row::default()
        },
    )
    .await;
    let offered = insert(
        &db,
        Row {
            mechanic: Some(me),
            workshop: Some(workshop),
            status: "offered",
            customer: "Tom Becker",
            vehicle: "2014 BMW 320d Touring",
            concern: "Air conditioning blows warm air since last week.",
            ..Row::default()
        },
    )
    .await;
    let theirs = insert(
        &db,
        Row {
            workshop: Some(other_workshop),
            customer: "Other workshop",
            ..Row::default()
        },
    )
    .await;
    let offered_elsewhere = insert(
        &db,
        Row {
            mechanic: Some(other_mechanic),
            status: "offered",
            customer: "Offered to someone else",
            ..Row::default()
        },
    )
    .await;
    let mut expected = ids(&[early, general, ours, offered]);
    assert_eq!(expected, expected_queue(&db, me, workshop).await);
    for hidden in [early_other, theirs, offered_elsewhere] {
        assert!(!expected.contains(&hidden.to_string()));
    }
    let view = browser
        .wait_for("the live cards", LIMIT, MECHANIC_VIEW, |v| {
            shows_exactly(v, &expected)
        })
        .await;
    assert_eq!(
        id_list(&view, "ids")[0],
        early.to_string(),
        "urgent cards come first"
    );

    // Accepted by another mechanic: the card disappears.
    set_status(&db, general, "accepted", Some(other_mechanic)).await;
    expected.remove(&general.to_string());
    browser
        .wait_for("the accepted card to go", LIMIT, MECHANIC_VIEW, |v| {
            shows_exactly(v, &expected)
        })
        .await;
    let indicator = browser
        .eval("const s = document.getElementById('status'); return [s.dataset.state, s.textContent.trim()];")
        .await;
    assert_eq!(indicator, serde_json::json!(["live", "Live"]));

    browser.screenshot("mechanic-desktop").await;
    browser.set_viewport(PHONE).await;
    browser.screenshot("mechanic-phone").await;
    browser.set_viewport(DESKTOP).await;

    // pgcast goes away; the page notices and keeps trying.
    server.stop().await;
    browser
        .wait_for(
            "the indicator to say reconnecting",
            LIMIT,
            MECHANIC_VIEW,
            |v| v["state"] == "reconnecting",
        )
        .await;
    let reconnecting = browser
        .eval("const s = document.getElementById('status'); return s.textContent.trim();")
        .await;
    assert_eq!(reconnecting, "Reconnecting…");
    browser.set_viewport(PHONE).await;
    browser.screenshot("mechanic-reconnecting-phone").await;
    browser.set_viewport(DESKTOP).await;

    // Meanwhile, the database moves on: new rows (some for this mechanic), changes to shown ones.
    let missed_general = insert(
        &db,
        Row {
            urgent: true,
            customer: "Lena Kowalski",
            vehicle: "2011 Opel Astra 1.6",
            concern: "Battery dead again this morning; the alternator light flickers.",
            ..Row::default()
        },
    )
    .await;
    let missed_ours = insert(
        &db,
        Row {
            workshop: Some(workshop),
            customer: "Samir Haddad",
            vehicle: "2020 Kia Niro Hybrid",
            concern: "Hybrid system warning after a pothole; car still drives.",
            minutes_ago: 1,
            ..Row::default()
        },
    )
    .await;
    let missed_offered = insert(
        &db,
        Row {
            mechanic: Some(me),
            status: "offered",
            customer: "Grace Liu",
            vehicle: "2016 Mazda CX-5 2.5",
            concern: "Clunk from the front right wheel over speed bumps.",
            ..Row::default()
        },
    )
    .await;
    let missed_theirs = insert(
        &db,
        Row {
            workshop: Some(other_workshop),
            customer: "Missed, other workshop",
            ..Row::default()
        },
    )
    .await;
    let missed_elsewhere = insert(
        &db,
        Row {
            mechanic: Some(other_mechanic),
            status: "offered",
            customer: "Missed, offered elsewhere",
            ..Row::default()
        },
    )
    .await;
    // Queued and taken while the page was away: never shown.
    let came_and_went = insert(
        &db,
        Row {
            customer: "Came and went",
            ..Row::default()
        },
    )
    .await;
    set_status(&db, came_and_went, "accepted", Some(other_mechanic)).await;
    // A shown card accepted by someone else, and one the customer cancelled.
    set_status(&db, ours, "accepted", Some(other_mechanic)).await;
    set_status(&db, offered, "cancelled", None).await;

    let expected = expected_queue(&db, me, workshop).await;
    assert_eq!(
        expected,
        ids(&[early, missed_general, missed_ours, missed_offered])
    );
    for hidden in [
        missed_theirs,
        missed_elsewhere,
        came_and_went,
        ours,
        offered,
    ] {
        assert!(!expected.contains(&hidden.to_string()));
    }

    // pgcast comes back on the same address: the page reconnects by itself and resumes.
    let server = Pgcast::start(addr, options.clone()).await;
    assert_eq!(server.addr(), addr);
    let view = browser
        .wait_for(
            "the page to catch up after the restart",
            LIMIT,
            MECHANIC_VIEW,
            |v| shows_exactly(v, &expected),
        )
        .await;
    let queue: BTreeSet<String> = id_list(&view, "queue").into_iter().collect();
    assert_eq!(queue, expected, "window.pgcast.queue agrees with the DOM");
    assert_eq!(view["marker"], "loaded once", "no reload");
    let states: Vec<String> = id_list(&view, "states");
    let reconnected = states
        .windows(2)
        .any(|w| w[0] == "reconnecting" && w[1] == "live");
    assert!(reconnected, "went reconnecting → live: {states:?}");
    assert_eq!(
        view["stats"]["snapshots"], 1,
        "resumed with `since`, not a new snapshot: {view:#}"
    );
    browser.screenshot("mechanic-after-restart-desktop").await;

    // And it is live again.
    let after = insert(
        &db,
        Row {
            workshop: Some(workshop),
            customer: "After the restart",
            ..Row::default()
        },
    )
    .await;
    let mut expected = expected;
    expected.insert(after.to_string());
    browser
        .wait_for("a live card after the restart", LIMIT, MECHANIC_VIEW, |v| {
            shows_exactly(v, &expected)
        })
        .await;

    browser.close().await;
    server.stop().await;
}

/// The customer page as the test sees it.
const CUSTOMER_VIEW: &str = r#"
const banner = document.getElementById('banner');
return {
  banner: banner.dataset.state,
  title: document.getElementById('banner-title').textContent.trim(),
  state: document.getElementById('status').dataset.state,
  timeline: [...document.querySelectorAll('#timeline > li')].map((li) => li.dataset.status),
  marker: window.__testMarker ?? null,
};"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_page_follows_the_session() {
    let (_db, db, options) = database().await;
    let customer = Uuid::new_v4();
    let mechanic = Uuid::new_v4();
    let session: Uuid = db
        .query_one(
            "INSERT INTO sessions (customer_id, kind) VALUES ($1, 'paid') RETURNING id",
            &[&customer],
        )
        .await
        .expect("insert session")
        .get(0);
    let token = token(customer, Role::Customer, None);

    let server = Pgcast::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), options).await;
    let browser = Browser::start().await;
    browser.set_viewport(PHONE).await;
    browser
        .goto(&server.url(&format!("/customer?token={token}&session={session}")))
        .await;
    browser.eval(SET_MARKER).await;
    browser
        .wait_for("the page to be live", LIMIT, CUSTOMER_VIEW, |v| {
            v["state"] == "live" && v["banner"] == "waiting"
        })
        .await;

    let assignment = insert(
        &db,
        Row {
            session: Some(session),
            customer: "Dana Whitfield",
            vehicle: "2017 Honda Civic 1.5 Turbo",
            concern: "Brakes grind loudly when stopping.",
            ..Row::default()
        },
    )
    .await;
    let view = browser
        .wait_for("queued: still waiting", LIMIT, CUSTOMER_VIEW, |v| {
            v["timeline"] == serde_json::json!(["queued"])
        })
        .await;
    assert_eq!(view["banner"], "waiting");
    assert_eq!(view["title"], "Waiting for a mechanic");
    browser.screenshot("customer-waiting-phone").await;

    set_status(&db, assignment, "accepted", Some(mechanic)).await;
    let view = browser
        .wait_for("accepted: mechanic assigned", LIMIT, CUSTOMER_VIEW, |v| {
            v["banner"] == "assigned"
        })
        .await;
    assert_eq!(view["title"], "Mechanic assigned");
    browser.screenshot("customer-assigned-phone").await;
    browser.set_viewport(DESKTOP).await;
    browser.screenshot("customer-assigned-desktop").await;

    set_status(&db, assignment, "completed", None).await;
    let view = browser
        .wait_for("completed: session ended", LIMIT, CUSTOMER_VIEW, |v| {
            v["banner"] == "ended"
        })
        .await;
    assert_eq!(view["title"], "Session ended");
    assert_eq!(view["marker"], "loaded once", "no reload");
    assert_eq!(view["state"], "live");
    assert_eq!(
        view["timeline"],
        serde_json::json!(["completed", "accepted", "queued"]),
        "newest first"
    );
    browser.screenshot("customer-ended-desktop").await;
    browser.set_viewport(PHONE).await;
    browser.screenshot("customer-ended-phone").await;

    browser.close().await;
    server.stop().await;
}

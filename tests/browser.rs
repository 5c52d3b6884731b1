//! The pages and the browser client in a real browser: headless Chromium (Debian's `chromium`
//! and `chromedriver`) against pgcast running in this process on a throwaway database.
//!
//! - The mechanic queue shows exactly the assignments the mechanic may take, live; after pgcast
//!   stops and starts again on the same address, the page reconnects by itself and shows exactly
//!   what changed meanwhile, once.
//! - The customer page follows its session: waiting → mechanic assigned → ended, without reload.
//! - The pages take their token from the link's fragment and remove it from the address bar at
//!   once; a reload still works; a token in the query string is removed and never used.
//! - A page whose short-lived token is refreshed (a new link opened in the same tab) keeps
//!   receiving past the old token's expiry, on the same connection; one whose token runs out
//!   shows "Session expired — reconnecting…" and catches up once a fresh link is opened.
//! - The client itself, loaded on a page and driven against the real server: it refreshes its
//!   token ahead of `expires_at` on the live connection; when refreshing fails and the server
//!   closes with 4001, it reconnects with a fresh token and `since` and loses nothing; a revoked
//!   topic is dropped and never subscribed again, not even after a reconnect.
//!
//! The page tests save screenshots (desktop and phone) under `target/screenshots/`.

#[path = "support/pgcast_server.rs"]
mod pgcast_server;
// Each test binary uses part of the shared helpers.
#[allow(dead_code)]
#[path = "support/webdriver.rs"]
mod webdriver;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgcast::ServeOptions;
use pgcast_events::{Principal, Role};
use pgcast_gateway::GatewayConfig;
use pgcast_listener::{migrate, MigrationScope};
use pgcast_testkit::{PgCluster, TestDb};
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

use pgcast_server::{serve_options, Pgcast};
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
    let options = serve_options(&db, SECRET);
    (db, client, options)
}

fn token(user_id: Uuid, role: Role, workshop_id: Option<Uuid>) -> String {
    token_for(user_id, role, workshop_id, Duration::from_secs(3600))
}

/// A token valid for `ttl` (whole seconds: `exp` is in seconds).
fn token_for(user_id: Uuid, role: Role, workshop_id: Option<Uuid>, ttl: Duration) -> String {
    let who = Principal {
        user_id,
        role,
        workshop_id,
    };
    pgcast_testkit::token::mint(SECRET, &who, ttl)
}

/// The `exp` claim of a token (unix seconds), read without verifying it.
fn exp_of(token: &str) -> u64 {
    pgcast_testkit::token::claims(token)["exp"]
        .as_u64()
        .expect("exp")
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
}

/// The moment after which the server closes a connection whose token (`exp`) was not refreshed:
/// `exp` plus the gateway's leeway, plus a second for the close to happen.
fn past_expiry(exp: u64) -> Duration {
    Duration::from_secs(exp) + GatewayConfig::new(SECRET).token_leeway + Duration::from_secs(1)
}

/// Waits until the wall clock reaches `at` (unix time). The condition is the time itself.
async fn wait_until_unix(at: Duration) {
    let left = at.saturating_sub(unix_now());
    assert!(left < LIMIT, "waiting {left:?} is beyond the test's limit");
    tokio::time::sleep(left).await;
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

/// What the mechanic's queue must show, straight from the table (docs/architecture.md §5): queued or offered
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
        .goto(&server.url(&format!("/mechanic#token={token}")))
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
        .goto(&server.url(&format!("/customer?session={session}#token={token}")))
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

/// Where the page is and what it keeps: its address, the token it stored, its state.
const ADDRESS_VIEW: &str = r#"
return {
  href: location.href,
  stored: sessionStorage.getItem('pgcast.token:' + location.pathname),
  state: document.getElementById('status').dataset.state,
  notice: document.getElementById('notice').hidden ? null : document.getElementById('notice').textContent,
  expiresAt: window.pgcast ? window.pgcast.client.expiresAt : null,
  states: window.pgcast ? window.pgcast.states : [],
  marker: window.__testMarker ?? null,
};"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_take_the_token_from_the_fragment_and_drop_it_from_the_address() {
    let (_db, db, options) = database().await;
    let workshop = Uuid::new_v4();
    let mechanic = Uuid::new_v4();
    let customer = Uuid::new_v4();
    let session: Uuid = db
        .query_one(
            "INSERT INTO sessions (customer_id, kind) VALUES ($1, 'paid') RETURNING id",
            &[&customer],
        )
        .await
        .expect("insert session")
        .get(0);
    let mechanic_token = token(mechanic, Role::Mechanic, Some(workshop));
    let customer_token = token(customer, Role::Customer, None);

    let server = Pgcast::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), options).await;
    let browser = Browser::start().await;
    browser.set_viewport(DESKTOP).await;

    // The mechanic link as the demo prints it: the token only in the fragment.
    browser
        .goto(&server.url(&format!("/mechanic#token={mechanic_token}")))
        .await;
    browser.eval(SET_MARKER).await;
    let view = browser
        .wait_for("the mechanic page to be live", LIMIT, ADDRESS_VIEW, |v| {
            v["state"] == "live"
        })
        .await;
    assert_eq!(
        view["href"],
        server.url("/mechanic"),
        "no token left: {view:#}"
    );
    assert_eq!(
        view["stored"], mechanic_token,
        "kept for this tab, so a reload works"
    );
    // A reload: the address has no token any more, the tab still has it.
    browser.reload().await;
    let view = browser
        .wait_for(
            "the mechanic page to be live after a reload",
            LIMIT,
            ADDRESS_VIEW,
            |v| v["state"] == "live",
        )
        .await;
    assert_eq!(view["marker"], Value::Null, "it was a reload");
    assert_eq!(view["href"], server.url("/mechanic"));

    // The customer link: the session in the query (no secret), the token in the fragment.
    browser
        .goto(&server.url(&format!(
            "/customer?session={session}#token={customer_token}"
        )))
        .await;
    let view = browser
        .wait_for("the customer page to be live", LIMIT, ADDRESS_VIEW, |v| {
            v["state"] == "live"
        })
        .await;
    assert_eq!(
        view["href"],
        server.url(&format!("/customer?session={session}")),
        "{view:#}"
    );

    // An old-style link with the token in the query string: removed at once, never used.
    browser.eval("sessionStorage.clear(); return true;").await;
    browser
        .goto(&server.url(&format!(
            "/customer?session={session}&token={customer_token}"
        )))
        .await;
    let view = browser
        .wait_for(
            "the page to refuse a token in the query string",
            LIMIT,
            ADDRESS_VIEW,
            |v| {
                v["notice"]
                    .as_str()
                    .is_some_and(|n| n.contains("no longer accepted"))
            },
        )
        .await;
    assert_eq!(
        view["href"],
        server.url(&format!("/customer?session={session}")),
        "{view:#}"
    );
    assert_eq!(view["stored"], Value::Null, "{view:#}");
    assert_ne!(view["state"], "live", "{view:#}");
    assert!(
        !id_list(&view, "states").contains(&"live".to_owned()),
        "never connected with it: {view:#}"
    );

    browser.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_keeps_receiving_after_its_short_lived_token_is_refreshed() {
    let (_db, db, options) = database().await;
    let workshop = Uuid::new_v4();
    let me = Uuid::new_v4();
    let server = Pgcast::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), options).await;
    let browser = Browser::start().await;
    browser.set_viewport(DESKTOP).await;
    // Minted only now: the short token's few seconds start when the page does.
    let short = token_for(me, Role::Mechanic, Some(workshop), Duration::from_secs(4));
    let short_exp = exp_of(&short);
    browser
        .goto(&server.url(&format!("/mechanic#token={short}")))
        .await;
    browser.eval(SET_MARKER).await;
    let view = browser
        .wait_for("the page to be live", LIMIT, ADDRESS_VIEW, |v| {
            v["state"] == "live"
        })
        .await;
    assert_eq!(view["expiresAt"], short_exp, "ready carries expires_at");

    // A new link opened in the same tab changes only the fragment: no reload; the page hands
    // the fresh token to the live connection.
    let long = token(me, Role::Mechanic, Some(workshop));
    let long_exp = exp_of(&long);
    browser
        .eval_with(
            "location.hash = 'token=' + arguments[0]; return true;",
            vec![json!(long)],
        )
        .await;
    let view = browser
        .wait_for(
            "the connection to run on the fresh token",
            LIMIT,
            ADDRESS_VIEW,
            |v| v["expiresAt"] == long_exp,
        )
        .await;
    assert_eq!(view["href"], server.url("/mechanic"), "{view:#}");
    assert_eq!(view["stored"], long, "{view:#}");

    // Past the moment the server closes a connection that was not refreshed: still live.
    wait_until_unix(past_expiry(short_exp)).await;
    let after = insert(
        &db,
        Row {
            workshop: Some(workshop),
            customer: "After the first token expired",
            ..Row::default()
        },
    )
    .await;
    let view = browser
        .wait_for(
            "a card after the first token's expiry",
            LIMIT,
            MECHANIC_VIEW,
            |v| shows_exactly(v, &ids(&[after])),
        )
        .await;
    assert_eq!(view["marker"], "loaded once", "no reload");
    let states = id_list(&view, "states");
    assert_eq!(
        states,
        ["connecting", "live"],
        "one connection throughout: {view:#}"
    );

    browser.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_shows_an_expired_session_and_catches_up_from_a_fresh_link() {
    let (_db, db, options) = database().await;
    let workshop = Uuid::new_v4();
    let me = Uuid::new_v4();
    let server = Pgcast::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), options).await;
    let browser = Browser::start().await;
    browser.set_viewport(PHONE).await;
    let early = insert(
        &db,
        Row {
            workshop: Some(workshop),
            customer: "Before the expiry",
            ..Row::default()
        },
    )
    .await;
    let short = token_for(me, Role::Mechanic, Some(workshop), Duration::from_secs(3));
    browser
        .goto(&server.url(&format!("/mechanic#token={short}")))
        .await;
    browser.eval(SET_MARKER).await;
    browser
        .wait_for("the page to be live", LIMIT, MECHANIC_VIEW, |v| {
            shows_exactly(v, &ids(&[early]))
        })
        .await;

    // Nobody opens a fresh link: the server closes with 4001 and the page says so.
    let expired = r#"
const s = document.getElementById('status');
return { state: s.dataset.state, text: s.textContent.trim(),
         notice: !document.getElementById('expired').hidden };"#;
    let view = browser
        .wait_for("the expired state", LIMIT, expired, |v| {
            v["state"] == "expired"
        })
        .await;
    assert_eq!(view["text"], "Session expired", "{view:#}");
    assert_eq!(view["notice"], true, "{view:#}");
    browser.screenshot("mechanic-expired-phone").await;

    // Committed while the page has no connection.
    let missed = insert(
        &db,
        Row {
            workshop: Some(workshop),
            customer: "While the session was expired",
            ..Row::default()
        },
    )
    .await;
    // A fresh link in the same tab: the page reconnects at once and resumes.
    browser
        .eval_with(
            "location.hash = 'token=' + arguments[0]; return true;",
            vec![json!(token(me, Role::Mechanic, Some(workshop)))],
        )
        .await;
    let view = browser
        .wait_for("the page to catch up", LIMIT, MECHANIC_VIEW, |v| {
            shows_exactly(v, &ids(&[early, missed]))
        })
        .await;
    assert_eq!(view["marker"], "loaded once", "no reload");
    assert_eq!(
        view["stats"]["snapshots"], 1,
        "resumed with `since`: {view:#}"
    );
    let states = id_list(&view, "states");
    assert!(
        states
            .windows(2)
            .any(|w| w[0] == "expired" && w[1] == "live"),
        "{states:?}"
    );

    browser.close().await;
    server.stop().await;
}

/// Loads the client on a page of the server and drives it, recording everything it does.
/// Arguments: the WebSocket URL, the topics to follow (snapshot off: every event counts), and
/// the tokens to hand out by reason (`"fail"`: the token service is down). A reason with no
/// token makes `token()` wait until the test sets `window.__h.tokens[reason]`.
const HARNESS: &str = r#"
const [url, topics, tokens] = arguments;
return import('/client.js').then(({ PgcastClient }) => {
  const h = { tokens, events: [], states: [], errors: [], reasons: [], revoked: [], closes: [],
    sent: [], pending: null, subs: {} };
  window.__h = h;
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(u) {
      super(u);
      h.sockets = (h.sockets || 0) + 1;
      this.addEventListener('close', (e) => h.closes.push(e.code));
    }
    send(data) {
      h.sent.push(JSON.parse(data));
      super.send(data);
    }
  };
  h.client = new PgcastClient({
    url,
    async token({ reason }) {
      h.reasons.push(reason);
      h.pending = reason;
      while (!(reason in h.tokens)) await new Promise((r) => setTimeout(r, 20));
      h.pending = null;
      if (h.tokens[reason] === 'fail') throw new Error('token service unavailable');
      return h.tokens[reason];
    },
    onState: (s) => h.states.push(s),
    onError: (e) => h.errors.push(e.code),
    onRevoked: (topic, reason) => h.revoked.push([topic, reason]),
  });
  for (const topic of topics) {
    h.subs[topic] = h.client.subscribe(topic, {
      snapshot: false,
      onSnapshot: () => h.errors.push('unexpected snapshot'),
      onEvent: (ev) => h.events.push([ev.topic, ev.position]),
    });
  }
  return true;
});"#;

/// What the harness recorded.
const HARNESS_VIEW: &str = r#"
const h = window.__h;
return {
  state: h.client.state,
  states: h.states,
  expiresAt: h.client.expiresAt,
  events: h.events,
  errors: h.errors,
  reasons: h.reasons,
  revoked: h.revoked,
  closes: h.closes,
  sockets: h.sockets,
  pending: h.pending,
  subscribes: h.sent.filter((m) => m.type === 'subscribe'),
  auths: h.sent.filter((m) => m.type === 'auth').length,
  positions: Object.fromEntries(Object.entries(h.subs).map(([t, s]) => [t, s.position])),
  subRevoked: Object.fromEntries(Object.entries(h.subs).map(([t, s]) => [t, s.revoked])),
};"#;

/// Opens a page of `server` in `browser` and starts the harness on it.
async fn harness(browser: &Browser, server: &Pgcast, topics: &[&str], tokens: Value) {
    browser.goto(&server.url("/")).await;
    let ws = format!("ws://{}/ws", server.addr());
    browser
        .eval_with(HARNESS, vec![json!(ws), json!(topics), tokens])
        .await;
}

/// Waits until the harness's `token()` asks for a token for `reason`, then answers with the one
/// `mint` makes at that moment — like a token service, so a short lifetime starts only now.
async fn answer_token(browser: &Browser, reason: &str, mint: impl FnOnce() -> String) -> String {
    browser
        .wait_for(
            &format!("a token request ({reason})"),
            LIMIT,
            HARNESS_VIEW,
            |v| v["pending"] == reason,
        )
        .await;
    let token = mint();
    browser
        .eval_with(
            "window.__h.tokens[arguments[0]] = arguments[1]; return true;",
            vec![json!(reason), json!(token)],
        )
        .await;
    token
}

/// Positions of the events the harness received on `topic`, in order.
fn received(view: &Value, topic: &str) -> Vec<i64> {
    view["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e[0] == topic)
                .filter_map(|e| e[1].as_i64())
                .collect()
        })
        .unwrap_or_default()
}

/// Every position in the log, in order.
async fn log_positions(db: &Client) -> Vec<i64> {
    db.query(
        "SELECT position FROM pgcast.assignment_events ORDER BY position",
        &[],
    )
    .await
    .expect("read the log")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refreshes_its_token_ahead_of_expiry_on_the_live_connection() {
    let (_db, db, options) = database().await;
    let service = Uuid::new_v4();
    let server = Pgcast::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), options).await;
    let browser = Browser::start().await;
    let fresh = token(service, Role::Service, None);
    harness(
        &browser,
        &server,
        &["assignments"],
        json!({ "refresh": fresh }),
    )
    .await;
    let short = answer_token(&browser, "connect", || {
        token_for(service, Role::Service, None, Duration::from_secs(3))
    })
    .await;

    // Ahead of the short token's expiry, by itself: a new `auth` on the same connection.
    let view = browser
        .wait_for("the token to be refreshed", LIMIT, HARNESS_VIEW, |v| {
            v["expiresAt"] == exp_of(&fresh)
        })
        .await;
    assert_eq!(view["reasons"], json!(["connect", "refresh"]), "{view:#}");
    assert_eq!(view["auths"], 2, "{view:#}");

    // Past the moment an unrefreshed connection is closed: events still arrive, on it.
    wait_until_unix(past_expiry(exp_of(&short))).await;
    insert(&db, Row::default()).await;
    let view = browser
        .wait_for("an event after the expiry", LIMIT, HARNESS_VIEW, |v| {
            !received(v, "assignments").is_empty()
        })
        .await;
    assert_eq!(received(&view, "assignments"), log_positions(&db).await);
    assert_eq!(view["states"], json!(["live"]), "{view:#}");
    assert_eq!(view["sockets"], 1, "{view:#}");
    assert_eq!(view["closes"], json!([]), "{view:#}");
    assert_eq!(view["errors"], json!([]), "{view:#}");

    browser.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_with_a_fresh_token_after_4001_and_loses_nothing() {
    let (_db, db, options) = database().await;
    let service = Uuid::new_v4();
    let server = Pgcast::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), options).await;
    let browser = Browser::start().await;
    // The token service fails every refresh, so the short token runs out.
    harness(
        &browser,
        &server,
        &["assignments"],
        json!({ "refresh": "fail" }),
    )
    .await;
    answer_token(&browser, "connect", || {
        token_for(service, Role::Service, None, Duration::from_secs(4))
    })
    .await;
    browser
        .wait_for("the subscription", LIMIT, HARNESS_VIEW, |v| {
            v["positions"]["assignments"].is_i64()
        })
        .await;
    insert(&db, Row::default()).await;
    let view = browser
        .wait_for("a live event", LIMIT, HARNESS_VIEW, |v| {
            received(v, "assignments").len() == 1
        })
        .await;
    let first = received(&view, "assignments")[0];

    // `token_expired` and 4001: the client wants a fresh token (the test holds it back a while).
    let view = browser
        .wait_for("close 4001 and a token request", LIMIT, HARNESS_VIEW, |v| {
            v["pending"] == "expired"
        })
        .await;
    assert_eq!(view["closes"], json!([4001]), "{view:#}");
    assert_eq!(view["state"], "expired", "{view:#}");
    let reasons = id_list(&view, "reasons");
    assert_eq!(reasons.first().map(String::as_str), Some("connect"));
    assert!(
        reasons.iter().filter(|r| *r == "refresh").count() >= 1,
        "it tried to refresh first: {view:#}"
    );
    assert!(
        id_list(&view, "errors").iter().all(|e| e == "token"),
        "only the failed refreshes are reported: {view:#}"
    );

    // Committed while the client has no connection.
    insert(&db, Row::default()).await;
    insert(&db, Row::default()).await;
    answer_token(&browser, "expired", || token(service, Role::Service, None)).await;
    let view = browser
        .wait_for("the missed events", LIMIT, HARNESS_VIEW, |v| {
            received(v, "assignments").len() == 3
        })
        .await;
    assert_eq!(view["state"], "live", "{view:#}");
    let subscribes = view["subscribes"].as_array().cloned().unwrap_or_default();
    assert_eq!(subscribes.len(), 2, "{view:#}");
    assert_eq!(
        subscribes[1]["since"], first,
        "resumed after the last event it had: {view:#}"
    );
    // And live again.
    insert(&db, Row::default()).await;
    let view = browser
        .wait_for(
            "a live event after the reconnect",
            LIMIT,
            HARNESS_VIEW,
            |v| received(v, "assignments").len() == 4,
        )
        .await;
    assert_eq!(
        received(&view, "assignments"),
        log_positions(&db).await,
        "every event once, in order: {view:#}"
    );
    let states = id_list(&view, "states");
    assert!(
        states
            .windows(2)
            .any(|w| w[0] == "expired" && w[1] == "live"),
        "{states:?}"
    );
    assert_eq!(view["sockets"], 2, "{view:#}");

    browser.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_drops_a_revoked_topic_and_never_subscribes_it_again() {
    let (_db, db, options) = database().await;
    let me = Uuid::new_v4();
    let other = Uuid::new_v4();
    let customer = Uuid::new_v4();
    let session: Uuid = db
        .query_one(
            "INSERT INTO sessions (customer_id, kind) VALUES ($1, 'paid') RETURNING id",
            &[&customer],
        )
        .await
        .expect("insert session")
        .get(0);
    let assignment = insert(
        &db,
        Row {
            session: Some(session),
            mechanic: Some(me),
            status: "accepted",
            ..Row::default()
        },
    )
    .await;
    let server = Pgcast::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), options).await;
    let topic = format!("session:{session}");
    let mine = format!("mechanic:{me}");
    let browser = Browser::start().await;
    harness(
        &browser,
        &server,
        &[&topic, &mine],
        json!({ "connect": token(me, Role::Mechanic, None), "reconnect": token(me, Role::Mechanic, None) }),
    )
    .await;
    browser
        .wait_for("both subscriptions", LIMIT, HARNESS_VIEW, |v| {
            v["positions"][&topic].is_i64() && v["positions"][&mine].is_i64()
        })
        .await;

    // Handed to another mechanic: that change is the last event of the session, then revoked.
    set_status(&db, assignment, "accepted", Some(other)).await;
    let view = browser
        .wait_for("the revocation", LIMIT, HARNESS_VIEW, |v| {
            v["revoked"].as_array().is_some_and(|r| !r.is_empty())
        })
        .await;
    assert_eq!(view["revoked"][0][0], topic.as_str(), "{view:#}");
    assert!(view["revoked"][0][1].is_string(), "{view:#}");
    assert_eq!(
        view["subRevoked"][&topic], view["revoked"][0][1],
        "{view:#}"
    );
    assert_eq!(
        received(&view, &topic).len(),
        1,
        "the change itself: {view:#}"
    );
    let mine_before = received(&view, &mine).len();

    // The connection drops; the client comes back with its other topic only.
    browser
        .eval("window.__h.client.ws.close(4000, 'test'); return true;")
        .await;
    let view = browser
        .wait_for("the reconnect", LIMIT, HARNESS_VIEW, |v| {
            v["sockets"] == 2 && v["state"] == "live"
        })
        .await;
    let subscribes = view["subscribes"].as_array().cloned().unwrap_or_default();
    let again: Vec<&Value> = subscribes[2..].iter().map(|m| &m["topic"]).collect();
    assert_eq!(again, [&json!(mine)], "{view:#}");
    // The session goes on without this mechanic: nothing of it arrives.
    set_status(&db, assignment, "completed", None).await;
    insert(
        &db,
        Row {
            mechanic: Some(me),
            status: "offered",
            ..Row::default()
        },
    )
    .await;
    let view = browser
        .wait_for("a new event of the other topic", LIMIT, HARNESS_VIEW, |v| {
            received(v, &mine).len() > mine_before
        })
        .await;
    assert_eq!(received(&view, &topic).len(), 1, "{view:#}");
    assert_eq!(view["errors"], json!([]), "{view:#}");

    browser.close().await;
    server.stop().await;
}

//! The demo's action API (`/demo/api/…`) over real sockets, against `pgcast::demo_on` on a
//! throwaway database:
//! - the routes exist in `demo` only: `serve` answers 404 and its pages show no buttons; both
//!   serve a favicon;
//! - a customer acts only on their own sessions (403), opens one session at a time (409);
//! - of two mechanics accepting the same request at once, exactly one wins, the other gets 409;
//!   decline is for offers to oneself, complete for what one accepted;
//! - malformed requests are 400 with a message that says what to fix, a missing or bad token
//!   401, the wrong role 403;
//! - a successful action answers 204 with no body: what changed reaches the clients as events
//!   through the log and the gateway (checked on WebSocket subscriptions), never in the answer.

mod common;
// The one in-process demo start-up, shared with the end-to-end suite.
#[allow(dead_code)]
#[path = "../../../tests/support/demo_server.rs"]
mod demo_server;
// The one in-process serve start-up, likewise.
#[allow(dead_code)]
#[path = "../../../tests/support/pgcast_server.rs"]
mod pgcast_server;
mod running;

use std::net::SocketAddr;
use std::time::Duration;

use demo_server::{exchange, DemoServer, DEMO_SECRET};
use pgcast_events::{Principal, Role};
use pgcast_server::{serve_options, Pgcast};
use pgcast_testkit::TestDb;
use running::{http_get, token_for, Ws, WAIT};
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

/// The demo's token secret (`serve` is started with the same one).
const SECRET: &[u8] = DEMO_SECRET;

/// `pgcast::demo_on` (the shared [`DemoServer`]) or `serve` (the shared [`Pgcast`]) in this
/// process; each cancels itself when dropped.
struct Running {
    addr: SocketAddr,
    job: Job,
}

enum Job {
    Demo(DemoServer),
    Serve(Pgcast),
    Stopped,
}

impl Running {
    /// The demo on a fresh database, once `/readyz` answers 200, and a connection to its
    /// database.
    async fn demo() -> (Running, Client) {
        let (server, client) = DemoServer::start().await;
        let running = Running {
            addr: server.addr(),
            job: Job::Demo(server),
        };
        (running, client)
    }

    /// `pgcast::serve` on a migrated fresh database, once `/readyz` answers 200.
    async fn serve() -> (TestDb, Running) {
        let (db, _client) = common::migrated_db().await;
        let server = Pgcast::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            serve_options(&db, SECRET),
        )
        .await;
        let running = Running {
            addr: server.addr(),
            job: Job::Serve(server),
        };
        (db, running)
    }

    async fn stop(mut self) {
        match std::mem::replace(&mut self.job, Job::Stopped) {
            Job::Demo(server) => server.stop().await,
            Job::Serve(server) => server.stop().await,
            Job::Stopped => {}
        }
    }

    /// `POST path` with an optional bearer token and JSON body.
    async fn post(&self, path: &str, token: Option<&str>, body: Option<&str>) -> Answer {
        post(self.addr, path, token, body).await
    }
}

/// An HTTP answer.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    /// The JSON error body's message, after checking its code.
    fn error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "{self:?}");
        assert!(
            self.head
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{self:?}"
        );
        let v: Value = serde_json::from_str(&self.body).expect("JSON error body");
        assert_eq!(v["error"], code, "{v}");
        let message = v["message"].as_str().expect("a message").to_owned();
        assert!(!message.is_empty());
        message
    }

    /// A success: 204 and nothing else — no row data a page could render.
    fn no_content(&self) {
        assert_eq!(self.status, 204, "{self:?}");
        assert!(self.body.is_empty(), "{self:?}");
    }
}

async fn post(addr: SocketAddr, path: &str, token: Option<&str>, body: Option<&str>) -> Answer {
    http_answer(addr, "POST", path, token, body).await
}

async fn http_answer(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Answer {
    let exchange = exchange(addr, method, path, token, body);
    let response = tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within {WAIT:?}"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: not HTTP: {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status in {head:?}"));
    Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

fn user(role: Role, workshop: Option<Uuid>) -> (Principal, String) {
    let who = Principal {
        user_id: Uuid::new_v4(),
        role,
        workshop_id: workshop,
    };
    let token = token_for(SECRET, &who, Duration::from_secs(600));
    (who, token)
}

fn request(kind: &str, vehicle: &str) -> String {
    json!({ "kind": kind, "vehicle": vehicle, "concern": "Squeaks when braking." }).to_string()
}

/// The customer's assignments in the database: (id, session, status, urgent, workshop).
async fn assignments_of(db: &Client, customer: Uuid) -> Vec<(Uuid, Uuid, String, bool)> {
    db.query(
        "SELECT a.id, a.session_id, a.status, a.urgent FROM session_assignments a \
         JOIN sessions s ON s.id = a.session_id WHERE s.customer_id = $1 \
         ORDER BY a.created_at, a.id",
        &[&customer],
    )
    .await
    .expect("query")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

async fn session_status(db: &Client, session: Uuid) -> String {
    db.query_one("SELECT status FROM sessions WHERE id = $1", &[&session])
        .await
        .expect("session")
        .get(0)
}

/// The next event on `ws`, for the assignment `id` (others of the demo are skipped).
async fn event_for(ws: &mut Ws, id: Uuid) -> Value {
    loop {
        let ev = ws.events(1).await.remove(0);
        if ev["assignment"]["id"] == id.to_string() {
            return ev;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_has_no_demo_routes_and_both_serve_a_favicon() {
    let (_db, serve) = Running::serve().await;
    let (_, customer) = user(Role::Customer, None);
    let (_, mechanic) = user(Role::Mechanic, None);
    let answer = serve
        .post(
            "/demo/api/requests",
            Some(&customer),
            Some(&request("free", "Car")),
        )
        .await;
    assert_eq!(answer.status, 404, "{answer:?}");
    let path = format!("/demo/api/assignments/{}/accept", Uuid::new_v4());
    assert_eq!(serve.post(&path, Some(&mechanic), None).await.status, 404);
    let path = format!("/demo/api/sessions/{}/end", Uuid::new_v4());
    assert_eq!(serve.post(&path, Some(&customer), None).await.status, 404);
    for page in ["/mechanic", "/customer"] {
        let (status, html) = http_get(serve.addr, page).await;
        assert_eq!(status, 200);
        assert!(
            !html.contains(r#"<meta name="pgcast-demo-api""#),
            "{page} offers no actions"
        );
        assert!(!html.contains("<!-- EXTRAS -->"), "{page}: mark replaced");
        assert!(html.contains(r#"<link rel="icon" href="/favicon.svg""#));
    }
    for icon in ["/favicon.svg", "/favicon.ico"] {
        let (status, body) = http_get(serve.addr, icon).await;
        assert_eq!(status, 200, "{icon}");
        assert!(body.starts_with("<svg"), "{icon}");
    }
    // Pages hold a user's token: never framed by another site, never sniffed, no Referer.
    for path in ["/", "/mechanic", "/customer", "/client.js", "/app.css"] {
        let page = http_answer(serve.addr, "GET", path, None, None).await;
        assert_eq!(page.status, 200, "{path}");
        let head = page.head.to_ascii_lowercase();
        for line in [
            "x-content-type-options: nosniff",
            "x-frame-options: deny",
            "content-security-policy: frame-ancestors 'none'",
            "referrer-policy: no-referrer",
        ] {
            assert!(head.contains(line), "{path}: no {line:?} in {head}");
        }
    }
    serve.stop().await;

    let (demo, _client) = Running::demo().await;
    for page in ["/mechanic", "/customer"] {
        let (status, html) = http_get(demo.addr, page).await;
        assert_eq!(status, 200);
        assert!(
            html.contains(r#"<meta name="pgcast-demo-api" content="/demo/api">"#),
            "{page} knows the demo API"
        );
    }
    for icon in ["/favicon.svg", "/favicon.ico"] {
        assert_eq!(http_get(demo.addr, icon).await.0, 200, "{icon}");
    }
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_act_only_on_their_own_sessions() {
    let (demo, db) = Running::demo().await;
    let (alice, alice_token) = user(Role::Customer, None);
    let (_, bob_token) = user(Role::Customer, None);

    demo.post(
        "/demo/api/requests",
        Some(&alice_token),
        Some(&request("paid", "2019 Toyota Corolla")),
    )
    .await
    .no_content();
    let rows = assignments_of(&db, alice.user_id).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (_, session, status, urgent) = rows[0].clone();
    assert_eq!(status, "queued");
    assert!(urgent, "a paid request is urgent");
    assert_eq!(session_status(&db, session).await, "open");

    // One open session at a time.
    let message = demo
        .post(
            "/demo/api/requests",
            Some(&alice_token),
            Some(&request("free", "Another car")),
        )
        .await
        .error(409, "conflict");
    assert!(
        message.contains("already have an open session"),
        "{message}"
    );

    // Bob cannot end Alice's session; nothing changes.
    let end = format!("/demo/api/sessions/{session}/end");
    let message = demo
        .post(&end, Some(&bob_token), None)
        .await
        .error(403, "forbidden");
    assert_eq!(message, "this session belongs to another customer");
    assert_eq!(assignments_of(&db, alice.user_id).await, rows);
    assert_eq!(session_status(&db, session).await, "open");
    let unknown = format!("/demo/api/sessions/{}/end", Uuid::new_v4());
    demo.post(&unknown, Some(&bob_token), None)
        .await
        .error(404, "not_found");

    // Alice can; twice is a conflict.
    demo.post(&end, Some(&alice_token), None).await.no_content();
    let rows = assignments_of(&db, alice.user_id).await;
    assert_eq!(rows[0].2, "cancelled", "a waiting request is cancelled");
    assert_eq!(session_status(&db, session).await, "ended");
    let message = demo
        .post(&end, Some(&alice_token), None)
        .await
        .error(409, "conflict");
    assert_eq!(message, "this session has already ended");

    // And a new one can be opened; a free one is not urgent.
    demo.post(
        "/demo/api/requests",
        Some(&alice_token),
        Some(&request("free", "2011 Ford Focus")),
    )
    .await
    .no_content();
    let rows = assignments_of(&db, alice.user_id).await;
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[1].2.as_str(), rows[1].3), ("queued", false));
    assert_ne!(rows[1].1, session, "a new session");
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_accepts_wins_the_other_is_a_conflict() {
    let (demo, db) = Running::demo().await;
    let workshop = Uuid::new_v4();
    let (customer, customer_token) = user(Role::Customer, None);
    let (freelancer, freelancer_token) = user(Role::Mechanic, None);
    let (shop_mechanic, shop_token) = user(Role::Mechanic, Some(workshop));
    let (_, service_token) = user(Role::Service, None);

    // Both mechanics follow their queues; a service follows everything.
    let mut queues = Vec::new();
    for token in [&freelancer_token, &shop_token] {
        let mut ws = Ws::connect(demo.addr, token).await;
        ws.subscribe("queue", json!({})).await;
        queues.push(ws);
    }
    let mut all = Ws::connect(demo.addr, &service_token).await;
    all.subscribe("assignments", json!({})).await;

    demo.post(
        "/demo/api/requests",
        Some(&customer_token),
        Some(&request("free", "2016 Škoda Octavia")),
    )
    .await
    .no_content();
    let created = all.events(1).await.remove(0);
    assert_eq!(created["event"], "assignment.created", "{created}");
    let id: Uuid = created["assignment"]["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("assignment id");
    assert_eq!(
        created["assignment"]["vehicle_summary"],
        "2016 Škoda Octavia"
    );
    for ws in &mut queues {
        let ev = event_for(ws, id).await;
        assert_eq!(ev["event"], "assignment.created", "in every queue: {ev}");
    }

    // Both accept at once: one wins, the other is told it was taken.
    let accept = format!("/demo/api/assignments/{id}/accept");
    let (a, b) = tokio::join!(
        demo.post(&accept, Some(&freelancer_token), None),
        demo.post(&accept, Some(&shop_token), None),
    );
    let (winner, winner_token, loser_token, loser) = match (a.status, b.status) {
        (204, 409) => (freelancer, &freelancer_token, &shop_token, b),
        (409, 204) => (shop_mechanic, &shop_token, &freelancer_token, a),
        other => panic!("expected one 204 and one 409, got {other:?}: {a:?} {b:?}"),
    };
    assert_eq!(
        loser.error(409, "conflict"),
        "another mechanic has already accepted this request"
    );
    let accepted = event_for(&mut all, id).await;
    assert_eq!(accepted["assignment"]["status"], "accepted");
    assert_eq!(
        accepted["assignment"]["mechanic_id"],
        winner.user_id.to_string()
    );
    // The card leaves both queues.
    for ws in &mut queues {
        let ev = event_for(ws, id).await;
        assert_eq!(ev["assignment"]["status"], "accepted", "{ev}");
    }
    // A third try is a conflict too, even by the winner.
    demo.post(&accept, Some(winner_token), None)
        .await
        .error(409, "conflict");

    // Only the winner completes it; that ends the session.
    let complete = format!("/demo/api/assignments/{id}/complete");
    let message = demo
        .post(&complete, Some(loser_token), None)
        .await
        .error(403, "forbidden");
    assert!(
        message.contains("only the mechanic who accepted"),
        "{message}"
    );
    demo.post(&complete, Some(winner_token), None)
        .await
        .no_content();
    let done = event_for(&mut all, id).await;
    assert_eq!(done["assignment"]["status"], "completed");
    assert_eq!(done["old_status"], "accepted");
    let rows = assignments_of(&db, customer.user_id).await;
    assert_eq!(session_status(&db, rows[0].1).await, "ended");

    // Decline: only an offer to oneself; the request goes back to the queue.
    let session: Uuid = db
        .query_one(
            "INSERT INTO sessions (customer_id, kind) VALUES ($1, 'paid') RETURNING id",
            &[&customer.user_id],
        )
        .await
        .expect("session")
        .get(0);
    let offer: Uuid = db
        .query_one(
            "INSERT INTO session_assignments (session_id, mechanic_id, workshop_id, status, \
             vehicle_summary) VALUES ($1, $2, $3, 'offered', 'Offered car') RETURNING id",
            &[&session, &shop_mechanic.user_id, &workshop],
        )
        .await
        .expect("offer")
        .get(0);
    assert_eq!(
        event_for(&mut all, offer).await["event"],
        "assignment.created"
    );
    let decline = format!("/demo/api/assignments/{offer}/decline");
    demo.post(&decline, Some(&freelancer_token), None)
        .await
        .error(403, "forbidden");
    demo.post(&decline, Some(&shop_token), None)
        .await
        .no_content();
    let declined = all.events(2).await;
    assert_eq!(declined[0]["assignment"]["id"], offer.to_string());
    assert_eq!(declined[0]["assignment"]["status"], "declined");
    assert_eq!(declined[1]["event"], "assignment.created");
    assert_eq!(declined[1]["assignment"]["status"], "queued");
    assert_eq!(declined[1]["assignment"]["session_id"], session.to_string());
    assert_eq!(
        declined[1]["assignment"]["workshop_id"],
        workshop.to_string()
    );
    assert_eq!(declined[1]["assignment"]["mechanic_id"], Value::Null);
    assert!(declined[0]["position"].as_i64() < declined[1]["position"].as_i64());
    demo.post(&decline, Some(&shop_token), None)
        .await
        .error(409, "conflict");
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_clear_message() {
    let (demo, _client) = Running::demo().await;
    let (_, customer) = user(Role::Customer, None);
    let (_, mechanic) = user(Role::Mechanic, None);
    let requests = "/demo/api/requests";
    let cases: [(&str, &str); 6] = [
        ("{", "must be JSON"),
        (
            r#"{"kind":"free","vehicle":"Car"}"#,
            "missing field `concern`",
        ),
        (
            r#"{"kind":"gold","vehicle":"Car","concern":"x"}"#,
            r#"kind must be "free" or "paid", not "gold""#,
        ),
        (
            r#"{"kind":"free","vehicle":" ","concern":"x"}"#,
            "vehicle is required",
        ),
        (
            r#"{"kind":"free","vehicle":"Car","concern":""}"#,
            "concern is required",
        ),
        (
            r#"{"kind":"free","vehicle":"Car","concern":"x","urgent":true}"#,
            "unknown field `urgent`",
        ),
    ];
    for (body, expected) in cases {
        let message = demo
            .post(requests, Some(&customer), Some(body))
            .await
            .error(400, "bad_request");
        assert!(message.contains(expected), "{body}: {message}");
    }
    let message = demo
        .post("/demo/api/sessions/42/end", Some(&customer), None)
        .await
        .error(400, "bad_request");
    assert_eq!(message, "`42` is not a valid session id (expected a UUID)");
    let message = demo
        .post("/demo/api/assignments/x/accept", Some(&mechanic), None)
        .await
        .error(400, "bad_request");
    assert_eq!(
        message,
        "`x` is not a valid assignment id (expected a UUID)"
    );

    // Who is asking comes first.
    let body = request("free", "Car");
    demo.post(requests, None, Some(&body))
        .await
        .error(401, "unauthorized");
    demo.post(requests, Some("not.a.token"), Some(&body))
        .await
        .error(401, "unauthorized");
    let (_, wrong_secret) = {
        let who = Principal {
            user_id: Uuid::new_v4(),
            role: Role::Customer,
            workshop_id: None,
        };
        let other = b"another secret, also 32 bytes long!!";
        (who, token_for(other, &who, Duration::from_secs(600)))
    };
    demo.post(requests, Some(&wrong_secret), Some(&body))
        .await
        .error(401, "unauthorized");
    let message = demo
        .post(requests, Some(&mechanic), Some(&body))
        .await
        .error(403, "forbidden");
    assert_eq!(message, "only a customer can do this");
    let accept = format!("/demo/api/assignments/{}/accept", Uuid::new_v4());
    let message = demo
        .post(&accept, Some(&customer), None)
        .await
        .error(403, "forbidden");
    assert_eq!(message, "only a mechanic can do this");
    demo.post(&accept, Some(&mechanic), None)
        .await
        .error(404, "not_found");
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_carry_no_assignment_data() {
    let (demo, db) = Running::demo().await;
    let (customer, customer_token) = user(Role::Customer, None);
    let (_, mechanic_token) = user(Role::Mechanic, None);
    let vehicle = "2020 Tesla Model 3 (unique vehicle text)";
    let mut answers = Vec::new();

    let opened = demo
        .post(
            "/demo/api/requests",
            Some(&customer_token),
            Some(&request("free", vehicle)),
        )
        .await;
    opened.no_content();
    answers.push(opened);
    let (id, session, _, _) = assignments_of(&db, customer.user_id).await[0].clone();
    for (path, token) in [
        (
            format!("/demo/api/assignments/{id}/accept"),
            &mechanic_token,
        ),
        (
            format!("/demo/api/assignments/{id}/accept"),
            &mechanic_token,
        ),
        (
            format!("/demo/api/assignments/{id}/decline"),
            &mechanic_token,
        ),
        (
            format!("/demo/api/assignments/{id}/complete"),
            &mechanic_token,
        ),
        (format!("/demo/api/sessions/{session}/end"), &customer_token),
    ] {
        answers.push(demo.post(&path, Some(token), None).await);
    }
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [204, 204, 409, 409, 204, 409]);
    for answer in &answers {
        if answer.status == 204 {
            answer.no_content();
        }
        let text = format!("{}\n{}", answer.head, answer.body);
        for secret in [id.to_string(), session.to_string(), vehicle.to_owned()] {
            assert!(!text.contains(&secret), "{secret} in {answer:?}");
        }
    }
    demo.stop().await;
}

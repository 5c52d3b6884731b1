//! A real gateway for tests: throwaway PostgreSQL, the real listener, axum on 127.0.0.1:0, and
//! the test kit's real tokio-tungstenite client ([`Ws`]); rows written the way the product's
//! users write them; markers that prove nothing more is on its way to a client.
#![allow(dead_code, unused_imports, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pgcast_events::{Principal, Role};
use pgcast_gateway::{Gateway, GatewayConfig};
use pgcast_listener::{migrate, EventLog, Listener, ListenerStatus, MigrationScope, Start};
use pgcast_testkit::{PgCluster, TestDb};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use pgcast_testkit::token::{customer, mechanic, service};
pub use pgcast_testkit::ws::{Next, Ws, WAIT};

pub const SECRET: &[u8] = b"gateway-test-secret-of-at-least-32-bytes";

pub struct Harness {
    pub db: TestDb,
    pub admin: tokio_postgres::Client,
    pub addr: SocketAddr,
    pub gateway: Gateway,
    pub listener: Arc<ListenerStatus>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    listener_task: tokio::task::JoinHandle<()>,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut GatewayConfig)) -> Harness {
        let db = PgCluster::shared()
            .expect("cluster")
            .create_database()
            .await
            .expect("database");
        let mut admin = db.connect().await.expect("connect");
        migrate(&mut admin, MigrationScope::All)
            .await
            .expect("migrate");
        let log = EventLog::new(db.pool(8));
        let mut config = GatewayConfig::new(SECRET);
        tune(&mut config);
        let gateway = Gateway::new(config, log.clone()).expect("gateway config");
        let start = log.head().await.expect("log head").head;
        let listener = Listener::new(db.pg_config(), log);
        let status = listener.status();
        let (tx, rx) = mpsc::channel(1024);
        let stop = CancellationToken::new();
        let listener_task = tokio::spawn(listener.run(Start::After(start), tx, stop.clone()));
        gateway.spawn_dispatch(rx, start);
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let router = gateway.router();
        let server_stop = stop.clone();
        let server = tokio::spawn(async move {
            axum::serve(tcp, router)
                .with_graceful_shutdown(server_stop.cancelled_owned())
                .await
                .expect("serve");
        });
        tokio::time::timeout(WAIT, status.wait_ready())
            .await
            .expect("listener not ready");
        Harness {
            db,
            admin,
            addr,
            gateway,
            listener: status,
            stop,
            server,
            listener_task,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn token(&self, who: &Principal) -> String {
        pgcast_testkit::token::mint(SECRET, who, Duration::from_secs(600))
    }

    /// A connected, not yet authenticated client.
    pub async fn raw(&self) -> Ws {
        Ws::open(self.addr).await.expect("websocket connect")
    }

    /// A client authenticated as `who`.
    pub async fn client(&self, who: &Principal) -> Ws {
        let mut ws = self.raw().await;
        let ready = ws.auth(&self.token(who)).await;
        assert_eq!(ready["user_id"], who.user_id.to_string());
        ws
    }

    /// A service client following `assignments` live. Created before writes whose live
    /// delivery must be over before the test goes on: [`Ws::until_position`] then waits on the
    /// stream itself, and [`Ws::stop_following`] makes it quiet again.
    pub async fn watcher(&self) -> Ws {
        let mut ws = self.client(&service()).await;
        ws.subscribe("assignments", json!({})).await;
        ws
    }

    pub async fn stop(self) {
        assert!(self.gateway.shutdown(Duration::from_secs(5)).await);
        self.stop.cancel();
        self.server.await.unwrap();
        self.listener_task.await.unwrap();
    }

    /// Inserts `n` general queued assignments of new sessions, in one statement: log rows that
    /// belong to nobody's session or customer.
    pub async fn insert_unrelated(&self, n: i32) {
        self.admin
            .execute(
                "INSERT INTO session_assignments (session_id, status)
                 SELECT gen_random_uuid(), 'queued' FROM generate_series(1, $1::int)",
                &[&n],
            )
            .await
            .unwrap();
    }

    /// Inserts an assignment, returning its id.
    pub async fn insert(
        &self,
        session: Uuid,
        status: &str,
        mechanic: Option<Uuid>,
        workshop: Option<Uuid>,
    ) -> Uuid {
        self.admin
            .query_one(
                "INSERT INTO session_assignments (session_id, status, mechanic_id, workshop_id,
                    customer_name, vehicle_summary, concern)
                 VALUES ($1, $2, $3, $4, 'Ana', '2014 VW Golf', 'noise') RETURNING id",
                &[&session, &status, &mechanic, &workshop],
            )
            .await
            .unwrap()
            .get(0)
    }

    pub async fn update(
        &self,
        id: Uuid,
        status: &str,
        mechanic: Option<Uuid>,
        workshop: Option<Uuid>,
    ) {
        self.admin
            .execute(
                "UPDATE session_assignments SET status = $2, mechanic_id = $3, workshop_id = $4,
                    updated_at = now() WHERE id = $1",
                &[&id, &status, &mechanic, &workshop],
            )
            .await
            .unwrap();
    }

    /// Inserts a help session owned by `customer`, returning its id.
    pub async fn insert_session(&self, customer: Uuid) -> Uuid {
        let id = Uuid::new_v4();
        self.admin
            .execute(
                "INSERT INTO sessions (id, customer_id, kind) VALUES ($1, $2, 'paid')",
                &[&id, &customer],
            )
            .await
            .unwrap();
        id
    }

    /// A gauge or counter of the gateway's metrics, by its registered name.
    pub fn metric(&self, name: &str) -> f64 {
        let mut registry = prometheus_client::registry::Registry::default();
        self.gateway.metrics().register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines()
            .find_map(|l| {
                let (key, value) = l.split_once(' ')?;
                (key == name || key == format!("{name}_total")).then(|| value.parse().ok())?
            })
            .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
    }

    /// Waits (bounded by `WAIT`) until the metric `name` is at least `value`. The gateway has
    /// no signal for these counters, so the condition is checked again each time the runtime
    /// has run its other tasks (no timer: it returns as soon as the count is reached).
    pub async fn until_metric(&self, name: &str, value: f64, what: &str) {
        let reached = tokio::time::timeout(WAIT, async {
            while self.metric(name) < value {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(
            reached.is_ok(),
            "timed out waiting for {what} ({name} ≥ {value})"
        );
    }

    /// Open WebSocket connections as the gateway counts them.
    /// Waits (bounded by `WAIT`) until exactly `n` connections are open.
    pub async fn until_connections(&self, n: usize, what: &str) {
        let mut open = self.gateway.open_connections();
        tokio::time::timeout(WAIT, open.wait_for(|c| *c == n))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("gateway alive");
    }

    pub fn connections(&self) -> i64 {
        self.metric("pgcast_connections") as i64
    }

    pub async fn log_head(&self) -> i64 {
        self.admin
            .query_one(
                "SELECT coalesce(max(position), 0) FROM pgcast.assignment_events",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Proves that nothing more is on its way to `ws` (authenticated as `who`): follows a topic
    /// of its own for a moment, writes a marker row only that topic and the ones `ws` may
    /// already follow can see, and expects the marker's event as the very next frame. Events
    /// reach one connection in position order, so a late frame of anything written before
    /// would come first; a quiet window would miss it. The marker's topic is then unfollowed
    /// (a second frame of the marker, on a topic `ws` already followed, is skipped).
    ///
    /// The marker row is `declined` for a mechanic (that mechanic's own topic: in no queue, no
    /// workshop, and it makes nobody a member of a session), `cancelled` in a new session of a
    /// customer's own, and `declined` for a made-up mechanic for a service. A test in which
    /// `ws` already follows the marker's topic cannot use this (subscribing again replaces the
    /// subscription): write a marker it can see and call [`Ws::nothing_before`].
    pub async fn nothing_more(&self, ws: &mut Ws, who: &Principal) {
        let (topic, marker) = match who.role {
            Role::Customer => {
                let session = self.insert_session(who.user_id).await;
                let topic = format!("session:{session}");
                ws.subscribe(&topic, json!({})).await;
                (topic, self.insert(session, "cancelled", None, None).await)
            }
            Role::Mechanic | Role::Service => {
                let target = match who.role {
                    Role::Mechanic => who.user_id,
                    _ => Uuid::new_v4(),
                };
                let topic = format!("mechanic:{target}");
                ws.subscribe(&topic, json!({})).await;
                let marker = self
                    .insert(Uuid::new_v4(), "declined", Some(target), None)
                    .await;
                (topic, marker)
            }
        };
        ws.nothing_before(marker).await;
        let id = Uuid::new_v4().to_string();
        ws.send(json!({"type": "unsubscribe", "topic": topic}))
            .await;
        ws.send(json!({"type": "ping", "id": id})).await;
        loop {
            let v = ws.recv().await;
            if v == json!({"type": "pong", "id": id}) {
                return;
            }
            assert_eq!(
                v["assignment"]["id"],
                marker.to_string(),
                "after the marker: {v}"
            );
        }
    }

    /// A general queued row (in every mechanic's queue and on `assignments`) to read up to
    /// with [`Ws::nothing_before`] or [`Ws::until_marker`].
    pub async fn marker(&self) -> Uuid {
        self.insert(Uuid::new_v4(), "queued", None, None).await
    }
}

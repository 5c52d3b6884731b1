//! A real gateway for tests: throwaway PostgreSQL, the real listener, axum on 127.0.0.1:0, and
//! a real tokio-tungstenite client.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::{SinkExt, StreamExt};
use pgcast_events::{Principal, Role};
use pgcast_gateway::{mint_token, Gateway, GatewayConfig};
use pgcast_listener::{migrate, EventLog, Listener, ListenerStatus, MigrationScope, Start};
use pgcast_testkit::{PgCluster, TestDb};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const SECRET: &[u8] = b"gateway-test-secret-of-at-least-32-bytes";
pub const WAIT: Duration = Duration::from_secs(15);

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

pub fn pool(db: &TestDb) -> Pool {
    let manager = Manager::from_config(
        db.pg_config(),
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager).max_size(8).build().expect("pool")
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
        let log = EventLog::new(pool(&db));
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
        mint_token(SECRET, who, Duration::from_secs(600)).unwrap()
    }

    /// A connected, not yet authenticated client.
    pub async fn raw(&self) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(self.url())
            .await
            .expect("websocket connect");
        Ws { ws }
    }

    /// A client authenticated as `who`.
    pub async fn client(&self, who: &Principal) -> Ws {
        let mut ws = self.raw().await;
        ws.send(json!({"type": "auth", "token": self.token(who)}))
            .await;
        let ready = ws.recv().await;
        assert_eq!(ready["type"], "ready", "{ready}");
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
}

pub fn mechanic(workshop: Option<Uuid>) -> Principal {
    Principal {
        user_id: Uuid::new_v4(),
        role: Role::Mechanic,
        workshop_id: workshop,
    }
}

pub fn customer() -> Principal {
    Principal {
        user_id: Uuid::new_v4(),
        role: Role::Customer,
        workshop_id: None,
    }
}

pub fn service() -> Principal {
    Principal {
        user_id: Uuid::new_v4(),
        role: Role::Service,
        workshop_id: None,
    }
}

pub struct Ws {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What the next thing from the server was.
#[derive(Debug)]
pub enum Next {
    Json(Value),
    Close(Option<CloseFrame>),
    /// The TCP connection ended without a close frame.
    Ended,
    Nothing,
}

impl Ws {
    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send");
    }

    /// The next JSON frame or close, skipping pings; `Nothing` after `limit`.
    pub async fn next(&mut self, limit: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Next::Nothing,
                Ok(None) | Ok(Some(Err(_))) => return Next::Ended,
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Next::Json(serde_json::from_str(&t).expect("server sent JSON"))
                }
                Ok(Some(Ok(Message::Close(f)))) => return Next::Close(f),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The next JSON frame; fails the test on anything else within `WAIT`.
    pub async fn recv(&mut self) -> Value {
        match self.next(WAIT).await {
            Next::Json(v) => v,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Asserts that no frame arrives for a short while.
    pub async fn quiet(&mut self) {
        match self.next(Duration::from_millis(300)).await {
            Next::Nothing => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    /// Expects the server to close with `code`.
    pub async fn expect_close(&mut self, code: u16) {
        loop {
            match self.next(WAIT).await {
                Next::Close(Some(f)) => {
                    assert_eq!(u16::from(f.code), code, "close reason: {}", f.reason);
                    return;
                }
                Next::Json(_) => continue,
                other => panic!("expected close {code}, got {other:?}"),
            }
        }
    }

    /// Sends a ping and expects its pong as the very next frame: the connection is usable.
    pub async fn ping(&mut self) {
        let id = Uuid::new_v4().to_string();
        self.send(json!({"type": "ping", "id": id})).await;
        let reply = self.recv().await;
        assert_eq!(reply, json!({"type": "pong", "id": id}));
    }

    /// Expects the next frame to be an `error` with `code`; returns it.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let reply = self.recv().await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], code, "{reply}");
        reply
    }

    /// Sends a subscribe that must fail with `code`; returns the error frame.
    pub async fn subscribe_err(&mut self, topic: &str, code: &str) -> Value {
        self.send(json!({"type": "subscribe", "id": "bad", "topic": topic}))
            .await;
        let reply = self.expect_error(code).await;
        assert_eq!(reply["id"], "bad", "{reply}");
        reply
    }

    /// Subscribes and returns the `subscribed` reply.
    pub async fn subscribe(&mut self, topic: &str, extra: Value) -> Value {
        let mut msg = json!({"type": "subscribe", "id": topic, "topic": topic});
        if let (Some(m), Some(e)) = (msg.as_object_mut(), extra.as_object()) {
            m.extend(e.clone());
        }
        self.send(msg).await;
        let reply = self.recv().await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        assert_eq!(reply["topic"], topic);
        reply
    }

    /// Reads event frames until the one at `position` (or later): the hub has dispatched
    /// every event up to it.
    pub async fn until_position(&mut self, position: i64) {
        loop {
            let ev = self.events(1).await.remove(0);
            if ev["position"].as_i64().is_some_and(|p| p >= position) {
                return;
            }
        }
    }

    /// Unsubscribes from `topic`, confirmed by a ping round trip (frames are handled in
    /// order), so nothing more of it is queued for this connection.
    pub async fn stop_following(&mut self, topic: &str) {
        self.send(json!({"type": "unsubscribe", "topic": topic}))
            .await;
        self.ping().await;
    }

    /// Receives event frames until `n` arrived.
    pub async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let v = match self.next(WAIT).await {
                Next::Json(v) => v,
                other => panic!("after {} of {n} events: {other:?}", got.len()),
            };
            assert_eq!(v["type"], "event", "{v}");
            got.push(v);
        }
        got
    }
}

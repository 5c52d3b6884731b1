//! `pgcast serve`: the listener and the gateway in one process, with HTTP routes, retention,
//! metrics and graceful shutdown.
//!
//! ```text
//!   Listener ──mpsc (8192)──▶ Gateway dispatch ──▶ /ws sockets
//!      │ status                                  /healthz /readyz /metrics  pages + /client.js
//!   pruner: pgcast.prune_events() every minute, one replica at a time (advisory lock in SQL)
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use deadpool_postgres::Pool;
use pgcast_gateway::{Gateway, GatewayConfig, TokenVerifier};
use pgcast_listener::{
    installed_version, migrate, EventLog, ListenerStatus, MigrationScope, Start, SCHEMA_VERSION,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::edge::{Admission, EdgeLimits};
use crate::{Database, PgcastError, TlsServer};

/// Events buffered between the listener and the dispatcher. When full, the listener waits
/// before reading more of the log (the log keeps the events; doorbells are still read, so
/// PostgreSQL's notification queue never fills behind us); nothing is dropped.
const EVENT_BUFFER: usize = 8192;
/// Longest wait at start for the listener to catch up before connections are accepted.
const WARM_UP: Duration = Duration::from_secs(10);
/// Pool for pruning and the database gauges of `/metrics`, apart from the gateway's reads.
const MAINTENANCE_POOL_SIZE: usize = 2;
/// How often the database gauges of `/metrics` are read; a scrape serves the last reading.
const GAUGES_EVERY: Duration = Duration::from_secs(5);
/// Longest wait for one reading of the database gauges.
const GAUGES_TIMEOUT: Duration = Duration::from_secs(4);
/// The listener's own pool: log reads after each doorbell and catch-up after a reconnect.
const LISTENER_POOL_SIZE: usize = 2;
/// How often old log rows are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Rows per prune transaction: short locks, no long vacuum debt.
const PRUNE_BATCH: i32 = 1000;
/// Time the gateway gets to close its sockets at shutdown; the whole exit stays under 10 s.
const SOCKET_GRACE: Duration = Duration::from_secs(7);
/// Time the remaining tasks (listener, pruner, HTTP server) get after that.
const TASK_GRACE: Duration = Duration::from_secs(2);

const PRUNE_SQL: &str = include_str!("../../../sql/prune_events.sql");
const QUEUE_USAGE_SQL: &str = include_str!("../../../sql/doctor_notify_queue.sql");
const LOG_HEAD_SQL: &str = include_str!("../../../sql/log_head.sql");

const CLIENT_JS: &str = include_str!("../../../clients/js/pgcast.js");
const CLIENT_DTS: &str = include_str!("../../../clients/js/pgcast.d.ts");
const APP_CSS: &str = include_str!("../web/app.css");
const MECHANIC_HTML: &str = include_str!("../web/mechanic.html");
const CUSTOMER_HTML: &str = include_str!("../web/customer.html");
const INDEX_HTML: &str = include_str!("../web/index.html");
const FAVICON_SVG: &str = include_str!("../web/favicon.svg");

/// Where the pages mark the spot for what only some servers have (the demo's action API).
const EXTRAS_MARK: &str = "<!-- EXTRAS -->";

/// What `serve` needs, validated by the command line.
#[derive(Clone)]
pub struct ServeOptions {
    /// Database: pools through its URL; the LISTEN connection and `migrate` through its listen
    /// URL (a session of their own, never a transaction pooler).
    pub pg: Database,
    /// HS256 secret of client tokens, at least 32 bytes.
    pub jwt_secret: Vec<u8>,
    /// When set, only tokens with this `iss` are accepted.
    pub jwt_issuer: Option<String>,
    /// When set, only tokens with this `aud` are accepted; when not, a token naming any
    /// audience is refused.
    pub jwt_audience: Option<String>,
    /// Log retention.
    pub retention: Duration,
    /// Apply pending migrations before serving.
    pub migrate: bool,
    /// Links listed on the index page (the demo's ready-made pages), as (label, URL path).
    pub links: Vec<(String, String)>,
}

impl fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeOptions")
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("retention", &self.retention)
            .field("migrate", &self.migrate)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct App {
    status: Arc<ListenerStatus>,
    registry: Arc<Registry>,
    index: Arc<str>,
    mechanic: Arc<str>,
    customer: Arc<str>,
}

/// Routes that only `pgcast demo` serves (its action API), handed to [`serve_with`], and the
/// `<head>` lines that tell the pages about them. `serve` has none, so its pages show no
/// buttons and the routes do not exist there.
pub(crate) struct Extras {
    /// Merged into the router next to pgcast's own routes (no path may overlap).
    pub(crate) routes: Router,
    /// Inserted into the `<head>` of the mechanic and customer pages.
    pub(crate) head: &'static str,
}

/// The limits `serve` applies at its edge (accept, HTTP) and in the gateway; [`Default`] holds
/// the defaults of the flags that set them.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Accept and HTTP limits.
    pub edge: EdgeLimits,
    /// The gateway's settings. Its `jwt_secret`, `jwt_issuer` and `jwt_audience` are ignored
    /// (they come from [`ServeOptions`]); its identity-provider fields (`jwt_public_key`,
    /// `jwt_jwks`, `jwt_claims`) are used as they are.
    pub gateway: GatewayConfig,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            edge: EdgeLimits::default(),
            gateway: GatewayConfig::new(Vec::new()),
        }
    }
}

/// Serves on `tcp` until `shutdown` is cancelled, then closes every WebSocket with 1001 and
/// returns within 10 s. The limits are the defaults ([`serve_limited`] takes others).
pub async fn serve(
    tcp: TcpListener,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> Result<(), PgcastError> {
    serve_limited(tcp, options, Limits::default(), shutdown).await
}

/// [`serve`] with the given limits.
pub async fn serve_limited(
    tcp: TcpListener,
    options: ServeOptions,
    limits: Limits,
    shutdown: CancellationToken,
) -> Result<(), PgcastError> {
    serve_inner(tcp, options, limits, None, None, shutdown).await
}

/// [`serve_limited`], speaking TLS (`https://`, `wss://`) on `tcp` with `tls`'s certificate,
/// which is read again on SIGHUP and when its files change.
pub async fn serve_tls(
    tcp: TcpListener,
    options: ServeOptions,
    limits: Limits,
    tls: TlsServer,
    shutdown: CancellationToken,
) -> Result<(), PgcastError> {
    serve_inner(tcp, options, limits, None, Some(Arc::new(tls)), shutdown).await
}

/// [`serve`], plus the demo's extra routes.
pub(crate) async fn serve_with(
    tcp: TcpListener,
    options: ServeOptions,
    extras: Option<Extras>,
    shutdown: CancellationToken,
) -> Result<(), PgcastError> {
    serve_inner(tcp, options, Limits::default(), extras, None, shutdown).await
}

async fn serve_inner(
    tcp: TcpListener,
    options: ServeOptions,
    limits: Limits,
    extras: Option<Extras>,
    tls: Option<Arc<TlsServer>>,
    shutdown: CancellationToken,
) -> Result<(), PgcastError> {
    let mut gateway_config = limits.gateway.clone();
    gateway_config.jwt_secret = options.jwt_secret.clone();
    gateway_config.jwt_issuer = options.jwt_issuer.clone();
    gateway_config.jwt_audience = options.jwt_audience.clone();
    // Refuse a weak secret before touching the database; `Gateway::new` checks it again.
    TokenVerifier::from_config(&gateway_config).map_err(PgcastError::Gateway)?;
    // Read the identity provider's keys now rather than on the first token. Not fatal: the
    // first token with an unknown `kid` reads them again.
    if let Some(jwks) = &gateway_config.jwt_jwks {
        if let Err(error) = jwks.refresh().await {
            tracing::warn!(%error, url = jwks.url(), "could not read the identity provider's keys; trying again when a token needs them");
        }
    }
    let pool = crate::db::pool(options.pg.url(), MAINTENANCE_POOL_SIZE)?;
    {
        let mut client = crate::db::connect(options.pg.listen_url(), "pgcast-serve").await?;
        if options.migrate {
            let applied = migrate(&mut client, MigrationScope::All).await?;
            tracing::info!(applied, "migrations applied");
        }
        match installed_version(&client).await? {
            None => return Err(PgcastError::NotInstalled),
            Some(v) if v < SCHEMA_VERSION => {
                return Err(PgcastError::SchemaTooOld {
                    installed: v,
                    expected: SCHEMA_VERSION,
                })
            }
            Some(v) if v > SCHEMA_VERSION => tracing::warn!(
                installed = v,
                expected = SCHEMA_VERSION,
                "the database has newer pgcast SQL objects than this binary"
            ),
            Some(_) => {}
        }
    }

    // The gateway's reads (snapshots, replays older than its window, access checks) have a
    // pool of their own, as many connections as reads it lets run at once.
    let log = EventLog::new(crate::db::pool(
        options.pg.url(),
        gateway_config.max_concurrent_reads.max(1),
    )?);
    // The listener's stream and the gateway's notion of "now" start at the same position, so a
    // live subscription made before the first event is told a position it can resume from. It
    // starts `replay_window` events back: catching up on them fills the replay window, so the
    // clients of a restarted replica resume without a database read each.
    let start = log.window_start(gateway_config.replay_window).await?;
    let gateway = Gateway::new(gateway_config, log.clone()).map_err(PgcastError::Gateway)?;
    // The listener reads the log through a pool of its own: no amount of client snapshots and
    // replays can stall live events behind them.
    let listener_log = EventLog::new(crate::db::pool(options.pg.url(), LISTENER_POOL_SIZE)?);
    let listener = crate::db::listener(options.pg.listen_url(), listener_log)?;
    let status = listener.status();
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    tasks.spawn(listener.run(Start::After(start), tx, stop.clone()));
    gateway.spawn_dispatch(rx, start);
    tasks.spawn(prune_loop(pool.clone(), options.retention, stop.clone()));

    let admission = Admission::new(limits.edge);
    let mut registry = Registry::default();
    gateway.metrics().register(&mut registry);
    admission.register(&mut registry);
    let queue_usage = Gauge::<f64, AtomicU64>::default();
    registry.register(
        "pgcast_notification_queue_usage",
        "pg_notification_queue_usage() of the database (0..1), read every 5 s",
        queue_usage.clone(),
    );
    let log_head = Gauge::default();
    registry.register(
        "pgcast_log_head_position",
        "Highest position in pgcast.assignment_events (read every 5 s)",
        log_head.clone(),
    );
    let gauges_age = Gauge::<f64, AtomicU64>::default();
    registry.register(
        "pgcast_database_gauges_age_seconds",
        "Seconds since the database gauges (queue usage, log head) were last read successfully",
        gauges_age.clone(),
    );
    registry.register_collector(Box::new(ListenerCollector(status.clone())));

    tasks.spawn(gauges_loop(
        pool.clone(),
        DatabaseGauges {
            queue_usage: queue_usage.clone(),
            log_head: log_head.clone(),
            age: gauges_age.clone(),
        },
        stop.clone(),
    ));
    let app = App {
        status: status.clone(),
        registry: Arc::new(registry),
        index: render_index(&options.links).into(),
        mechanic: render_page(MECHANIC_HTML, extras.as_ref()).into(),
        customer: render_page(CUSTOMER_HTML, extras.as_ref()).into(),
    };
    let mut router = gateway.router().merge(routes(app));
    if let Some(extras) = extras {
        router = router.merge(extras.routes);
    }
    let addr = tcp.local_addr().map_err(PgcastError::Bind)?;
    let acceptor = match &tls {
        Some(tls) => {
            let reloader = tls.reloader(stop.clone()).map_err(|e| {
                PgcastError::Tls(format!("could not install the SIGHUP handler: {e}"))
            })?;
            tasks.spawn(reloader);
            Some(tls.acceptor())
        }
        None => None,
    };
    // Accept only once the listener has caught up (its start filled the replay window), for
    // at most WARM_UP: clients that reconnect to a restarted replica wait in the accept backlog
    // for a moment instead of subscribing while the window is filled, which would queue every
    // warm-up event for each of them (thousands of clients × thousands of events).
    tokio::select! {
        () = status.wait_ready() => {}
        () = tokio::time::sleep(WARM_UP) => {
            tracing::warn!("the listener has not caught up yet; serving anyway");
        }
        () = shutdown.cancelled() => {}
    }
    tasks.spawn(crate::edge::serve_http(
        tcp,
        router,
        admission,
        limits.gateway.frame_timeout,
        acceptor,
        shutdown.clone(),
    ));
    match tls {
        Some(_) => tracing::info!("pgcast ready on https://{addr} (WebSocket wss://{addr}/ws)"),
        None => tracing::info!("pgcast ready on http://{addr} (WebSocket ws://{addr}/ws)"),
    }

    shutdown.cancelled().await;
    tracing::info!("shutting down: closing WebSocket connections with 1001");
    if !gateway.shutdown(SOCKET_GRACE).await {
        tracing::warn!("some WebSocket connections did not close in time");
    }
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(TASK_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop in time");
    }
    Ok(())
}

/// Connections the kernel may hold for `accept` (it caps this at `net.core.somaxconn`). After
/// a restart, thousands of clients reconnect within a second; with tokio's default of 1,024 the
/// excess SYNs are dropped and those clients wait for their 1 s retransmission.
const LISTEN_BACKLOG: u32 = 8192;

/// Binds `addr` with a deep accept backlog, with an error that names it.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, PgcastError> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As `TcpListener::bind` does: a restarted process rebinds while old connections of
        // its predecessor are in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| PgcastError::Listen { addr, source })
}

fn routes(app: App) -> Router {
    fn asset(content_type: &'static str, body: &'static str) -> Response {
        ([(header::CONTENT_TYPE, content_type)], body).into_response()
    }
    Router::new()
        .route(
            "/",
            get(|State(app): State<App>| async move { Html(app.index.to_string()) }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/client.js",
            get(|| async { asset("text/javascript; charset=utf-8", CLIENT_JS) }),
        )
        .route(
            "/client.d.ts",
            get(|| async { asset("text/plain; charset=utf-8", CLIENT_DTS) }),
        )
        .route(
            "/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        // Without an icon of their own, browsers ask for /favicon.ico and log its 404.
        .route(
            "/favicon.svg",
            get(|| async { asset("image/svg+xml", FAVICON_SVG) }),
        )
        .route(
            "/favicon.ico",
            get(|| async { asset("image/svg+xml", FAVICON_SVG) }),
        )
        .route(
            "/mechanic",
            get(|State(app): State<App>| async move { Html(app.mechanic.to_string()) }),
        )
        .route(
            "/customer",
            get(|State(app): State<App>| async move { Html(app.customer.to_string()) }),
        )
        .with_state(app)
}

/// Ready while the listener is connected and caught up: a load balancer then sends clients
/// only to replicas that deliver live events.
async fn readyz(State(app): State<App>) -> Response {
    if app.status.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "listener not connected or catching up\n",
        )
            .into_response()
    }
}

/// A scrape never touches the database: the database gauges are read in the background
/// ([`gauges_loop`]), so a slow database or a busy pool cannot hang it.
async fn metrics(State(app): State<App>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &app.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Listener state as metrics, read from its atomics at scrape time.
#[derive(Debug)]
struct ListenerCollector(Arc<ListenerStatus>);

impl Collector for ListenerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let s = self.0.snapshot();
        let counters = [
            (
                "pgcast_listener_notifications",
                "Doorbells (notifications) received on the LISTEN connection",
                s.notifications,
            ),
            (
                "pgcast_listener_ignored_payloads",
                "Notifications that carried a payload (pgcast's doorbell is empty): forged, \
                 garbled or from an older trigger; ignored, they only woke the listener",
                s.ignored_payloads,
            ),
            (
                "pgcast_events_received",
                "Events the listener read from the log and emitted",
                s.events,
            ),
            (
                "pgcast_listener_decode_errors",
                "Log rows that could not be decoded and were skipped",
                s.decode_errors,
            ),
            (
                "pgcast_listener_reconnects",
                "Times the LISTEN connection was lost and re-established",
                s.reconnects,
            ),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let lag_seconds = if s.last_committed_micros > 0 {
            let now = chrono::Utc::now().timestamp_micros();
            (now - s.last_committed_micros).max(0) as f64 / 1e6
        } else {
            0.0
        };
        let gauges = [
            (
                "pgcast_listener_connected",
                "1 while the LISTEN connection is up and caught up",
                i64::from(s.caught_up),
            ),
            (
                "pgcast_listener_position",
                "Position of the last event the listener emitted",
                s.last_position,
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        // Alive tokio tasks: the soak test watches this for leaks (one per connection, plus
        // a handful for the listener, dispatcher, pruner and HTTP server).
        let tasks = tokio::runtime::Handle::try_current()
            .map(|h| i64::try_from(h.metrics().num_alive_tasks()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let g = ConstGauge::new(tasks);
        g.encode(encoder.encode_descriptor(
            "pgcast_tokio_alive_tasks",
            "Tasks alive in the process's tokio runtime",
            None,
            g.metric_type(),
        )?)?;
        let g = ConstGauge::new(lag_seconds);
        g.encode(encoder.encode_descriptor(
            "pgcast_listener_last_event_age_seconds",
            "Seconds since the commit of the last event the listener emitted",
            None,
            g.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The gauges of `/metrics` read from the database.
struct DatabaseGauges {
    queue_usage: Gauge<f64, AtomicU64>,
    log_head: Gauge,
    /// Seconds since the last successful reading.
    age: Gauge<f64, AtomicU64>,
}

/// Reads the database gauges every [`GAUGES_EVERY`] until `stop`; a failed or slow reading
/// keeps the last values, and their age shows it.
async fn gauges_loop(pool: Pool, gauges: DatabaseGauges, stop: CancellationToken) {
    // Before the first reading, the age counts from the start.
    let mut last_read = std::time::Instant::now();
    let mut tick = tokio::time::interval(GAUGES_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let read = async {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            let usage: f64 = client
                .query_one(QUEUE_USAGE_SQL, &[])
                .await
                .and_then(|row| row.try_get(0))
                .map_err(|e| e.to_string())?;
            let head: i64 = client
                .query_one(LOG_HEAD_SQL, &[])
                .await
                .and_then(|row| row.try_get(0))
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((usage, head))
        };
        let result = tokio::select! {
            r = tokio::time::timeout(GAUGES_TIMEOUT, read) => r,
            () = stop.cancelled() => return,
        };
        match result {
            Ok(Ok((usage, head))) => {
                gauges.queue_usage.set(usage);
                gauges.log_head.set(head);
                last_read = std::time::Instant::now();
            }
            Ok(Err(error)) => tracing::debug!(%error, "reading the database gauges failed"),
            Err(_) => tracing::debug!("reading the database gauges timed out"),
        }
        gauges.age.set(last_read.elapsed().as_secs_f64());
    }
}

/// Deletes log rows older than `retention` in small batches. Several replicas may run this;
/// the SQL function lets one at a time work and the others skip.
async fn prune_loop(pool: Pool, retention: Duration, stop: CancellationToken) {
    let seconds = retention.as_secs_f64();
    loop {
        let mut total = 0u64;
        loop {
            let result = async {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                let row = client
                    .query_one(PRUNE_SQL, &[&seconds, &PRUNE_BATCH])
                    .await
                    .map_err(|e| e.to_string())?;
                row.try_get::<_, i32>(0).map_err(|e| e.to_string())
            }
            .await;
            match result {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(error) => {
                    tracing::warn!(%error, "pruning the event log failed; retrying later");
                    break;
                }
            }
            if stop.is_cancelled() {
                return;
            }
        }
        if total > 0 {
            tracing::info!(rows = total, "pruned old events from the log");
        }
        tokio::select! {
            () = tokio::time::sleep(PRUNE_EVERY) => {}
            () = stop.cancelled() => return,
        }
    }
}

fn render_index(links: &[(String, String)]) -> String {
    let items: String = links
        .iter()
        .map(|(label, href)| {
            format!(
                "<li><a href=\"{}\">{}</a></li>\n",
                escape(href),
                escape(label)
            )
        })
        .collect();
    let section = if items.is_empty() {
        String::new()
    } else {
        format!("<h2>Demo pages</h2>\n<ul class=\"links\">\n{items}</ul>\n")
    };
    INDEX_HTML.replace("<!-- LINKS -->", &section)
}

/// A page with the extras' `<head>` lines in place of its mark (or just without the mark).
fn render_page(html: &str, extras: Option<&Extras>) -> String {
    html.replace(EXTRAS_MARK, extras.map_or("", |e| e.head))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

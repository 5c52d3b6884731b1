//! `pgcast serve`: the wiring of one process — the listener, the gateway, retention and the
//! database gauges (all from `pgcast-listener` and `pgcast-gateway`) — with its HTTP routes
//! and graceful shutdown.
//!
//! ```text
//!   Listener ──mpsc (8192)──▶ Gateway dispatch ──▶ /ws sockets
//!      │ status                                  /healthz /readyz /metrics  pages + /client.js
//!   pgcast_listener::prune: pgcast.prune_events() every minute, one replica at a time
//!   ListenerMetrics::read_database: queue usage and log head every 5 s, for /metrics
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use deadpool_postgres::Pool;
use pgcast_events::Position;
use pgcast_gateway::{Gateway, GatewayConfig, TokenVerifier};
use pgcast_listener::{
    installed_version, migrate, EventLog, ListenerMetrics, ListenerStatus, MigrationScope, Start,
    SCHEMA_VERSION,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
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
/// Longest wait at start for the listener to catch up before connections are served.
const WARM_UP: Duration = Duration::from_secs(10);
/// Pool for pruning and the database gauges of `/metrics`, apart from the gateway's reads.
const MAINTENANCE_POOL_SIZE: usize = 2;
/// The listener's own pool: log reads after each doorbell and catch-up after a reconnect.
const LISTENER_POOL_SIZE: usize = 2;
/// Time the gateway gets to close its sockets at shutdown; the whole exit stays under 10 s.
const SOCKET_GRACE: Duration = Duration::from_secs(7);
/// Time the remaining tasks (listener, pruner, HTTP server) get after that.
const TASK_GRACE: Duration = Duration::from_secs(2);

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

/// What `serve` does before it binds anything to the listener: the identity provider's keys,
/// migrations (with `--migrate`), the installed version, and where the listener's stream
/// starts. Returns the maintenance pool, the gateway's log and that start.
async fn start_up(
    options: &ServeOptions,
    gateway_config: &GatewayConfig,
) -> Result<(Pool, EventLog, Position), PgcastError> {
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
    Ok((pool, log, start))
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
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    // Every return from here on stops what was spawned (an error before serving included).
    let _stop_on_return = stop.clone().drop_guard();
    // The certificate's reloader first: a SIGHUP (a renewal hook) during start-up must not end
    // the process, which is the signal's default action until its handler is installed.
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
    // Start-up waits on the network (the identity provider, the database, the migration lock
    // of other replicas starting at once): a signal meanwhile stops it, as it stops the server.
    let starting = start_up(&options, &gateway_config);
    let (pool, log, start) = tokio::select! {
        started = starting => started?,
        () = shutdown.cancelled() => {
            tracing::info!("stopped while starting");
            return Ok(());
        }
    };
    let gateway = Gateway::new(gateway_config, log.clone()).map_err(PgcastError::Gateway)?;
    // The listener reads the log through a pool of its own: no amount of client snapshots and
    // replays can stall live events behind them.
    let listener_log = EventLog::new(crate::db::pool(options.pg.url(), LISTENER_POOL_SIZE)?);
    let listener = crate::db::listener(options.pg.listen_url(), listener_log)?;
    let status = listener.status();
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    tasks.spawn(listener.run(Start::After(start), tx, stop.clone()));
    gateway.spawn_dispatch(rx, start);
    tasks.spawn(pgcast_listener::prune(
        pool.clone(),
        options.retention,
        stop.clone(),
    ));

    let admission = Admission::new(limits.edge);
    let mut registry = Registry::default();
    gateway.metrics().register(&mut registry);
    admission.register(&mut registry);
    let database_metrics = ListenerMetrics::new(status.clone());
    database_metrics.register(&mut registry);
    registry.register_collector(Box::new(TasksCollector));
    tasks.spawn(database_metrics.read_database(pool, stop.clone()));
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
    // Serve only once the listener has caught up (its start filled the replay window), for
    // at most WARM_UP: clients that reconnect to a restarted replica are accepted and wait for
    // a moment instead of subscribing while the window is filled, which would queue every
    // warm-up event for each of them (thousands of clients × thousands of events).
    let (open, opened) = tokio::sync::watch::channel(false);
    tasks.spawn(crate::edge::serve_http(
        tcp,
        router,
        admission,
        limits.gateway.frame_timeout,
        acceptor,
        opened,
        shutdown.clone(),
    ));
    tokio::select! {
        () = status.wait_ready() => {}
        () = tokio::time::sleep(WARM_UP) => {
            tracing::warn!("the listener has not caught up yet; serving anyway");
        }
        () = shutdown.cancelled() => {}
    }
    open.send_replace(true);
    match tls {
        _ if shutdown.is_cancelled() => {}
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
/// a restart, thousands of clients reconnect within a second; with tokio's default of 128 (as
/// std's) the excess SYNs are dropped and those clients wait for their 1 s retransmission.
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
        .layer(axum::middleware::map_response(page_headers))
        .with_state(app)
}

/// What every page and asset says to the browser: render nothing as another type than it is
/// declared (`nosniff`), never inside another site's frame (the pages act for the user whose
/// token they hold), and send no `Referer` from them.
async fn page_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
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
/// ([`ListenerMetrics::read_database`]), so a slow database or a busy pool cannot hang it.
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

/// Alive tokio tasks: the soak test watches this for leaks (one per connection, plus a
/// handful for the listener, dispatcher, pruner and HTTP server).
#[derive(Debug)]
struct TasksCollector;

impl Collector for TasksCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
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
        Ok(())
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

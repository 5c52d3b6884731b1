//! pgcast's WebSocket gateway: it owns everything between the ordered event stream of the
//! listener and the browsers — protocol v1, authentication, who-sees-what, snapshots, replay,
//! live fan-out and slow-consumer handling.
//!
//! ```text
//!  Listener ──mpsc<Output>──▶ dispatch task ──▶ ReplayWindow (newest events)
//!                                                  └──────────▶ Hub (RouteKey → subscriptions)
//!                                                               │ push to each outbox, never waits
//!                                                               ▼ (frame serialized once per topic)
//!  GET /ws ──upgrade──▶ connection task: auth ▸ select!{ client frame | outbox batch | ping | exp }
//!                          │ subscribe: register in Hub, then snapshot (REPEATABLE READ)
//!                          │            or replay from the window or the log, drop duplicates
//!                          │            by position
//!                          │ every frame: committed before the token's exp? a mechanic on
//!                          ▼ session:<id> still a member at that position? (else revoked)
//!                       socket  (outbox over budget → 4008; exp → 4001; shutdown → 1001)
//! ```
//!
//! Access is a property of each event, not of the subscription: the claims decide which topics
//! may be asked for, the rows as they stood at the event's position decide what is sent, and
//! the token's lifetime bounds both (a second `auth` frame refreshes it).
//!
//! Every task the gateway starts is tracked: [`Gateway::shutdown`] cancels them, closes every
//! socket with 1001 and waits for them within a grace period.

mod auth;
mod config;
mod connection;
mod db;
mod edge;
mod error;
mod hub;
mod jwks;
mod keys;
mod metrics;
mod outbox;
#[cfg(test)]
mod test_events;
mod window;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use axum::Router;
use pgcast_listener::{EventLog, Output};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::outbox::Eviction;

pub use auth::{
    mint_token, ClaimMapping, ClaimPointer, RoleMap, TokenMinter, TokenVerifier, Verified,
    MIN_SECRET_BYTES,
};
pub use config::GatewayConfig;
pub use edge::{ip_key, FrameClock, FrameDeadline, Peer};
pub use error::GatewayError;
pub use jsonwebtoken::Algorithm;
pub use jwks::{parse_url as parse_jwks_url, Jwks, JwksSettings};
pub use keys::{public_key_algorithm, PublicKey, PUBLIC_KEY_ALGORITHMS};
pub use metrics::GatewayMetrics;

/// State shared by the gateway's tasks.
struct Shared {
    config: GatewayConfig,
    verifier: TokenVerifier,
    log: EventLog,
    hub: hub::Hub,
    metrics: GatewayMetrics,
    /// Open connections; an upgrade without a permit is refused with 503.
    connection_slots: Arc<Semaphore>,
    /// Connections upgraded and not yet authenticated, process-wide; an upgrade without a
    /// permit is refused with 503.
    unauthenticated: Arc<Semaphore>,
    /// The same, per peer address.
    unauthenticated_by_ip: Arc<edge::UnauthenticatedByIp>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Open connections, for callers that wait for a count instead of polling the gauge.
    open: tokio::sync::watch::Sender<usize>,
    /// The newest events, for `since` replays without a database read.
    window: window::ReplayWindow,
    /// Database reads in flight (`max_concurrent_reads`); a subscribe waits for a permit in
    /// arrival order (tokio's semaphore is fair), one place per connection at a time.
    reads: Semaphore,
}

/// The WebSocket gateway. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    /// A gateway reading snapshots and replays through `log`'s pool. Refuses a configuration
    /// it cannot run safely with (a JWT secret shorter than [`MIN_SECRET_BYTES`], an empty
    /// issuer or audience), so a weak secret never reaches a running gateway.
    pub fn new(config: GatewayConfig, log: EventLog) -> Result<Self, GatewayError> {
        let metrics = GatewayMetrics::default();
        Ok(Gateway {
            shared: Arc::new(Shared {
                verifier: TokenVerifier::from_config(&config)?,
                connection_slots: Arc::new(Semaphore::new(config.max_connections)),
                window: window::ReplayWindow::new(config.replay_window),
                reads: Semaphore::new(config.max_concurrent_reads.max(1)),
                unauthenticated: Arc::new(Semaphore::new(config.max_unauthenticated)),
                unauthenticated_by_ip: Default::default(),
                // Never below one connection's budget (a total of 0 would evict every queue).
                hub: hub::Hub::new(
                    metrics.clone(),
                    config.outbound_bytes_total.max(config.outbound_bytes),
                ),
                metrics,
                log,
                config,
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
                open: tokio::sync::watch::channel(0).0,
            }),
        })
    }

    /// The gateway's metrics, to register in the process's registry.
    pub fn metrics(&self) -> &GatewayMetrics {
        &self.shared.metrics
    }

    /// Follows the number of open WebSocket connections.
    pub fn open_connections(&self) -> tokio::sync::watch::Receiver<usize> {
        self.shared.open.subscribe()
    }

    /// Routes: `GET /ws`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/ws", get(upgrade))
            .with_state(self.shared.clone())
    }

    /// Starts fanning out `events` (the listener's output) to subscribers. `after` is where
    /// the listener's stream starts (its first event is the first after it): a live
    /// subscription made before that event is told `after` as its position. Every event also
    /// enters the replay window (`replay_window` of them are kept), so starting the stream
    /// that many events before the log's head warms it for clients resuming after a restart.
    /// A gap in the stream ([`Output::Gap`]) closes every subscribed connection with 1001 so
    /// that it resumes and is told `resync`. The task ends when the listener's sender is
    /// dropped or at shutdown.
    pub fn spawn_dispatch(
        &self,
        mut events: mpsc::Receiver<Output>,
        after: pgcast_events::Position,
    ) {
        self.shared.window.start_after(after);
        self.shared.hub.start_after(after);
        let shared = self.shared.clone();
        self.shared.tasks.spawn(async move {
            loop {
                tokio::select! {
                    output = events.recv() => match output {
                        Some(Output::Event(event)) => {
                            // Window first: a subscriber told the hub's head finds every event
                            // up to it in the window.
                            shared.window.push(&event);
                            shared.hub.dispatch(&event);
                        }
                        Some(Output::Gap { after, pruned_through }) => {
                            // Events after `after` are gone (or, with `pruned_through` below
                            // it, the log went back and its positions are drawn again). The
                            // window and the hub start again after the gap, so a resume from before it is answered
                            // from the log (`resync`), never as if nothing had been missed;
                            // every connection that followed the stream closes (1001) and
                            // resumes. Before any event after the gap is dispatched.
                            if pruned_through < after {
                                shared.hub.redrawn_after(pruned_through, after);
                            }
                            shared.window.start_after(pruned_through);
                            shared.hub.start_after(pruned_through);
                            let evicted = shared.hub.evict_all(Eviction::Gap);
                            tracing::warn!(
                                after,
                                pruned_through,
                                connections = evicted,
                                "gap in the event stream: subscribed connections closed to resume"
                            );
                        }
                        Some(Output::Undecodable { position, committed_at, session_id }) => {
                            // Sent to nobody; a mechanic's membership of the session it
                            // names can no longer be judged from here on.
                            let committed = committed_at.map(|at| at.timestamp_micros());
                            shared.hub.undecodable(position, committed, session_id);
                        }
                        None => return,
                    },
                    () = shared.shutdown.cancelled() => return,
                }
            }
        });
    }

    /// Stops accepting connections, closes every socket with 1001 and waits up to `grace` for
    /// the gateway's tasks. Returns false if some did not finish in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.shared.connection_slots.close();
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        tokio::time::timeout(grace, self.shared.tasks.wait())
            .await
            .is_ok()
    }
}

async fn upgrade(
    State(shared): State<Arc<Shared>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !origin_allowed(&shared.config.allowed_origins, &headers) {
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let Ok(permit) = shared.connection_slots.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    };
    // Refused before the upgrade: a flood of sockets that never authenticate cannot hold
    // every slot, and one address cannot hold every unauthenticated slot.
    let Ok(unauthenticated) = shared.unauthenticated.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many unauthenticated connections",
        )
            .into_response();
    };
    let peer = peer.map(|Extension(peer)| peer);
    let slot = match &peer {
        Some(peer) => match shared.unauthenticated_by_ip.acquire(
            peer.addr.ip(),
            shared.config.max_unauthenticated_per_ip,
            unauthenticated,
        ) {
            Some(slot) => slot,
            None => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many unauthenticated connections from this address",
                )
                    .into_response()
            }
        },
        None => edge::UnauthenticatedSlot::global(unauthenticated),
    };
    let slot = Arc::new(slot);
    let admission = edge::Admission {
        unauthenticated: slot.clone(),
        frames: peer.map(|p| p.frames),
    };
    let config = &shared.config;
    let tasks = shared.tasks.clone();
    ws.max_message_size(config.max_frame_bytes)
        .max_frame_size(config.max_frame_bytes)
        .read_buffer_size(config.read_buffer_bytes)
        .on_upgrade(move |socket| {
            tasks.track_future(async move {
                shared.open.send_modify(|n| *n += 1);
                let auth_timeout = shared.config.auth_timeout;
                let serve = connection::serve(socket, shared.clone(), admission);
                tokio::pin!(serve);
                // A socket still open after its auth deadline has authenticated (the
                // connection closes those that did not), so its slot is free by then even
                // where the connection task does not report its `auth` earlier.
                tokio::select! {
                    () = &mut serve => {}
                    () = tokio::time::sleep(auth_timeout) => {
                        slot.release();
                        serve.await;
                    }
                }
                drop(slot);
                // Free the slot before the count drops, so a caller that saw the count fall
                // can connect again.
                drop(permit);
                shared.open.send_modify(|n| *n -= 1);
            })
        })
}

/// Browsers always send `Origin`; other clients usually do not and are let through (they
/// still need a token). With no configured origins, every origin is allowed.
fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    if allowed.is_empty() {
        return true;
    }
    match headers.get(header::ORIGIN).map(|o| o.to_str()) {
        None => true,
        Some(Ok(origin)) => allowed.iter().any(|a| a == origin),
        Some(Err(_)) => false,
    }
}

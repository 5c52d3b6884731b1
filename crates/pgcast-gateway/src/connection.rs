//! One WebSocket connection: authentication, then a single task that reads client frames,
//! writes queued event frames and heartbeats under one `select!`.
//!
//! Access is decided per event, not once: a frame is written only if the token has not expired
//! by the event's commit time, and a mechanic on `session:<id>` receives an event only while the
//! session's rows, at that event's position, make them a member.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::stream::{Peekable, SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use pgcast_events::{
    Access, AssignmentEvent, ClientMessage, ErrorCode, EventFrame, Position, Principal, Role,
    ServerMessage, SessionMembership, Topic, Verdict,
};
use pgcast_listener::LogHead;
use tokio_util::sync::CancellationToken;

use crate::hub::{Outbound, Subscription};
use crate::outbox::Outbox;
use crate::{db, Shared, Verified};

/// Close codes of protocol v1 (design §4).
pub(crate) mod close {
    /// Server shutting down.
    pub(crate) const GOING_AWAY: u16 = 1001;
    /// Authentication failed or missing.
    pub(crate) const POLICY: u16 = 1008;
    /// A frame or message over the size limit.
    pub(crate) const TOO_BIG: u16 = 1009;
    /// The token expired without a refresh; reconnect with a fresh token and `since`.
    pub(crate) const TOKEN_EXPIRED: u16 = 4001;
    /// The outgoing queue overflowed; resume with `since`.
    pub(crate) const SLOW_CONSUMER: u16 = 4008;
}

/// Log rows per replay query.
const REPLAY_PAGE: i64 = 1000;
/// Frames written before one flush when the queue has several waiting.
const WRITE_BATCH: usize = 64;
/// A close frame that cannot be written in this time is abandoned with the socket (the peer
/// then sees the connection end without one).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A slow consumer's close frame waits behind everything already in its socket buffers, so it
/// gets longer: a client that reads again within this time still learns the reason (4008).
const SLOW_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

type Sink = SplitSink<WebSocket, Message>;
/// Client frames. Lent out (`None`) only while a subscribe waits, to watch for the peer leaving.
type Stream = Option<Peekable<SplitStream<WebSocket>>>;

/// Why the connection ends.
enum End {
    /// Close with this code and reason.
    Close(u16, &'static str),
    /// The peer is gone or the socket broke: nothing more to write.
    Gone,
    /// The token expired: tell the client (`token_expired`), then close with 4001.
    Expired,
}

struct ActiveSub {
    sub: Arc<Subscription>,
    /// Frames at or below this position were already sent (by snapshot or replay) and are
    /// dropped when they arrive from the live queue.
    delivered_through: Position,
    /// A mechanic on `session:<id>`: their membership at `delivered_through`, moved by every
    /// later event of the session.
    membership: Option<SessionMembership>,
}

/// A subscription filed in the hub that is unfiled when this is dropped, unless kept.
struct Registered {
    shared: Arc<Shared>,
    sub: Option<Arc<Subscription>>,
}

impl Registered {
    /// The subscription started: it stays filed (the connection unfiles it when it ends).
    fn keep(mut self) {
        self.sub = None;
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(sub) = self.sub.take() {
            self.shared.hub.unsubscribe(&sub);
        }
    }
}

/// Why a `since` that the log no longer covers gets `resync`.
const PRUNED: &str = "since is older than the retained event log";

/// Why a `queue` resume older than the replay window gets `resync`.
const OLDER_THAN_WINDOW: &str =
    "since is older than the replay window; the queue is its open rows: take a snapshot";

/// Why a subscription is revoked after a membership change.
const NO_LONGER_ASSIGNED: &str = "no longer assigned to this session";

/// Unix time in microseconds, on the same scale as events' commit times.
fn unix_micros(seconds: u64) -> i64 {
    i64::try_from(seconds)
        .unwrap_or(i64::MAX)
        .saturating_mul(1_000_000)
}

/// The monotonic instant at which a token with `exp` = `expires_at` stops being accepted.
fn expiry_instant(expires_at: u64, leeway: Duration) -> tokio::time::Instant {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let left = Duration::from_secs(expires_at).saturating_sub(now) + leeway;
    // Far-future `exp` values must not overflow the timer.
    tokio::time::Instant::now() + left.min(Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Serves one upgraded socket until it closes.
pub(crate) async fn serve(socket: WebSocket, shared: Arc<Shared>) {
    shared.metrics.connections.inc();
    let (sink, stream) = socket.split();
    let mut conn = Connection {
        outbox: Arc::new(Outbox::new(shared.config.outbound_bytes)),
        shutdown: shared.shutdown.child_token(),
        shared,
        sink,
        stream: Some(stream.peekable()),
        subs: Vec::new(),
        batch: Vec::new(),
        principal: None,
        expires_at: 0,
        last_heard: Instant::now(),
        last_written: Instant::now(),
        tokens: 0.0,
        tokens_at: Instant::now(),
    };
    let mut end = conn.run().await;
    if let End::Expired = end {
        let reply = ServerMessage::Error {
            id: None,
            code: ErrorCode::TokenExpired,
            message: "token expired: reconnect with a fresh token and since".to_owned(),
        };
        end = match conn.send(reply).await {
            Ok(()) => End::Close(close::TOKEN_EXPIRED, "token expired"),
            Err(end) => end,
        };
    }
    for s in conn.subs.drain(..) {
        conn.shared.hub.unsubscribe(&s.sub);
    }
    conn.outbox.close();
    if let End::Close(code, reason) = end {
        let mut wait = CLOSE_TIMEOUT;
        if code == close::SLOW_CONSUMER {
            conn.shared.metrics.slow_closes.inc();
            wait = SLOW_CLOSE_TIMEOUT;
        }
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        // Shutdown must not wait on one peer: it ends the wait early.
        let shutdown = conn.shared.shutdown.clone();
        tokio::select! {
            _ = tokio::time::timeout(wait, conn.sink.send(frame)) => {}
            () = shutdown.cancelled(), if code != close::GOING_AWAY => {}
        }
    }
    conn.shared.metrics.connections.dec();
}

struct Connection {
    shared: Arc<Shared>,
    /// Event frames the hub queued for this connection.
    outbox: Arc<Outbox>,
    shutdown: CancellationToken,
    sink: Sink,
    stream: Stream,
    subs: Vec<ActiveSub>,
    /// Frames picked for one write; kept to reuse its allocation.
    batch: Vec<Utf8Bytes>,
    principal: Option<Principal>,
    /// `exp` of the current token (unix seconds). Nothing committed after it is written, and
    /// the connection closes with 4001 at `exp` + leeway unless a new `auth` frame refreshed it.
    expires_at: u64,
    /// The last client frame (a pong included).
    last_heard: Instant,
    /// The last time a batch of event frames went into the socket: a peer still taking them
    /// is alive even when its pong waits behind megabytes of backlog.
    last_written: Instant,
    /// Token bucket of the client frame rate limit.
    tokens: f64,
    tokens_at: Instant,
}

impl Connection {
    async fn run(&mut self) -> End {
        let verified = match self.authenticate().await {
            Ok(v) => v,
            Err(end) => {
                self.shared.metrics.auth_failures.inc();
                return end;
            }
        };
        self.principal = Some(verified.principal);
        self.expires_at = verified.expires_at;
        if let Err(end) = self.send(self.ready()).await {
            return end;
        }
        self.tokens = self.burst();
        let interval = self.shared.config.heartbeat_interval;
        let leeway = self.shared.config.token_leeway;
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut expiry_set = self.expires_at;
        let expiry = tokio::time::sleep_until(expiry_instant(expiry_set, leeway));
        tokio::pin!(expiry);
        // Made once and polled on every turn: a `cancelled()` made per turn would register and
        // unregister a waiter (a lock each) on every event delivered.
        let (shutdown, slow) = (self.shutdown.clone(), self.outbox.slow.clone());
        let outbox = self.outbox.clone();
        // Entries taken from the outbox for one write; the allocation is reused.
        let mut taken = Vec::with_capacity(WRITE_BATCH);
        let shutting_down = shutdown.cancelled();
        let declared_slow = slow.cancelled();
        tokio::pin!(shutting_down, declared_slow);
        loop {
            let step = tokio::select! {
                biased;
                () = &mut shutting_down => Err(End::Close(close::GOING_AWAY, "server shutting down")),
                () = &mut declared_slow => Err(End::Close(close::SLOW_CONSUMER, "slow consumer: resume with since")),
                () = &mut expiry => Err(End::Expired),
                msg = next_frame(&mut self.stream) => self.on_frame(msg).await,
                () = outbox.take_batch(&mut taken, WRITE_BATCH) => self.deliver(&mut taken).await,
                _ = heartbeat.tick() => self.heartbeat(interval).await,
            };
            if let Err(end) = step {
                return end;
            }
            if self.expires_at != expiry_set {
                expiry_set = self.expires_at;
                expiry.as_mut().reset(expiry_instant(expiry_set, leeway));
            }
        }
    }

    fn ready(&self) -> ServerMessage {
        let (user_id, role) = self
            .principal
            .map_or((uuid::Uuid::nil(), Role::Customer), |p| (p.user_id, p.role));
        ServerMessage::Ready {
            user_id,
            role,
            expires_at: self.expires_at,
        }
    }

    /// Commit times after this (unix microseconds) are past the token's `exp`.
    fn expires_micros(&self) -> i64 {
        unix_micros(self.expires_at)
    }

    /// Has the token's `exp` passed (by this machine's clock)?
    fn past_expiry(&self) -> bool {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            >= self.expires_at
    }

    /// Waits for the `auth` frame; anything else first is refused with 1008.
    async fn authenticate(&mut self) -> Result<Verified, End> {
        let deadline = tokio::time::Instant::now() + self.shared.config.auth_timeout;
        loop {
            let msg = tokio::select! {
                () = self.shutdown.cancelled() => return Err(End::Close(close::GOING_AWAY, "server shutting down")),
                r = tokio::time::timeout_at(deadline, next_frame(&mut self.stream)) => match r {
                    Ok(msg) => msg,
                    Err(_) => return Err(self.refuse("no auth frame in time").await),
                },
            };
            if matches!(msg, Some(Ok(_))) {
                crate::edge::frame_received();
            }
            let text = match msg {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Binary(_))) => {
                    return Err(self
                        .refuse("the first frame must be a text auth frame")
                        .await)
                }
                Some(Ok(Message::Close(_))) | None => return Err(End::Gone),
                Some(Err(e)) => return Err(read_error(&e)),
            };
            let token = match ClientMessage::parse(&text) {
                Ok(ClientMessage::Auth { token }) => token,
                Ok(_) => return Err(self.refuse("the first frame must be auth").await),
                Err(_) => {
                    return Err(self
                        .refuse("the first frame must be a valid auth frame")
                        .await)
                }
            };
            let verified = self.verify(&token).await?;
            // The socket stops counting against the unauthenticated caps.
            crate::edge::authenticated();
            return Ok(verified);
        }
    }

    /// Verifies a token from an `auth` frame; a bad one is refused with 1008.
    async fn verify(&mut self, token: &str) -> Result<Verified, End> {
        if token.len() > self.shared.config.max_token_bytes {
            return Err(self.refuse("token too long").await);
        }
        match self.shared.verifier.verify_async(token).await {
            Ok(v) => Ok(v),
            Err(error) => {
                // The reason goes to the log (never the token itself); the client gets the code.
                tracing::info!(%error, "websocket authentication failed");
                Err(self.refuse("invalid token").await)
            }
        }
    }

    /// A second `auth` frame: the same user and role with a later (or earlier) `exp`, and
    /// possibly another workshop. Subscriptions the new claims no longer allow are revoked.
    async fn refresh(&mut self, token: &str) -> Result<(), End> {
        let Some(current) = self.principal else {
            return Err(End::Gone);
        };
        let verified = match self.verify(token).await {
            Ok(v) => v,
            Err(end) => {
                self.shared.metrics.auth_failures.inc();
                return Err(end);
            }
        };
        let new = verified.principal;
        if new.user_id != current.user_id || new.role != current.role {
            tracing::info!("a refreshed token named another user or role");
            self.shared.metrics.auth_failures.inc();
            return Err(self
                .refuse("a refreshed token must name the same user and role")
                .await);
        }
        self.principal = Some(new);
        self.expires_at = verified.expires_at;
        self.send(self.ready()).await?;
        let mut revoked = Vec::new();
        self.subs.retain(|s| {
            let keep = match s.sub.topic {
                // The queue's workshop part comes from the claims it was filed under.
                Topic::Queue => new.workshop_id == current.workshop_id,
                topic => topic.authorize(&new) != Access::Forbidden,
            };
            if !keep {
                revoked.push(s.sub.clone());
            }
            keep
        });
        for sub in revoked {
            self.shared.hub.unsubscribe(&sub);
            self.send(ServerMessage::Revoked {
                topic: sub.topic.to_string(),
                reason: "the refreshed token does not allow this topic".to_owned(),
            })
            .await?;
        }
        Ok(())
    }

    async fn refuse(&mut self, message: &str) -> End {
        let reply = ServerMessage::Error {
            id: None,
            code: ErrorCode::Unauthorized,
            message: message.to_owned(),
        };
        match self.send(reply).await {
            Ok(()) => End::Close(close::POLICY, "unauthorized"),
            Err(end) => end,
        }
    }

    async fn on_frame(&mut self, msg: Option<Result<Message, axum::Error>>) -> Result<(), End> {
        self.last_heard = Instant::now();
        // A whole message arrived: the socket's per-frame read deadline starts again.
        if matches!(msg, Some(Ok(_))) {
            crate::edge::frame_received();
        }
        let text = match msg {
            Some(Ok(Message::Text(t))) => Some(t),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Ok(()),
            Some(Ok(Message::Binary(_))) => None,
            Some(Ok(Message::Close(_))) | None => return Err(End::Gone),
            Some(Err(e)) => return Err(read_error(&e)),
        };
        // Every frame that earns a reply counts against the rate, binary ones included.
        if !self.take_token() {
            return self
                .error(None, ErrorCode::RateLimited, "too many frames; slow down")
                .await;
        }
        let Some(text) = text else {
            return self
                .error(
                    None,
                    ErrorCode::BadRequest,
                    "binary frames are not supported",
                )
                .await;
        };
        match ClientMessage::parse(&text) {
            Err(e) => {
                self.error(None, ErrorCode::BadRequest, &e.to_string())
                    .await
            }
            Ok(ClientMessage::Auth { token }) => self.refresh(&token).await,
            Ok(ClientMessage::Ping { id }) => self.send(ServerMessage::Pong { id }).await,
            Ok(ClientMessage::Unsubscribe { id, topic }) => match topic.parse::<Topic>() {
                Ok(topic) => {
                    if !self.remove_sub(&topic) {
                        return self
                            .error(id, ErrorCode::BadRequest, "not subscribed to that topic")
                            .await;
                    }
                    Ok(())
                }
                Err(e) => {
                    self.error(id, ErrorCode::UnknownTopic, &e.to_string())
                        .await
                }
            },
            Ok(ClientMessage::Subscribe {
                id,
                topic,
                since,
                snapshot,
            }) => {
                // A subscribe may wait for its turn on the database; meanwhile shutdown, the
                // slow-consumer signal and the peer leaving still end the connection.
                let slow = self.outbox.slow.clone();
                let shutdown = self.shutdown.clone();
                let mut stream = self.stream.take();
                let result = tokio::select! {
                    r = self.subscribe(id, &topic, since, snapshot.unwrap_or(false)) => r,
                    () = shutdown.cancelled() => Err(End::Close(close::GOING_AWAY, "server shutting down")),
                    () = slow.cancelled() => Err(End::Close(close::SLOW_CONSUMER, "slow consumer: resume with since")),
                    () = peer_left(&mut stream) => Err(End::Gone),
                };
                self.stream = stream;
                result
            }
        }
    }

    fn remove_sub(&mut self, topic: &Topic) -> bool {
        match self.subs.iter().position(|s| s.sub.topic == *topic) {
            Some(i) => {
                let s = self.subs.swap_remove(i);
                self.shared.hub.unsubscribe(&s.sub);
                true
            }
            None => false,
        }
    }

    async fn subscribe(
        &mut self,
        id: Option<String>,
        topic: &str,
        since: Option<Position>,
        snapshot: bool,
    ) -> Result<(), End> {
        let Some(principal) = self.principal else {
            return Err(End::Gone);
        };
        // Within the leeway after `exp` nothing new starts: a snapshot would show rows as they
        // stand after the token ended.
        if self.past_expiry() {
            return Err(End::Expired);
        }
        let topic: Topic = match topic.parse() {
            Ok(t) => t,
            Err(e) => {
                return self
                    .error(id, ErrorCode::UnknownTopic, &e.to_string())
                    .await
            }
        };
        if since.is_some_and(|s| s < 0) {
            return self
                .error(id, ErrorCode::BadRequest, "since must not be negative")
                .await;
        }
        // Subscribing again to the same topic replaces the old subscription (a client taking
        // a fresh snapshot after `resync`).
        let replacing = self.remove_sub(&topic);
        if !replacing && self.subs.len() >= self.shared.config.max_subscriptions {
            return self
                .error(
                    id,
                    ErrorCode::TooManySubscriptions,
                    "subscription limit reached",
                )
                .await;
        }
        let allowed = match (topic.authorize(&principal), topic) {
            (Access::Allowed, _) => true,
            (Access::Forbidden, _) => false,
            (Access::NeedsSessionCheck, Topic::Session(session))
                if principal.role == Role::Customer =>
            {
                let owns = db::owns_session(self.shared.log.pool(), session, principal.user_id);
                match gated(&self.shared, owns).await {
                    Ok(ok) => ok,
                    Err(error) => {
                        tracing::warn!(%error, "session ownership check failed");
                        return self
                            .error(id, ErrorCode::Unavailable, "could not check access; retry")
                            .await;
                    }
                }
            }
            // A mechanic: decided after registering, at the log head the membership is read
            // at (`start_following`).
            (Access::NeedsSessionCheck, _) => true,
        };
        if !allowed {
            return self.forbidden(id).await;
        }

        // Register first, then read: an event is either dispatched after this point (and
        // queued for us) or committed before the read below (and in it), or both — then the
        // position filter drops the copy.
        let sub = Arc::new(Subscription {
            id: self.shared.hub.next_id(),
            topic,
            principal,
            conn: self.outbox.clone(),
        });
        let hub_head = self.shared.hub.subscribe(sub.clone());
        // Unfiled again unless the subscription starts, also when this future is dropped
        // half-way (the connection ending while it waits on the database).
        let registered = Registered {
            shared: self.shared.clone(),
            sub: Some(sub.clone()),
        };
        let topic_name = topic.to_string();
        let result = if sub.follows_membership() {
            self.start_following(&sub, id, topic_name, since, snapshot)
                .await
        } else if snapshot {
            self.start_with_snapshot(&sub, id, topic_name)
                .await
                .map(|p| p.map(|p| (p, None)))
        } else if let Some(since) = since {
            self.start_with_replay(&sub, id, topic_name, since, hub_head)
                .await
                .map(|p| p.map(|p| (p, None)))
        } else {
            self.send(ServerMessage::Subscribed {
                id,
                topic: topic_name,
                position: hub_head,
            })
            .await
            .map(|()| Some((hub_head, None)))
        };
        match result {
            Ok(Some((delivered_through, membership))) => {
                registered.keep();
                self.subs.push(ActiveSub {
                    sub,
                    delivered_through,
                    membership,
                });
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(end) => Err(end),
        }
    }

    async fn forbidden(&mut self, id: Option<String>) -> Result<(), End> {
        self.error(
            id,
            ErrorCode::Forbidden,
            "not allowed to subscribe to this topic",
        )
        .await
    }

    /// A mechanic on `session:<id>`: the membership, the log head and (for a snapshot) the
    /// session's rows are read together; a mechanic who is not a member at that head is
    /// refused. A replay delivers each event the mechanic could see at its own position.
    /// `Ok(None)`: the subscription did not start (an error was sent to the client).
    async fn start_following(
        &mut self,
        sub: &Subscription,
        id: Option<String>,
        topic: String,
        since: Option<Position>,
        snapshot: bool,
    ) -> Result<Option<(Position, Option<SessionMembership>)>, End> {
        let Topic::Session(session) = sub.topic else {
            return Err(End::Gone);
        };
        let mechanic = sub.principal.user_id;
        let rows_limit = snapshot.then_some(self.shared.config.snapshot_limit);
        let read = db::mechanic_session(self.shared.log.pool(), session, mechanic, rows_limit);
        let view = match gated(&self.shared, read).await {
            Ok(view) => view,
            Err(error) => {
                tracing::warn!(%error, "session membership check failed");
                self.error(id, ErrorCode::Unavailable, "could not check access; retry")
                    .await?;
                return Ok(None);
            }
        };
        if view.granting.is_empty() {
            self.forbidden(id).await?;
            return Ok(None);
        }
        let mut membership = SessionMembership::new(session, mechanic, view.granting);
        let position = view.head.head;
        if let Some(assignments) = view.rows {
            self.send_snapshot(id, topic, position, assignments).await?;
        } else if let Some(since) = since {
            let replayed = self
                .resume_following(sub, id, topic, since, view.head, &mut membership)
                .await?;
            if replayed.is_none() {
                return Ok(None);
            }
        } else {
            self.send(ServerMessage::Subscribed {
                id,
                topic,
                position,
            })
            .await?;
        }
        Ok(Some((position, Some(membership))))
    }

    /// `subscribed` at `position`, then the snapshot taken there.
    async fn send_snapshot(
        &mut self,
        id: Option<String>,
        topic: String,
        position: Position,
        assignments: Vec<pgcast_events::Assignment>,
    ) -> Result<(), End> {
        self.send(ServerMessage::Subscribed {
            id,
            topic: topic.clone(),
            position,
        })
        .await?;
        self.send(ServerMessage::Snapshot {
            topic,
            position,
            assignments,
        })
        .await
    }

    /// `Ok(None)`: the subscription did not start (an error was sent to the client).
    async fn start_with_snapshot(
        &mut self,
        sub: &Subscription,
        id: Option<String>,
        topic: String,
    ) -> Result<Option<Position>, End> {
        let limit = self.shared.config.snapshot_limit;
        let read = db::snapshot(self.shared.log.pool(), &sub.topic, &sub.principal, limit);
        match gated(&self.shared, read).await {
            Ok((position, assignments)) => {
                self.send_snapshot(id, topic, position, assignments).await?;
                Ok(Some(position))
            }
            Err(error) => {
                tracing::warn!(%error, "snapshot failed");
                self.error(id, ErrorCode::Unavailable, "snapshot failed; retry")
                    .await?;
                Ok(None)
            }
        }
    }

    /// Replays the topic's events after `since` up to `hub_head` (the hub's head when the
    /// subscription was filed: every later event is queued for it by the hub, so the replay
    /// ends instead of chasing writers). From the replay window when it reaches back to
    /// `since`, without a database read; otherwise from the log, except for `queue`, whose page
    /// is its open rows: a client that far behind takes a snapshot (`resync`) instead of
    /// making the log be scanned for the few rows it can use. `Ok(None)`: the subscription did
    /// not start (an error or `resync` was sent).
    async fn start_with_replay(
        &mut self,
        sub: &Subscription,
        id: Option<String>,
        topic: String,
        since: Position,
        hub_head: Position,
    ) -> Result<Option<Position>, End> {
        if since > hub_head {
            // The client has seen events this replica has not dispatched yet (another replica
            // served it, or this one is still catching up): nothing to replay, as everything
            // after `hub_head` reaches the subscription through the hub; `since` only needs to
            // be a position the log has reached.
            let head = match gated(&self.shared, self.shared.log.head()).await {
                Ok(head) => head,
                Err(error) => {
                    tracing::warn!(%error, "reading the log head failed");
                    self.error(id, ErrorCode::Unavailable, "replay failed; retry")
                        .await?;
                    return Ok(None);
                }
            };
            self.send_subscribed(id, &topic, since).await?;
            if since > head.head {
                self.resync(topic, "since is ahead of the event log")
                    .await?;
                return Ok(None);
            }
            return Ok(Some(since));
        }
        let matches = |e: &AssignmentEvent| sub.topic.matches(&sub.principal, e);
        let keys = sub.topic.route_keys(&sub.principal);
        if let Some(events) = self.shared.window.range(since, hub_head, &keys, matches) {
            self.shared.metrics.replays_from_window.inc();
            self.send_subscribed(id, &topic, since).await?;
            self.write_events(sub, events.iter().map(|e| &**e)).await?;
            return Ok(Some(hub_head));
        }
        self.send_subscribed(id, &topic, since).await?;
        if sub.topic == Topic::Queue {
            self.resync(topic, OLDER_THAN_WINDOW).await?;
            return Ok(None);
        }
        self.shared.metrics.replays_from_log.inc();
        if let Some(reason) = self.replay(sub, since, hub_head).await? {
            self.resync(topic, reason).await?;
            return Ok(None);
        }
        Ok(Some(hub_head))
    }

    /// A mechanic resuming `session:<id>` with `since`; `membership` is at `head`, read with
    /// it. `Ok(None)`: `resync` was sent.
    async fn resume_following(
        &mut self,
        sub: &Subscription,
        id: Option<String>,
        topic: String,
        since: Position,
        head: LogHead,
        membership: &mut SessionMembership,
    ) -> Result<Option<Position>, End> {
        self.send_subscribed(id, &topic, since).await?;
        let reason = if since > head.head {
            Some("since is ahead of the event log")
        } else if since < head.pruned_through {
            Some(PRUNED)
        } else {
            self.replay_following(sub, since, head, membership).await?
        };
        if let Some(reason) = reason {
            self.resync(topic, reason).await?;
            return Ok(None);
        }
        Ok(Some(head.head))
    }

    async fn send_subscribed(
        &mut self,
        id: Option<String>,
        topic: &str,
        position: Position,
    ) -> Result<(), End> {
        self.send(ServerMessage::Subscribed {
            id,
            topic: topic.to_owned(),
            position,
        })
        .await
    }

    async fn resync(&mut self, topic: String, reason: &str) -> Result<(), End> {
        self.send(ServerMessage::Resync {
            topic,
            reason: reason.to_owned(),
        })
        .await
    }

    /// Writes `events` (already judged visible) as frames of `sub`, stopping at the first one
    /// committed after the token's `exp` (then the connection expires).
    async fn write_events<'e>(
        &mut self,
        sub: &Subscription,
        events: impl Iterator<Item = &'e AssignmentEvent>,
    ) -> Result<(), End> {
        let mut frames = Vec::new();
        let mut expired = false;
        for event in events {
            if event.committed_at.timestamp_micros() > self.expires_micros() {
                expired = true;
                break;
            }
            frames.push(EventFrame::encode(&sub.topic, event).into());
            if frames.len() == REPLAY_PAGE as usize {
                self.write_frames(&mut frames).await?;
            }
        }
        self.write_frames(&mut frames).await?;
        if expired {
            return Err(End::Expired);
        }
        Ok(())
    }

    /// Streams the topic's events in `(since, through]` from the log, each page read (in its
    /// turn among the gateway's database reads) while the previous one is written.
    /// `Ok(Some(reason))`: a prune overtook the replay (a page came back with the retention
    /// boundary inside its range), so what follows would have a gap; nothing of that page was
    /// sent and the client must resync.
    async fn replay(
        &mut self,
        sub: &Subscription,
        since: Position,
        through: Position,
    ) -> Result<Option<&'static str>, End> {
        let shared = self.shared.clone();
        let read = |after| gated(&shared, shared.log.read_range(after, through, REPLAY_PAGE));
        let mut page_after = since;
        let mut page = read(since).await.map_err(replay_failed)?;
        loop {
            if page.pruned_past(page_after) {
                return Ok(Some(PRUNED));
            }
            for (position, error) in &page.undecodable {
                tracing::warn!(position, %error, "skipping undecodable log row in replay");
            }
            let mut frames = Vec::new();
            let mut expired = false;
            for event in &page.events {
                if !sub.topic.matches(&sub.principal, event) {
                    continue;
                }
                if event.committed_at.timestamp_micros() > self.expires_micros() {
                    expired = true;
                    break;
                }
                frames.push(EventFrame::encode(&sub.topic, event).into());
            }
            let more = !expired && page.rows == REPLAY_PAGE as usize;
            let after = page.last.unwrap_or(through);
            let prefetch = async {
                if more {
                    Some(read(after).await)
                } else {
                    None
                }
            };
            let (next, written) = tokio::join!(prefetch, self.write_frames(&mut frames));
            written?;
            if expired {
                return Err(End::Expired);
            }
            match next {
                None => return Ok(None),
                Some(next) => {
                    page = next.map_err(replay_failed)?;
                    page_after = after;
                }
            }
        }
    }

    /// Replays a session to a mechanic. Membership is known at `head`; it is rewound through
    /// the session's events down to `since`, then moved forward again event by event, so each
    /// event is judged by the rows as they stood at its position. A session has few events, so
    /// they are collected first, at most `snapshot_limit` of them (a longer history gets
    /// `resync`, like a snapshot that large would fail). `Ok(None)`: replayed, `membership` is
    /// back at `head`; `Ok(Some(reason))`: nothing was sent and the client must resync.
    async fn replay_following(
        &mut self,
        sub: &Subscription,
        since: Position,
        head: LogHead,
        membership: &mut SessionMembership,
    ) -> Result<Option<&'static str>, End> {
        let shared = self.shared.clone();
        let mut events: Vec<AssignmentEvent> = Vec::new();
        let mut after = since;
        loop {
            let read = shared.log.read_range(after, head.head, REPLAY_PAGE);
            let page = gated(&shared, read).await.map_err(replay_failed)?;
            if page.pruned_past(after) {
                return Ok(Some(PRUNED));
            }
            for (position, error) in &page.undecodable {
                tracing::warn!(position, %error, "skipping undecodable log row in replay");
            }
            events.extend(
                page.events
                    .into_iter()
                    .filter(|e| e.assignment.session_id == membership.session()),
            );
            if events.len() > self.shared.config.snapshot_limit {
                return Ok(Some(
                    "the session's history since then is longer than a replay holds; \
                     take a snapshot",
                ));
            }
            match page.last {
                Some(last) if page.rows == REPLAY_PAGE as usize => after = last,
                _ => break,
            }
        }
        for event in events.iter().rev() {
            membership.rewind(event);
        }
        let visible: Vec<&AssignmentEvent> = events
            .iter()
            .filter(|e| membership.apply(e) != Verdict::Skip)
            .collect();
        self.write_events(sub, visible.into_iter()).await?;
        Ok(None)
    }

    /// Writes (and drains) `frames` with one flush, under one guard.
    async fn write_frames(&mut self, frames: &mut Vec<Utf8Bytes>) -> Result<(), End> {
        let count = frames.len() as u64;
        let sink = &mut self.sink;
        let write = async move {
            for frame in frames.drain(..) {
                sink.feed(Message::Text(frame)).await?;
            }
            sink.flush().await
        };
        let limit = self.shared.config.heartbeat_interval * 2;
        guarded(write, limit, &self.outbox.slow, &self.shutdown).await?;
        self.last_written = Instant::now();
        self.shared.metrics.frames.inc_by(count);
        Ok(())
    }

    /// Writes the frames taken from the outbox (up to a batch) with a single flush.
    ///
    /// The frames are picked first and then written under one guard (slow, shutdown, write
    /// timeout), not one per frame: under fan-out this loop runs a million times a second.
    /// The latency histogram gets one sample per batch: the oldest commit in the batch to the
    /// moment the batch is written (the batch's worst case). An event committed after the
    /// token's `exp` is never written: what came before it is, then the connection expires.
    async fn deliver(&mut self, taken: &mut Vec<Outbound>) -> Result<(), End> {
        let mut batch = std::mem::take(&mut self.batch);
        let mut oldest_commit = i64::MAX;
        let mut expired = false;
        for out in taken.drain(..) {
            if expired {
                continue;
            }
            if let Some((frame, revoked)) = self.accept(&out) {
                if out.committed_micros > self.expires_micros() {
                    expired = true;
                    continue;
                }
                batch.push(frame);
                oldest_commit = oldest_commit.min(out.committed_micros);
                if let Some(revoked) = revoked {
                    batch.push(revoked);
                }
            }
        }
        if batch.is_empty() {
            self.batch = batch;
            return if expired { Err(End::Expired) } else { Ok(()) };
        }
        let result = self.write_frames(&mut batch).await;
        self.batch = batch;
        result?;
        let now = chrono::Utc::now().timestamp_micros();
        let latency = (now - oldest_commit).max(0) as f64 / 1e6;
        self.shared.metrics.latency.observe(latency);
        if expired {
            return Err(End::Expired);
        }
        Ok(())
    }

    /// The frame to send for `out`, or `None` if its subscription is gone, already has it, or
    /// may not see it. When the event ends a mechanic's membership of a session, the
    /// subscription is removed here and the `revoked` frame to send after the event comes too.
    fn accept(&mut self, out: &Outbound) -> Option<(Utf8Bytes, Option<Utf8Bytes>)> {
        let i = self.subs.iter().position(|s| s.sub.id == out.sub)?;
        let active = &mut self.subs[i];
        if out.position <= active.delivered_through {
            return None;
        }
        active.delivered_through = out.position;
        let revoke = match (&mut active.membership, &out.event) {
            (None, _) => false,
            (Some(membership), Some(event)) => match membership.apply(event) {
                Verdict::Deliver => false,
                Verdict::DeliverThenRevoke => true,
                Verdict::Skip => return None,
            },
            // The hub always attaches the event for these subscriptions; without it the right
            // cannot be judged, so nothing is sent.
            (Some(_), None) => return None,
        };
        let frame = out.frame.clone();
        if !revoke {
            return Some((frame, None));
        }
        let gone = self.subs.swap_remove(i);
        self.shared.hub.unsubscribe(&gone.sub);
        let revoked = ServerMessage::Revoked {
            topic: gone.sub.topic.to_string(),
            reason: NO_LONGER_ASSIGNED.to_owned(),
        };
        Some((frame, Some(revoked.encode().into())))
    }

    /// Pings the peer; closes the connection when it has neither answered for two intervals
    /// nor taken any event frames for one. A slow reader working through a backlog reads its
    /// pong late but keeps taking frames, so it stays; a dead peer stops taking them once the
    /// kernel's buffers are full, and a write that cannot finish is cut off by `guarded`.
    async fn heartbeat(&mut self, interval: Duration) -> Result<(), End> {
        if self.last_heard.elapsed() > interval * 2 && self.last_written.elapsed() > interval {
            tracing::debug!("closing a connection whose peer stopped answering pings");
            return Err(End::Gone);
        }
        self.feed(Message::Ping(Default::default())).await?;
        self.flush().await
    }

    async fn error(
        &mut self,
        id: Option<String>,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), End> {
        self.send(ServerMessage::Error {
            id,
            code,
            message: message.to_owned(),
        })
        .await
    }

    async fn send(&mut self, msg: ServerMessage) -> Result<(), End> {
        self.feed(Message::Text(msg.encode().into())).await?;
        self.flush().await
    }

    /// Queues a frame in the socket's write buffer.
    async fn feed(&mut self, msg: Message) -> Result<(), End> {
        let limit = self.shared.config.heartbeat_interval * 2;
        guarded(
            self.sink.feed(msg),
            limit,
            &self.outbox.slow,
            &self.shutdown,
        )
        .await
    }

    /// Writes the socket's buffer out.
    async fn flush(&mut self) -> Result<(), End> {
        let limit = self.shared.config.heartbeat_interval * 2;
        guarded(self.sink.flush(), limit, &self.outbox.slow, &self.shutdown).await
    }

    fn burst(&self) -> f64 {
        f64::from(self.shared.config.client_frames_per_second) * 2.0
    }

    fn take_token(&mut self) -> bool {
        let now = Instant::now();
        let rate = f64::from(self.shared.config.client_frames_per_second);
        let refill = now.duration_since(self.tokens_at).as_secs_f64() * rate;
        self.tokens = (self.tokens + refill).min(self.burst());
        self.tokens_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The next client frame (never, while the stream is lent out).
async fn next_frame(stream: &mut Stream) -> Option<Result<Message, axum::Error>> {
    match stream {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

/// Resolves when the peer is gone (its side closed, the socket failed, or a close frame came)
/// while the connection is busy with something else. A frame that arrives first stays queued,
/// to be handled in turn, and ends the watch: what follows it is seen when it is read.
async fn peer_left(stream: &mut Stream) {
    let Some(stream) = stream else {
        return std::future::pending().await;
    };
    match std::pin::Pin::new(stream).peek().await {
        None | Some(Ok(Message::Close(_))) => {}
        Some(Err(e)) if matches!(read_error(e), End::Gone) => {}
        Some(_) => {
            // A whole frame is in: the socket's per-frame read deadline starts again.
            crate::edge::frame_received();
            std::future::pending().await
        }
    }
}

/// Runs a database read in its turn: at most `max_concurrent_reads` run at once, the others
/// wait first come, first served (tokio's semaphore is fair). The wait has no deadline of its
/// own: the connection that waits still sees shutdown, its slow-consumer signal and its peer
/// leaving, and each read is bounded by the pool's statement timeout.
async fn gated<T>(shared: &Shared, read: impl std::future::Future<Output = T>) -> T {
    struct Waiting<'a>(&'a prometheus_client::metrics::gauge::Gauge);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    shared.metrics.reads_waiting.inc();
    let waiting = Waiting(&shared.metrics.reads_waiting);
    // The semaphore is never closed; if it were, reading anyway is the safe fallback.
    let permit = shared.reads.acquire().await.ok();
    drop(waiting);
    let out = read.await;
    drop(permit);
    out
}

/// A replay read failed: the client resumes from the last position it received.
fn replay_failed(error: pgcast_listener::ListenerError) -> End {
    tracing::warn!(%error, "replay read failed");
    End::Close(close::GOING_AWAY, "replay failed: resume with since")
}

/// Runs a socket write, giving up when the connection is declared slow, when the server shuts
/// down, or when the peer has not taken the bytes within `limit` (a peer that sends but never
/// reads): no peer can hold its task, and with it a connection slot, forever.
///
/// A write the socket takes at once (the common case: its buffer has room) finishes on its
/// first poll, before any timer or cancellation waiter is set up: under fan-out this runs once
/// per connection and event.
async fn guarded(
    write: impl std::future::Future<Output = Result<(), axum::Error>>,
    limit: Duration,
    slow: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<(), End> {
    let mut write = std::pin::pin!(write);
    if let std::task::Poll::Ready(r) = futures::poll!(write.as_mut()) {
        return r.map_err(|_| End::Gone);
    }
    tokio::select! {
        r = tokio::time::timeout(limit, write) => match r {
            Ok(r) => r.map_err(|_| End::Gone),
            Err(_) => Err(End::Gone),
        },
        () = slow.cancelled() => Err(End::Close(close::SLOW_CONSUMER, "slow consumer: resume with since")),
        () = shutdown.cancelled() => Err(End::Close(close::GOING_AWAY, "server shutting down")),
    }
}

/// How a read error ends the connection: an oversized frame gets 1009, anything else means
/// the socket is unusable.
fn read_error(e: &axum::Error) -> End {
    use std::error::Error as _;
    match e
        .source()
        .and_then(|s| s.downcast_ref::<tungstenite::Error>())
    {
        Some(tungstenite::Error::Capacity(_)) => End::Close(close::TOO_BIG, "frame too big"),
        _ => End::Gone,
    }
}

//! One WebSocket connection: authentication, then a single task that reads client frames,
//! writes queued event frames and heartbeats under one `select!`.
//!
//! Access is decided per event, not once: a frame is written only if the token has not expired
//! by the event's commit time, and a mechanic on `session:<id>` receives an event only while the
//! session's rows, at that event's position, make them a member.
//!
//! The task is generic over its socket halves (any `Sink` of messages and `Stream` of
//! messages), so its rules are unit-tested over channels with paused time (`tests`). Its jobs
//! live one per module: [`auth`] (the first `auth` frame, refreshes, expiry), [`subscribe`]
//! (access checks, snapshots, the start position), [`replay`] (`since` from the window or the
//! log), [`deliver`] (live frames from the outbox), [`rate`] (the client frame rate); this
//! module holds the loop, the lifecycle and the socket writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::stream::Peekable;
use futures::{Sink, SinkExt, Stream, StreamExt};
use pgcast_events::{
    ClientMessage, ErrorCode, Position, Principal, ServerMessage, SessionMembership, Topic,
};
use tokio_util::sync::CancellationToken;

use crate::edge::Admission;
use crate::hub::Subscription;
use crate::outbox::{Eviction, Outbox};
use crate::Shared;

use rate::{Rate, RateLimit};

mod auth;
mod deliver;
mod rate;
mod replay;
mod subscribe;
#[cfg(test)]
mod tests;

/// Close codes of protocol v1 (the README's protocol section).
pub(crate) mod close {
    /// Server shutting down, or its event stream had a gap (the log was pruned past where it
    /// had read): reconnect and resume with `since` (a resume from before a gap gets `resync`).
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

/// How a connection whose outbox was evicted ends.
fn evicted(outbox: &Outbox) -> End {
    match outbox.eviction() {
        Some(Eviction::Gap) => End::Close(
            close::GOING_AWAY,
            "gap in the event stream: resume with since",
        ),
        Some(Eviction::Slow) | None => {
            End::Close(close::SLOW_CONSUMER, "slow consumer: resume with since")
        }
    }
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

/// Where the connection writes: the socket's sending half (a channel in unit tests).
pub(crate) trait SocketSink: Sink<Message, Error = axum::Error> + Unpin + Send {}
impl<T: Sink<Message, Error = axum::Error> + Unpin + Send> SocketSink for T {}

/// What the connection reads: the socket's receiving half (a channel in unit tests).
pub(crate) trait SocketStream:
    Stream<Item = Result<Message, axum::Error>> + Unpin + Send
{
}
impl<T: Stream<Item = Result<Message, axum::Error>> + Unpin + Send> SocketStream for T {}

/// Client frames. Lent out (`None`) only while a subscribe waits, to watch for the peer leaving
/// and take its pings ([`watch_peer`]).
type Frames<St> = Option<Peekable<St>>;

/// Application pings taken off the socket while a subscribe is busy and not yet answered (their
/// ids). A client that sends more waits: its frames stay unread until the subscribe answers
/// these or ends.
const PINGS_WHILE_BUSY: usize = 4;

/// Other client frames read while a subscribe is busy (a client sends all its subscribes at
/// once), kept to be handled in order once it ends, up to this many bytes (each frame counted
/// with [`DEFERRED_FRAME_COST`] more); past it the watcher reads no further. Reading past them
/// is what lets a ping sent after them be answered meanwhile.
const DEFERRED_BYTES: usize = 16 << 10;
/// What a deferred frame costs besides its payload (so that empty frames are bounded too).
const DEFERRED_FRAME_COST: usize = 64;

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
/// `resync` reason: the log went back (a restore, a failover that lost commits) and the
/// positions after `since` name other events now.
const REDRAWN: &str = "the event log went back: positions since then name other events";

/// Unix time in microseconds, on the same scale as events' commit times.
fn unix_micros(seconds: u64) -> i64 {
    i64::try_from(seconds)
        .unwrap_or(i64::MAX)
        .saturating_mul(1_000_000)
}

/// Resolves at `exp` + `leeway` of the token in `expires_at`, following a refresh that moves it.
async fn until_expired(expires_at: Arc<AtomicU64>, leeway: Duration) {
    loop {
        let exp = expires_at.load(Ordering::Relaxed);
        tokio::time::sleep_until(expiry_instant(exp, leeway)).await;
        if expires_at.load(Ordering::Relaxed) == exp {
            return;
        }
    }
}

/// What [`watch_peer`] needs to apply a refresh while a subscribe runs.
struct EarlyRefresh {
    shared: Arc<Shared>,
    /// The connection's identity: only a token naming exactly it (the same workshop too, so
    /// that nothing the subscribe sends is judged by claims the new token no longer has) moves
    /// the expiry early.
    principal: Principal,
    expires_at: Arc<AtomicU64>,
}

impl EarlyRefresh {
    /// Verifies `token` with the keys at hand and, when it names the same principal, moves the
    /// expiry to its `exp`. The frame still goes to the main loop, which answers it as any
    /// refresh (`ready`, or 1008 for a bad token). Never waits: a token naming a JWKS key not
    /// yet read is left to the main loop, whose read of the keys nothing can cancel (this runs
    /// in a `select!` that drops it when the subscribe ends).
    fn apply(&self, token: &str) {
        if token.len() > self.shared.config.max_token_bytes {
            return;
        }
        if let Ok(verified) = self.shared.verifier.verify(token) {
            if verified.principal == self.principal {
                self.expires_at
                    .store(verified.expires_at, Ordering::Relaxed);
            }
        }
    }
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

/// Serves one upgraded socket until it closes; `admission` is what the edge layer granted it.
pub(crate) async fn serve(socket: WebSocket, shared: Arc<Shared>, admission: Admission) {
    let (sink, stream) = socket.split();
    serve_halves(sink, stream, shared, admission).await
}

/// Serves a connection over its two halves until it closes.
async fn serve_halves<Si: SocketSink, St: SocketStream>(
    sink: Si,
    stream: St,
    shared: Arc<Shared>,
    admission: Admission,
) {
    shared.metrics.connections.inc();
    let rate = RateLimit::new(
        shared.config.client_frames_per_second,
        shared.config.max_subscriptions,
    );
    let mut conn = Connection {
        outbox: Arc::new(shared.hub.outbox(shared.config.outbound_bytes)),
        shutdown: shared.shutdown.child_token(),
        shared,
        sink,
        stream: Some(stream.peekable()),
        subs: Vec::new(),
        batch: Vec::new(),
        principal: None,
        expires_at: Arc::new(AtomicU64::new(0)),
        last_heard: Instant::now(),
        last_written: Instant::now(),
        rate,
        admission,
        pings: None,
        deferred: std::collections::VecDeque::new(),
    };
    let mut end = conn.run().await;
    // The socket closes below (with a close frame, or when it is dropped): a slot it still
    // holds as unauthenticated is free before then, so a client that saw it close may open
    // the next one from the same address at once.
    conn.admission.unauthenticated.release();
    // No event is queued for it any more, before the last frames are written: an outbox that
    // filled meanwhile would turn the close into a slow consumer's.
    conn.leave();
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

impl<Si, St: SocketStream> Connection<Si, St> {
    /// Unfiles every subscription and drops what is queued (its bytes leave the hub's total).
    /// Idempotent; also run when the connection is dropped, so a task that ends any other way
    /// (a panic) leaves nothing filed or counted.
    fn leave(&mut self) {
        for s in self.subs.drain(..) {
            self.shared.hub.unsubscribe(&s.sub);
        }
        self.outbox.close();
    }
}

impl<Si, St: SocketStream> Drop for Connection<Si, St> {
    fn drop(&mut self) {
        self.leave();
    }
}

struct Connection<Si, St: SocketStream> {
    shared: Arc<Shared>,
    /// Event frames the hub queued for this connection.
    outbox: Arc<Outbox>,
    shutdown: CancellationToken,
    sink: Si,
    stream: Frames<St>,
    subs: Vec<ActiveSub>,
    /// Frames picked for one write; kept to reuse its allocation.
    batch: Vec<Utf8Bytes>,
    principal: Option<Principal>,
    /// `exp` of the current token (unix seconds). Nothing committed after it is written, and
    /// the connection closes with 4001 at `exp` + leeway unless a new `auth` frame refreshed it.
    /// Shared with [`watch_peer`], which applies a refresh that arrives while a subscribe runs.
    expires_at: Arc<AtomicU64>,
    /// The last client frame (a pong included).
    last_heard: Instant,
    /// The last time a batch of event frames went into the socket: a peer still taking them
    /// is alive even when its pong waits behind megabytes of backlog.
    last_written: Instant,
    /// The client frame rate limit.
    rate: RateLimit,
    /// The edge layer's hold on this socket: its frame clock and unauthenticated slot.
    admission: Admission,
    /// While a subscribe runs: the pings [`watch_peer`] took off the socket, answered between
    /// the subscribe's steps and while it waits for the database ([`Self::answer_pings`],
    /// [`Self::in_turn`]). A replay of a long, quiet stretch of the log writes nothing for a
    /// while, and a client that hears no pong closes and resumes from the same `since`.
    pings: Option<tokio::sync::mpsc::Receiver<Option<String>>>,
    /// Client frames [`watch_peer`] read while a subscribe ran, handled before the socket is
    /// read again (bounded by [`DEFERRED_BYTES`]). Empty (no allocation) almost always.
    deferred: std::collections::VecDeque<Message>,
}

impl<Si: SocketSink, St: SocketStream> Connection<Si, St> {
    async fn run(&mut self) -> End {
        // Boxed, as are a refresh and a subscribe: inline, their state would be part of the
        // task's, allocated for as long as the connection lives (an_idle_connection_task_is_small).
        let verified = match Box::pin(self.authenticate()).await {
            Ok(v) => v,
            Err(end) => {
                self.shared.metrics.auth_failures.inc();
                return end;
            }
        };
        self.principal = Some(verified.principal);
        self.expires_at
            .store(verified.expires_at, Ordering::Relaxed);
        if let Err(end) = self.send(self.ready()).await {
            return end;
        }
        let interval = self.shared.config.heartbeat_interval;
        let leeway = self.shared.config.token_leeway;
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut expiry_set = self.exp();
        let expiry = tokio::time::sleep_until(expiry_instant(expiry_set, leeway));
        tokio::pin!(expiry);
        // Made once and polled on every turn: a `cancelled()` made per turn would register and
        // unregister a waiter (a lock each) on every event delivered.
        let (shutdown, eviction) = (self.shutdown.clone(), self.outbox.evicted.clone());
        let outbox = self.outbox.clone();
        // Entries taken from the outbox for one write; the allocation is reused. Allocated on
        // first use: an idle connection holds none of it.
        let mut taken = Vec::new();
        let shutting_down = shutdown.cancelled();
        let evicted_now = eviction.cancelled();
        tokio::pin!(shutting_down, evicted_now);
        loop {
            let step = tokio::select! {
                biased;
                () = &mut shutting_down => Err(End::Close(close::GOING_AWAY, "server shutting down")),
                () = &mut evicted_now => Err(evicted(&outbox)),
                () = &mut expiry => Err(End::Expired),
                msg = next_frame(&mut self.stream, &mut self.deferred) => self.on_frame(msg).await,
                () = outbox.take_batch(&mut taken, WRITE_BATCH) => self.deliver(&mut taken).await,
                _ = heartbeat.tick() => self.heartbeat(interval).await,
            };
            if let Err(end) = step {
                return end;
            }
            if self.exp() != expiry_set {
                expiry_set = self.exp();
                expiry.as_mut().reset(expiry_instant(expiry_set, leeway));
            }
        }
    }

    async fn on_frame(&mut self, msg: Option<Result<Message, axum::Error>>) -> Result<(), End> {
        self.last_heard = Instant::now();
        // A whole message arrived: the socket's per-frame read deadline starts again.
        if matches!(msg, Some(Ok(_))) {
            self.admission.frame_received();
        }
        let text = match msg {
            Some(Ok(Message::Text(t))) => Some(t),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Ok(()),
            Some(Ok(Message::Binary(_))) => None,
            Some(Ok(Message::Close(_))) | None => return Err(End::Gone),
            Some(Err(e)) => return Err(read_error(&e)),
        };
        // Every frame that earns a reply counts against the rate, binary ones included.
        if !self.within_rate().await? {
            return Ok(());
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
            Ok(ClientMessage::Auth { token }) => Box::pin(self.refresh(&token)).await,
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
                // A subscribe may wait for its turn on the database and read for a while;
                // meanwhile shutdown, the eviction (slow consumer, gap), the token's expiry and
                // the peer leaving still end the connection, and its pings are answered.
                let outbox = self.outbox.clone();
                let shutdown = self.shutdown.clone();
                let mut stream = self.stream.take();
                let mut deferred = std::mem::take(&mut self.deferred);
                let admission = self.admission.clone();
                // A refresh sent meanwhile (kept for the main loop, which answers it) moves
                // the expiry at once: a client that refreshed in time is not closed with 4001
                // because its subscribe took long.
                let early = self.principal.map(|principal| EarlyRefresh {
                    shared: self.shared.clone(),
                    principal,
                    expires_at: self.expires_at.clone(),
                });
                let expiry =
                    until_expired(self.expires_at.clone(), self.shared.config.token_leeway);
                let (pings, taken) = tokio::sync::mpsc::channel(PINGS_WHILE_BUSY);
                self.pings = Some(taken);
                let result = tokio::select! {
                    r = Box::pin(self.subscribe(id, &topic, since, snapshot.unwrap_or(false))) => r,
                    () = shutdown.cancelled() => Err(End::Close(close::GOING_AWAY, "server shutting down")),
                    () = outbox.evicted.cancelled() => Err(evicted(&outbox)),
                    () = expiry => Err(End::Expired),
                    () = watch_peer(&mut stream, &mut deferred, &admission, &pings, early.as_ref()) => Err(End::Gone),
                };
                self.stream = stream;
                self.deferred = deferred;
                // Nothing pinged the peer while the subscribe ran, however long it took: the
                // heartbeat's two intervals start again now.
                self.last_heard = Instant::now();
                // Pings taken while it ended are answered before the next frame is read.
                let result = match result {
                    Ok(()) => self.answer_pings().await,
                    Err(end) => Err(end),
                };
                self.pings = None;
                result
            }
        }
    }

    /// Answers the pings taken off the socket while a subscribe runs, as the main loop would
    /// have: each one counts against the frame rate.
    async fn answer_pings(&mut self) -> Result<(), End> {
        while let Some(id) = self.pings.as_mut().and_then(|p| p.try_recv().ok()) {
            self.pong(id).await?;
        }
        Ok(())
    }

    /// Answers one ping taken while a subscribe runs.
    async fn pong(&mut self, id: Option<String>) -> Result<(), End> {
        if self.within_rate().await? {
            self.send(ServerMessage::Pong { id }).await?;
        }
        Ok(())
    }

    /// Counts one client frame against the rate: true if it is to be handled. The first over
    /// the rate is answered with `rate_limited`, the next ones are dropped unanswered until a
    /// frame passes again.
    async fn within_rate(&mut self) -> Result<bool, End> {
        match self.rate.take() {
            Rate::Pass => Ok(true),
            Rate::Refuse => {
                self.error(
                    None,
                    ErrorCode::RateLimited,
                    "too many frames; slow down (frames over the rate are dropped unanswered)",
                )
                .await?;
                Ok(false)
            }
            Rate::Drop => Ok(false),
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
        guarded(self.sink.feed(msg), limit, &self.outbox, &self.shutdown).await
    }

    /// Writes the socket's buffer out.
    async fn flush(&mut self) -> Result<(), End> {
        let limit = self.shared.config.heartbeat_interval * 2;
        guarded(self.sink.flush(), limit, &self.outbox, &self.shutdown).await
    }
}

/// The next client frame: one read while a subscribe ran, else from the socket (never, while
/// the stream is lent out).
async fn next_frame<St: SocketStream>(
    stream: &mut Frames<St>,
    deferred: &mut std::collections::VecDeque<Message>,
) -> Option<Result<Message, axum::Error>> {
    if let Some(msg) = deferred.pop_front() {
        return Some(Ok(msg));
    }
    match stream {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

/// Resolves when the peer is gone (its side closed, the socket failed, or a close frame came)
/// while the connection is busy with a subscribe. Meanwhile it reads the client's frames:
/// application pings go to `pings` (while it has room) for the subscribe to answer at once,
/// WebSocket pings and pongs are dropped (the socket answers pings itself), and any other frame
/// is kept in `deferred`, to be handled in order when the subscribe ends. A frame that finds no
/// room (`pings` full, `deferred` at [`DEFERRED_BYTES`]) stays unread, and so does everything
/// after it, until the subscribe ends.
async fn watch_peer<St: SocketStream>(
    stream: &mut Frames<St>,
    deferred: &mut std::collections::VecDeque<Message>,
    admission: &Admission,
    pings: &tokio::sync::mpsc::Sender<Option<String>>,
    early: Option<&EarlyRefresh>,
) {
    let Some(stream) = stream else {
        return std::future::pending().await;
    };
    /// What the watcher does with the frame it sees.
    enum Seen {
        Gone,
        Ping(Option<String>),
        Control,
        Keep,
        /// A refresh: kept like any frame, and applied to the expiry at once.
        Auth(String),
        Stop,
    }
    let mut stream = std::pin::Pin::new(stream);
    let mut deferred_bytes: usize = deferred.iter().map(deferred_cost).sum();
    let mut refreshed = false;
    loop {
        let fits = |m: &Message| deferred_bytes + deferred_cost(m) <= DEFERRED_BYTES;
        let seen = match stream.as_mut().peek().await {
            None | Some(Ok(Message::Close(_))) => Seen::Gone,
            Some(Err(e)) if matches!(read_error(e), End::Gone) => Seen::Gone,
            Some(Err(_)) => Seen::Stop,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Seen::Control,
            Some(Ok(msg)) => match msg {
                Message::Text(text) => match ClientMessage::parse(text) {
                    Ok(ClientMessage::Ping { id }) => Seen::Ping(id),
                    Ok(ClientMessage::Auth { token }) if fits(msg) => Seen::Auth(token),
                    _ if fits(msg) => Seen::Keep,
                    _ => Seen::Stop,
                },
                _ if fits(msg) => Seen::Keep,
                _ => Seen::Stop,
            },
        };
        let keep = matches!(seen, Seen::Keep | Seen::Auth(_));
        match seen {
            Seen::Gone => return,
            Seen::Stop => break,
            Seen::Auth(token) => {
                // One signature check per subscribe: the frame rate limit applies to the
                // frames only once the main loop reads them.
                if let Some(early) = early.filter(|_| !refreshed) {
                    early.apply(&token);
                    refreshed = true;
                }
            }
            Seen::Ping(id) => {
                // Waits while the subscribe has not answered the earlier ones; the frame stays
                // unread meanwhile.
                let Ok(slot) = pings.reserve().await else {
                    break;
                };
                slot.send(id);
            }
            Seen::Control | Seen::Keep => {}
        }
        // A whole frame is in: the socket's per-frame read deadline starts again.
        admission.frame_received();
        if let Some(Ok(msg)) = stream.as_mut().next().await {
            if keep {
                deferred_bytes += deferred_cost(&msg);
                deferred.push_back(msg);
            }
        }
    }
    // A frame left for the main loop once the subscribe has ended.
    admission.frame_received();
    std::future::pending().await
}

/// What a frame kept while a subscribe runs counts against [`DEFERRED_BYTES`].
fn deferred_cost(msg: &Message) -> usize {
    let payload = match msg {
        Message::Text(text) => text.len(),
        Message::Binary(bytes) => bytes.len(),
        _ => 0,
    };
    payload + DEFERRED_FRAME_COST
}

/// Runs a socket write, giving up when the connection is evicted (slow, or a gap), when the server shuts
/// down, or when the peer has not taken the bytes within `limit` (a peer that sends but never
/// reads): no peer can hold its task, and with it a connection slot, forever.
///
/// A write the socket takes at once (the common case: its buffer has room) finishes on its
/// first poll, before any timer or cancellation waiter is set up: under fan-out this runs once
/// per connection and event.
async fn guarded(
    write: impl std::future::Future<Output = Result<(), axum::Error>>,
    limit: Duration,
    outbox: &Outbox,
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
        () = outbox.evicted.cancelled() => Err(evicted(outbox)),
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

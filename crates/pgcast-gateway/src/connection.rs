//! One WebSocket connection: authentication, then a single task that reads client frames,
//! writes queued event frames and heartbeats under one `select!`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use pgcast_events::{
    Access, ClientMessage, ErrorCode, EventFrame, Position, Principal, ServerMessage, Topic,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::hub::{ConnHandle, Outbound, Subscription};
use crate::{db, Shared};

/// Close codes of protocol v1 (design §4).
pub(crate) mod close {
    /// Server shutting down.
    pub(crate) const GOING_AWAY: u16 = 1001;
    /// Authentication failed or missing.
    pub(crate) const POLICY: u16 = 1008;
    /// A frame or message over the size limit.
    pub(crate) const TOO_BIG: u16 = 1009;
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
type Stream = SplitStream<WebSocket>;

/// Why the connection ends.
enum End {
    /// Close with this code and reason.
    Close(u16, &'static str),
    /// The peer is gone or the socket broke: nothing more to write.
    Gone,
}

struct ActiveSub {
    sub: Arc<Subscription>,
    /// Frames at or below this position were already sent (by snapshot or replay) and are
    /// dropped when they arrive from the live queue.
    delivered_through: Position,
}

/// Serves one upgraded socket until it closes.
pub(crate) async fn serve(socket: WebSocket, shared: Arc<Shared>) {
    shared.metrics.connections.inc();
    let (sink, stream) = socket.split();
    let (tx, rx) = mpsc::channel(shared.config.outbound_capacity);
    let mut conn = Connection {
        handle: Arc::new(ConnHandle {
            tx,
            slow: CancellationToken::new(),
        }),
        shutdown: shared.shutdown.child_token(),
        shared,
        sink,
        stream,
        rx,
        subs: Vec::new(),
        batch: Vec::new(),
        principal: None,
        last_heard: Instant::now(),
        tokens: 0.0,
        tokens_at: Instant::now(),
    };
    let end = conn.run().await;
    for s in conn.subs.drain(..) {
        conn.shared.hub.unsubscribe(&s.sub);
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

struct Connection {
    shared: Arc<Shared>,
    handle: Arc<ConnHandle>,
    shutdown: CancellationToken,
    sink: Sink,
    stream: Stream,
    rx: mpsc::Receiver<Outbound>,
    subs: Vec<ActiveSub>,
    /// Frames picked for one write; kept to reuse its allocation.
    batch: Vec<Utf8Bytes>,
    principal: Option<Principal>,
    last_heard: Instant,
    /// Token bucket of the client frame rate limit.
    tokens: f64,
    tokens_at: Instant,
}

impl Connection {
    async fn run(&mut self) -> End {
        let principal = match self.authenticate().await {
            Ok(p) => p,
            Err(end) => {
                self.shared.metrics.auth_failures.inc();
                return end;
            }
        };
        self.principal = Some(principal);
        if let Err(end) = self
            .send(ServerMessage::Ready {
                user_id: principal.user_id,
                role: principal.role,
            })
            .await
        {
            return end;
        }
        self.tokens = self.burst();
        let interval = self.shared.config.heartbeat_interval;
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let step = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => Err(End::Close(close::GOING_AWAY, "server shutting down")),
                () = self.handle.slow.cancelled() => Err(End::Close(close::SLOW_CONSUMER, "slow consumer: resume with since")),
                msg = self.stream.next() => self.on_frame(msg).await,
                Some(out) = self.rx.recv() => self.deliver(out).await,
                _ = heartbeat.tick() => self.heartbeat(interval).await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Waits for the `auth` frame; anything else first is refused with 1008.
    async fn authenticate(&mut self) -> Result<Principal, End> {
        let deadline = tokio::time::Instant::now() + self.shared.config.auth_timeout;
        loop {
            let msg = tokio::select! {
                () = self.shutdown.cancelled() => return Err(End::Close(close::GOING_AWAY, "server shutting down")),
                r = tokio::time::timeout_at(deadline, self.stream.next()) => match r {
                    Ok(msg) => msg,
                    Err(_) => return Err(self.refuse("no auth frame in time").await),
                },
            };
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
            if token.len() > self.shared.config.max_token_bytes {
                return Err(self.refuse("token too long").await);
            }
            return match self.shared.verifier.verify(&token) {
                Ok(p) => Ok(p),
                Err(error) => {
                    // The reason goes to the log (never the token itself); the client gets the code.
                    tracing::info!(%error, "websocket authentication failed");
                    Err(self.refuse("invalid token").await)
                }
            };
        }
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
            Ok(ClientMessage::Auth { .. }) => {
                self.error(None, ErrorCode::BadRequest, "already authenticated")
                    .await
            }
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
                self.subscribe(id, &topic, since, snapshot.unwrap_or(false))
                    .await
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
        let allowed = match topic.authorize(&principal) {
            Access::Allowed => true,
            Access::Forbidden => false,
            Access::NeedsSessionCheck => {
                let Topic::Session(session) = topic else {
                    return Err(End::Gone);
                };
                match db::may_follow_session(self.shared.log.pool(), session, &principal).await {
                    Ok(ok) => ok,
                    Err(error) => {
                        tracing::warn!(%error, "session ownership check failed");
                        return self
                            .error(id, ErrorCode::Unavailable, "could not check access; retry")
                            .await;
                    }
                }
            }
        };
        if !allowed {
            return self
                .error(
                    id,
                    ErrorCode::Forbidden,
                    "not allowed to subscribe to this topic",
                )
                .await;
        }

        // Register first, then read: an event is either dispatched after this point (and
        // queued for us) or committed before the read below (and in it), or both — then the
        // position filter drops the copy.
        let sub = Arc::new(Subscription {
            id: self.shared.hub.next_id(),
            topic,
            principal,
            conn: self.handle.clone(),
        });
        let head = self.shared.hub.subscribe(sub.clone());
        let topic_name = topic.to_string();
        let result = if snapshot {
            self.start_with_snapshot(&sub, id, topic_name).await
        } else if let Some(since) = since {
            self.start_with_replay(&sub, id, topic_name, since).await
        } else {
            self.send(ServerMessage::Subscribed {
                id,
                topic: topic_name,
                position: head,
            })
            .await
            .map(|()| Some(head))
        };
        match result {
            Ok(Some(delivered_through)) => {
                self.subs.push(ActiveSub {
                    sub,
                    delivered_through,
                });
                Ok(())
            }
            Ok(None) => {
                self.shared.hub.unsubscribe(&sub);
                Ok(())
            }
            Err(end) => {
                self.shared.hub.unsubscribe(&sub);
                Err(end)
            }
        }
    }

    /// `Ok(None)`: the subscription did not start (an error was sent to the client).
    async fn start_with_snapshot(
        &mut self,
        sub: &Subscription,
        id: Option<String>,
        topic: String,
    ) -> Result<Option<Position>, End> {
        let limit = self.shared.config.snapshot_limit;
        match db::snapshot(self.shared.log.pool(), &sub.topic, &sub.principal, limit).await {
            Ok((position, assignments)) => {
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
                .await?;
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

    async fn start_with_replay(
        &mut self,
        sub: &Subscription,
        id: Option<String>,
        topic: String,
        since: Position,
    ) -> Result<Option<Position>, End> {
        let log = self.shared.log.clone();
        let head = match log.head().await {
            Ok(h) => h,
            Err(error) => {
                tracing::warn!(%error, "reading the log head failed");
                self.error(id, ErrorCode::Unavailable, "replay failed; retry")
                    .await?;
                return Ok(None);
            }
        };
        self.send(ServerMessage::Subscribed {
            id: id.clone(),
            topic: topic.clone(),
            position: since,
        })
        .await?;
        if since < head.pruned_through || since > head.head {
            let reason = if since > head.head {
                "since is ahead of the event log"
            } else {
                "since is older than the retained event log"
            };
            self.send(ServerMessage::Resync {
                topic,
                reason: reason.to_owned(),
            })
            .await?;
            return Ok(None);
        }
        // Replay up to the head read above, which was read after registering: every later
        // event is queued for this subscription by the hub, so the replay ends instead of
        // chasing writers. The next page is read while the current one is written.
        let replay_failed = |error: pgcast_listener::ListenerError| {
            tracing::warn!(%error, "replay read failed");
            // The client resumes from the last position it received.
            End::Close(close::GOING_AWAY, "replay failed: resume with since")
        };
        let mut page = log
            .read_range(since, head.head, REPLAY_PAGE)
            .await
            .map_err(replay_failed)?;
        loop {
            for (position, error) in &page.undecodable {
                tracing::warn!(position, %error, "skipping undecodable log row in replay");
            }
            let mut frames: Vec<Utf8Bytes> = page
                .events
                .iter()
                .filter(|event| sub.topic.matches(&sub.principal, event))
                .map(|event| EventFrame::encode(&sub.topic, event).into())
                .collect();
            let more = page.rows == REPLAY_PAGE as usize;
            let after = page.last.unwrap_or(head.head);
            let prefetch = async {
                if more {
                    Some(log.read_range(after, head.head, REPLAY_PAGE).await)
                } else {
                    None
                }
            };
            let (next, written) = tokio::join!(prefetch, self.write_frames(&mut frames));
            written?;
            match next {
                None => return Ok(Some(head.head)),
                Some(next) => page = next.map_err(replay_failed)?,
            }
        }
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
        guarded(write, limit, &self.handle.slow, &self.shutdown).await?;
        self.shared.metrics.frames.inc_by(count);
        Ok(())
    }

    /// Writes one queued frame, and whatever else is already waiting, with a single flush.
    ///
    /// The frames are picked first and then written under one guard (slow, shutdown, write
    /// timeout), not one per frame: under fan-out this loop runs a million times a second.
    /// The latency histogram gets one sample per batch: the oldest commit in the batch to the
    /// moment the batch is written (the batch's worst case).
    async fn deliver(&mut self, first: Outbound) -> Result<(), End> {
        let mut batch = std::mem::take(&mut self.batch);
        let mut oldest_commit = i64::MAX;
        let mut next = Some(first);
        while let Some(out) = next.take() {
            if let Some(frame) = self.accept(&out) {
                batch.push(frame);
                oldest_commit = oldest_commit.min(out.committed_micros);
            }
            if batch.len() < WRITE_BATCH {
                next = self.rx.try_recv().ok();
            }
        }
        if batch.is_empty() {
            self.batch = batch;
            return Ok(());
        }
        let result = self.write_frames(&mut batch).await;
        self.batch = batch;
        result?;
        let now = chrono::Utc::now().timestamp_micros();
        let latency = (now - oldest_commit).max(0) as f64 / 1e6;
        self.shared.metrics.latency.observe(latency);
        Ok(())
    }

    /// The frame to send for `out`, or `None` if its subscription is gone or already has it.
    fn accept(&mut self, out: &Outbound) -> Option<Utf8Bytes> {
        let sub = self.subs.iter_mut().find(|s| s.sub.id == out.sub)?;
        if out.position <= sub.delivered_through {
            return None;
        }
        sub.delivered_through = out.position;
        Some(out.frame.clone())
    }

    async fn heartbeat(&mut self, interval: Duration) -> Result<(), End> {
        if self.last_heard.elapsed() > interval * 2 {
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
            &self.handle.slow,
            &self.shutdown,
        )
        .await
    }

    /// Writes the socket's buffer out.
    async fn flush(&mut self) -> Result<(), End> {
        let limit = self.shared.config.heartbeat_interval * 2;
        guarded(self.sink.flush(), limit, &self.handle.slow, &self.shutdown).await
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

/// Runs a socket write, giving up when the connection is declared slow, when the server shuts
/// down, or when the peer has not taken the bytes within `limit` (a peer that sends but never
/// reads): no peer can hold its task, and with it a connection slot, forever.
async fn guarded(
    write: impl std::future::Future<Output = Result<(), axum::Error>>,
    limit: Duration,
    slow: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<(), End> {
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

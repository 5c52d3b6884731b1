//! `subscribe`: the access check (from the token, or from the session's rows), filing in the
//! hub, and the start position: live from the hub's head, a snapshot, or a replay after
//! `since`. Database reads wait their turn ([`gated`]).

use std::sync::Arc;

use axum::extract::ws::Message;
use pgcast_events::{
    Access, AssignmentEvent, ErrorCode, Position, Role, ServerMessage, SessionMembership, Topic,
};
use pgcast_listener::LogHead;

use super::{
    ActiveSub, Connection, End, Registered, SocketSink, SocketStream, OLDER_THAN_WINDOW, PRUNED,
    REDRAWN,
};
use crate::hub::Subscription;
use crate::{db, GatewayError, Shared};

impl<Si: SocketSink, St: SocketStream> Connection<Si, St> {
    pub(super) async fn subscribe(
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
                let shared = self.shared.clone();
                let owns = db::owns_session(shared.log.pool(), session, principal.user_id);
                match self.in_turn(owns).await? {
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

    pub(super) async fn forbidden(&mut self, id: Option<String>) -> Result<(), End> {
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
    pub(super) async fn start_following(
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
        let shared = self.shared.clone();
        let read = db::mechanic_session(shared.log.pool(), session, mechanic, rows_limit);
        let view = match self.in_turn(read).await? {
            Ok(view) => view,
            Err(error) => {
                tracing::warn!(%error, "session membership check failed");
                self.failed(id, &error, "could not check access; retry")
                    .await?;
                return Ok(None);
            }
        };
        if view.granting.is_empty() {
            match since {
                // Removed while away, perhaps: what they missed up to that change, then
                // `revoked`, as they would have had it live.
                Some(since) if view.rows.is_none() && since <= view.head.head => {
                    let membership = SessionMembership::new(session, mechanic, []);
                    self.resume_removed(sub, id, topic, since, view.head, membership)
                        .await?;
                }
                _ => self.forbidden(id).await?,
            }
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

    /// A mechanic who is no member of the session at `head` resuming with `since`: if they were
    /// one at `since` (removed while away), `subscribed`, the events they could see up to the
    /// change that removed them, then `revoked`; the subscription never goes live. A history
    /// that cannot be read (pruned past `since`, too long, drawn again) gets `resync`, as any
    /// resume from there would; a mechanic who was no member then either, `forbidden`.
    async fn resume_removed(
        &mut self,
        sub: &Subscription,
        id: Option<String>,
        topic: String,
        since: Position,
        head: LogHead,
        mut membership: SessionMembership,
    ) -> Result<(), End> {
        let reason = if self.shared.hub.redrawn(since) {
            REDRAWN
        } else {
            match self.session_history(since, head, &mut membership).await? {
                Ok(history) if membership.is_member() => {
                    self.send_subscribed(id, &topic, since).await?;
                    self.write_following(sub, &history, &mut membership).await?;
                    return self
                        .send(ServerMessage::Revoked {
                            topic,
                            reason: super::NO_LONGER_ASSIGNED.to_owned(),
                        })
                        .await;
                }
                Ok(_) => return self.forbidden(id).await,
                Err(reason) => reason,
            }
        };
        // Whether they were a member at `since` cannot be told (as for any resume from there).
        self.send_subscribed(id, &topic, since).await?;
        self.resync(topic, reason).await
    }

    /// `subscribed` at `position`, then the snapshot taken there; nothing once the token has
    /// expired (the read may have waited for its turn past `exp`, and shows rows as they stand
    /// when it ran).
    pub(super) async fn send_snapshot(
        &mut self,
        id: Option<String>,
        topic: String,
        position: Position,
        assignments: Vec<pgcast_events::Assignment>,
    ) -> Result<(), End> {
        if self.past_expiry() {
            return Err(End::Expired);
        }
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
    pub(super) async fn start_with_snapshot(
        &mut self,
        sub: &Subscription,
        id: Option<String>,
        topic: String,
    ) -> Result<Option<Position>, End> {
        let limit = self.shared.config.snapshot_limit;
        let shared = self.shared.clone();
        let read = db::snapshot(shared.log.pool(), &sub.topic, &sub.principal, limit);
        match self.in_turn(read).await? {
            Ok((position, assignments)) => {
                self.send_snapshot(id, topic, position, assignments).await?;
                Ok(Some(position))
            }
            Err(error) => {
                tracing::warn!(%error, "snapshot failed");
                self.failed(id, &error, "snapshot failed; retry").await?;
                Ok(None)
            }
        }
    }

    /// Tells the client that a database read for its subscribe failed: `snapshot_too_large`
    /// when asking again cannot help, else `unavailable` with `retry`.
    async fn failed(
        &mut self,
        id: Option<String>,
        error: &GatewayError,
        retry: &str,
    ) -> Result<(), End> {
        if let GatewayError::SnapshotTooLarge(limit) = error {
            let message = format!(
                "the snapshot would hold more than {limit} rows (the server's snapshot limit); \
                 follow the topic without a snapshot"
            );
            return self.error(id, ErrorCode::SnapshotTooLarge, &message).await;
        }
        self.error(id, ErrorCode::Unavailable, retry).await
    }

    /// Replays the topic's events after `since` up to `hub_head` (the hub's head when the
    /// subscription was filed: every later event is queued for it by the hub, so the replay
    /// ends instead of chasing writers). From the replay window when it reaches back to
    /// `since`, without a database read; otherwise from the log, except for `queue`, whose page
    /// is its open rows: a client that far behind takes a snapshot (`resync`) instead of
    /// making the log be scanned for the few rows it can use. `Ok(None)`: the subscription did
    /// not start (an error or `resync` was sent).
    pub(super) async fn start_with_replay(
        &mut self,
        sub: &Subscription,
        id: Option<String>,
        topic: String,
        since: Position,
        hub_head: Position,
    ) -> Result<Option<Position>, End> {
        if self.shared.hub.redrawn(since) {
            // What the client saw at `since` is not what the log holds there any more.
            self.send_subscribed(id, &topic, since).await?;
            self.resync(topic, REDRAWN).await?;
            return Ok(None);
        }
        if since > hub_head {
            // The client has seen events this replica has not dispatched yet (another replica
            // served it, or this one is still catching up): nothing to replay, as everything
            // after `hub_head` reaches the subscription through the hub; `since` only needs to
            // be a position the log has reached.
            let shared = self.shared.clone();
            let head = match self.in_turn(shared.log.head()).await? {
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
            // Queued, not flushed: written with the replay's frames, in one write (a restarted
            // replica's reconnecting clients resume from here, thousands at once).
            self.feed(Message::Text(
                ServerMessage::Subscribed {
                    id,
                    topic,
                    position: since,
                }
                .encode()
                .into(),
            ))
            .await?;
            self.write_events(sub, events.iter()).await?;
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
    pub(super) async fn resume_following(
        &mut self,
        sub: &Subscription,
        id: Option<String>,
        topic: String,
        since: Position,
        head: LogHead,
        membership: &mut SessionMembership,
    ) -> Result<Option<Position>, End> {
        self.send_subscribed(id, &topic, since).await?;
        let reason = if self.shared.hub.redrawn(since) {
            Some(REDRAWN)
        } else if since > head.head {
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

    /// Runs a database read in its turn ([`gated`]), answering the client's pings while it
    /// waits.
    pub(super) async fn in_turn<T>(
        &mut self,
        read: impl std::future::Future<Output = T>,
    ) -> Result<T, End> {
        let shared = self.shared.clone();
        self.answering(gated(&shared, read)).await
    }

    /// Waits for `work`, answering the client's pings meanwhile (a subscribe's replay can read
    /// the log for a while without a frame to write).
    pub(super) async fn answering<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, End> {
        tokio::pin!(work);
        loop {
            let ping = async {
                match self.pings.as_mut() {
                    Some(pings) => pings.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                out = &mut work => return Ok(out),
                Some(id) = ping => {
                    // The work goes on while the pong is written: a client slow to take it
                    // must not hold a database read (its permit, its pooled connection).
                    let pong = self.pong(id);
                    tokio::pin!(pong);
                    let mut done = None;
                    loop {
                        tokio::select! {
                            written = &mut pong => break written?,
                            out = &mut work, if done.is_none() => done = Some(out),
                        }
                    }
                    if let Some(out) = done {
                        return Ok(out);
                    }
                }
            }
        }
    }

    pub(super) async fn send_subscribed(
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

    pub(super) async fn resync(&mut self, topic: String, reason: &str) -> Result<(), End> {
        self.send(ServerMessage::Resync {
            topic,
            reason: reason.to_owned(),
        })
        .await
    }
}

/// Runs a database read in its turn: at most `max_concurrent_reads` run at once, the others
/// wait first come, first served (tokio's semaphore is fair). The wait has no deadline of its
/// own: the connection that waits still sees shutdown, its eviction and its peer
/// leaving (and answers pings, [`Connection::in_turn`]), and each read is bounded by the pool's
/// statement timeout.
pub(super) async fn gated<T>(shared: &Shared, read: impl std::future::Future<Output = T>) -> T {
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

//! `since` replays: frames of events the subscriber missed, from the log page by page (or, for
//! a mechanic's session, judged by the membership at each event's position).

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use pgcast_events::{AssignmentEvent, EventFrame, Position, SessionMembership, Topic, Verdict};
use pgcast_listener::LogHead;

use super::subscribe::gated;
use super::{close, Connection, End, SocketSink, SocketStream, PRUNED, REPLAY_PAGE};
use crate::hub::Subscription;
use crate::window::Entry;

impl<Si: SocketSink, St: SocketStream> Connection<Si, St> {
    /// Writes `events` (already judged visible) as frames of `sub`, stopping at the first one
    /// committed at or after the token's `exp` (then the connection expires). Each page of
    /// frames is one flush, the first with whatever was queued before it.
    pub(super) async fn write_events<E: Replayed>(
        &mut self,
        sub: &Subscription,
        events: impl Iterator<Item = E>,
    ) -> Result<(), End> {
        let mut frames = Vec::new();
        let mut expired = false;
        for event in events {
            if event.event().committed_at.timestamp_micros() >= self.expires_micros() {
                expired = true;
                break;
            }
            frames.push(event.frame(&sub.topic));
            if frames.len() == REPLAY_PAGE as usize {
                self.write_frames(&mut frames).await?;
                self.answer_pings().await?;
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
    /// `Ok(Some(reason))`: the client must resync. Either a prune overtook the replay (a page
    /// came back with the retention boundary inside its range), so what follows would have a
    /// gap; nothing of that page was sent. Or the replay passed over more log rows that are not
    /// the topic's than `replay_scan_limit`, after writing what it found up to there: a topic
    /// with few events (one customer's) resumed from far back must not keep the gateway's reads
    /// busy for the whole retained log, while one that gets most events (`assignments`) catches
    /// up from as far back as it likes.
    pub(super) async fn replay(
        &mut self,
        sub: &Subscription,
        since: Position,
        through: Position,
    ) -> Result<Option<&'static str>, End> {
        let shared = self.shared.clone();
        let read = |after| gated(&shared, shared.log.read_range(after, through, REPLAY_PAGE));
        let mut page_after = since;
        let mut page = self.answering(read(since)).await?.map_err(replay_failed)?;
        let skip_limit = self.shared.config.replay_scan_limit;
        let mut skipped = 0_usize;
        loop {
            if page.pruned_past(page_after) {
                return Ok(Some(PRUNED));
            }
            for row in &page.undecodable {
                let (position, error) = (row.position, &row.error);
                tracing::warn!(position, %error, "skipping undecodable log row in replay");
            }
            let mut frames = Vec::new();
            let mut expired = false;
            for event in &page.events {
                if !sub.topic.matches(&sub.principal, event) {
                    continue;
                }
                if event.committed_at.timestamp_micros() >= self.expires_micros() {
                    expired = true;
                    break;
                }
                frames.push(EventFrame::encode(&sub.topic, event).into());
            }
            skipped = skipped.saturating_add(page.rows.saturating_sub(frames.len()));
            let more = !expired && page.rows == REPLAY_PAGE as usize;
            if more && skipped > skip_limit {
                // What this page found is written; the rest comes with the snapshot.
                self.write_frames(&mut frames).await?;
                return Ok(Some(SPARSE_REPLAY));
            }
            let after = page.last.unwrap_or(through);
            let prefetch = async {
                if more {
                    Some(read(after).await)
                } else {
                    None
                }
            };
            tokio::pin!(prefetch);
            // The next page is read while this one is written; the client's pings are answered
            // while it is awaited (a quiet topic writes nothing for page after page).
            let mut next = None;
            {
                let write = self.write_frames(&mut frames);
                tokio::pin!(write);
                loop {
                    tokio::select! {
                        written = &mut write => break written?,
                        page = &mut prefetch, if next.is_none() => next = Some(page),
                    }
                }
            }
            if expired {
                return Err(End::Expired);
            }
            // Pings are answered with no read in flight, or while it goes on.
            let next = match next {
                Some(next) => {
                    self.answer_pings().await?;
                    next
                }
                None => self.answering(&mut prefetch).await?,
            };
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
    pub(super) async fn replay_following(
        &mut self,
        sub: &Subscription,
        since: Position,
        head: LogHead,
        membership: &mut SessionMembership,
    ) -> Result<Option<&'static str>, End> {
        let events = match self.session_history(since, head, membership).await? {
            Ok(events) => events,
            Err(reason) => return Ok(Some(reason)),
        };
        self.write_following(sub, &events, membership).await?;
        Ok(None)
    }

    /// Writes the events of `history` the mechanic could see at their own positions, moving
    /// `membership` (at the history's start) forward through all of them.
    pub(super) async fn write_following(
        &mut self,
        sub: &Subscription,
        history: &[AssignmentEvent],
        membership: &mut SessionMembership,
    ) -> Result<(), End> {
        let visible: Vec<&AssignmentEvent> = history
            .iter()
            .filter(|e| membership.apply(e) != Verdict::Skip)
            .collect();
        self.write_events(sub, visible.into_iter()).await
    }

    /// The session's events in `(since, head]`, read from the log, with `membership` rewound
    /// from `head` to `since`. `Ok(Err(reason))`: they cannot all be read (the log was pruned
    /// past `since`, there are more than a replay holds (`snapshot_limit`), or finding them would
    /// read more than `replay_scan_limit` log rows) and `membership` is unchanged.
    pub(super) async fn session_history(
        &mut self,
        since: Position,
        head: LogHead,
        membership: &mut SessionMembership,
    ) -> Result<Result<Vec<AssignmentEvent>, &'static str>, End> {
        let shared = self.shared.clone();
        let mut events: Vec<AssignmentEvent> = Vec::new();
        let mut after = since;
        // The log is read whole and filtered here: a session far behind, or one the mechanic
        // never had a part in (refused only once its history is read), must not keep the
        // gateway's reads busy for the whole retained log.
        let scan_limit = self.shared.config.replay_scan_limit;
        let mut scanned = 0_usize;
        loop {
            let read = shared.log.read_range(after, head.head, REPLAY_PAGE);
            let page = self.in_turn(read).await?.map_err(replay_failed)?;
            if page.pruned_past(after) {
                return Ok(Err(PRUNED));
            }
            // A row of the session (or of no session that can be read) that did not decode
            // may have changed the membership: rewinding past it would judge the events
            // before it by a membership they did not have.
            let session = membership.session();
            if let Some(row) = page
                .undecodable
                .iter()
                .find(|row| row.session_id.is_none_or(|id| id == session))
            {
                let (position, error) = (row.position, &row.error);
                tracing::warn!(position, %error, "undecodable log row in a session replay");
                return Ok(Err(UNDECODABLE_IN_SESSION));
            }
            events.extend(
                page.events
                    .into_iter()
                    .filter(|e| e.assignment.session_id == membership.session()),
            );
            if events.len() > self.shared.config.snapshot_limit {
                return Ok(Err(
                    "the session's history since then is longer than a replay holds; \
                     take a snapshot",
                ));
            }
            scanned = scanned.saturating_add(page.rows);
            match page.last {
                Some(last)
                    if page.rows == REPLAY_PAGE as usize
                        && last < head.head
                        && scanned >= scan_limit =>
                {
                    return Ok(Err(
                        "the log since then is longer than a session replay reads; take a \
                         snapshot",
                    ));
                }
                Some(last) if page.rows == REPLAY_PAGE as usize => after = last,
                _ => break,
            }
        }
        for event in events.iter().rev() {
            membership.rewind(event);
        }
        Ok(Ok(events))
    }
}

/// `resync`'s reason when a replay would read too much of the log for the topic's few events.
const SPARSE_REPLAY: &str =
    "the log since then is longer than a replay of this topic reads; take a snapshot";

/// `resync`'s reason when a session's history holds a change that could not be read.
const UNDECODABLE_IN_SESSION: &str =
    "a change to this session since then could not be read; take a snapshot";

/// A replay read failed: the client resumes from the last position it received.
fn replay_failed(error: pgcast_listener::ListenerError) -> End {
    tracing::warn!(%error, "replay read failed");
    End::Close(close::GOING_AWAY, "replay failed: resume with since")
}

/// An event a replay writes: one read from the log for this client (encoded here), or one of
/// the replay window (whose frame for the topic is encoded once and shared by every replay).
pub(super) trait Replayed {
    fn event(&self) -> &AssignmentEvent;
    fn frame(&self, topic: &Topic) -> Utf8Bytes;
}

impl Replayed for &AssignmentEvent {
    fn event(&self) -> &AssignmentEvent {
        self
    }

    fn frame(&self, topic: &Topic) -> Utf8Bytes {
        EventFrame::encode(topic, self).into()
    }
}

impl Replayed for &Arc<Entry> {
    fn event(&self) -> &AssignmentEvent {
        &self.event
    }

    fn frame(&self, topic: &Topic) -> Utf8Bytes {
        Entry::frame(self, topic)
    }
}

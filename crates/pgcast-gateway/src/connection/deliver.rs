//! Live delivery: the frames the hub queued in the outbox, checked against each subscription's
//! position, membership and the token's expiry, written in batches with one flush.

use axum::extract::ws::{Message, Utf8Bytes};
use futures::SinkExt;
use pgcast_events::{ServerMessage, Verdict};
use tokio::time::Instant;

use super::{guarded, Connection, End, SocketSink, SocketStream, NO_LONGER_ASSIGNED};
use crate::hub::{MembershipChange, Outbound};

impl<Si: SocketSink, St: SocketStream> Connection<Si, St> {
    /// Writes (and drains) `frames` with one flush, under one guard.
    pub(super) async fn write_frames(&mut self, frames: &mut Vec<Utf8Bytes>) -> Result<(), End> {
        let count = frames.len() as u64;
        let sink = &mut self.sink;
        let write = async move {
            for frame in frames.drain(..) {
                sink.feed(Message::Text(frame)).await?;
            }
            sink.flush().await
        };
        let limit = self.shared.config.heartbeat_interval * 2;
        guarded(write, limit, &self.outbox, &self.shutdown).await?;
        self.last_written = Instant::now();
        self.shared.metrics.frames.inc_by(count);
        Ok(())
    }

    /// Writes the frames taken from the outbox (up to a batch) with a single flush.
    ///
    /// The frames are picked first and then written under one guard (eviction, shutdown, write
    /// timeout), not one per frame: under fan-out this loop runs a million times a second.
    /// The latency histogram gets one sample per batch: the oldest commit in the batch to the
    /// moment the batch is written (the batch's worst case). An event committed at or after
    /// the token's `exp` is never written: what came before it is, then the connection expires.
    pub(super) async fn deliver(&mut self, taken: &mut Vec<Outbound>) -> Result<(), End> {
        let mut batch = std::mem::take(&mut self.batch);
        let mut oldest_commit = i64::MAX;
        let mut expired = false;
        for out in taken.drain(..) {
            if expired {
                continue;
            }
            if let Some((frame, revoked)) = self.accept(&out) {
                if out.committed_micros >= self.expires_micros() {
                    expired = true;
                    continue;
                }
                if let Some(frame) = frame {
                    batch.push(frame);
                    oldest_commit = oldest_commit.min(out.committed_micros);
                }
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
        // A batch of `revoked` frames alone delivered no event.
        if oldest_commit != i64::MAX {
            let now = chrono::Utc::now().timestamp_micros();
            let latency = (now - oldest_commit).max(0) as f64 / 1e6;
            self.shared.metrics.latency.observe(latency);
        }
        if expired {
            return Err(End::Expired);
        }
        Ok(())
    }

    /// The frames to send for `out`: the event's, then `revoked` when the entry ends a
    /// mechanic's membership of a session (the subscription is removed here); `None` if its
    /// subscription is gone, already has it, or may not see it.
    pub(super) fn accept(
        &mut self,
        out: &Outbound,
    ) -> Option<(Option<Utf8Bytes>, Option<Utf8Bytes>)> {
        let i = self.subs.iter().position(|s| s.sub.id == out.sub)?;
        let active = &mut self.subs[i];
        if out.position <= active.delivered_through {
            return None;
        }
        active.delivered_through = out.position;
        let (frame, reason) = match (&mut active.membership, &out.membership) {
            (None, None) => return Some((Some(out.frame.clone()), None)),
            (Some(membership), Some(MembershipChange::Event(event))) => {
                match membership.apply(event) {
                    Verdict::Deliver => return Some((Some(out.frame.clone()), None)),
                    Verdict::DeliverThenRevoke => (Some(out.frame.clone()), NO_LONGER_ASSIGNED),
                    Verdict::Skip => return None,
                }
            }
            // A change of the session that could not be read may have ended the membership.
            (Some(_), Some(MembershipChange::Unknown)) => (None, MEMBERSHIP_UNREADABLE),
            // The hub attaches the event to every entry of these subscriptions, and to no
            // other; without it the right cannot be judged, so nothing is sent.
            (Some(_), None) | (None, Some(_)) => return None,
        };
        let gone = self.subs.swap_remove(i);
        self.shared.hub.unsubscribe(&gone.sub);
        let revoked = ServerMessage::Revoked {
            topic: gone.sub.topic.to_string(),
            reason: reason.to_owned(),
        };
        Some((frame, Some(revoked.encode().into())))
    }
}

/// `revoked`'s reason when a change of the session could not be read from the log.
const MEMBERSHIP_UNREADABLE: &str =
    "a change to this session could not be read, so access to it can no longer be judged";

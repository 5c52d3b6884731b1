//! The replay window: the newest events the listener delivered, kept in memory so that a client
//! resuming with `since` (after a restart, a deploy or a network blip: thousands at once) is
//! served without a database query. The listener read each of these events from the log once;
//! every resume inside the window shares that read.
//!
//! The window holds exactly the listener's stream, which is the log in position order, so the
//! events it returns for a range are the log's events for that range.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};

use pgcast_events::{AssignmentEvent, Position};

/// The newest events, at most `capacity` of them.
pub(crate) struct ReplayWindow {
    capacity: usize,
    inner: RwLock<Events>,
}

struct Events {
    /// The window holds every event with `floor < position <= last pushed`.
    floor: Position,
    /// In position order.
    events: VecDeque<Arc<AssignmentEvent>>,
}

impl ReplayWindow {
    pub(crate) fn new(capacity: usize) -> Self {
        ReplayWindow {
            capacity,
            inner: RwLock::new(Events {
                floor: Position::MAX,
                events: VecDeque::new(),
            }),
        }
    }

    /// The stream starts after `position`: the window covers nothing below it.
    pub(crate) fn start_after(&self, position: Position) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.floor = position;
        inner.events.clear();
    }

    /// Appends the stream's next event, dropping the oldest when full. Called before the
    /// event is dispatched, so the window always reaches the hub's head.
    pub(crate) fn push(&self, event: &Arc<AssignmentEvent>) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if self.capacity == 0 {
            inner.floor = event.position;
            return;
        }
        if inner.events.len() == self.capacity {
            if let Some(oldest) = inner.events.pop_front() {
                inner.floor = oldest.position;
            }
        }
        inner.events.push_back(event.clone());
    }

    /// The events with `since < position <= through` that `keep` accepts, in order; `None`
    /// when the window no longer reaches back to `since` (or does not reach `through` yet), so
    /// the range must be read from the log.
    pub(crate) fn range(
        &self,
        since: Position,
        through: Position,
        mut keep: impl FnMut(&AssignmentEvent) -> bool,
    ) -> Option<Vec<Arc<AssignmentEvent>>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let last = inner.events.back().map_or(inner.floor, |e| e.position);
        if since < inner.floor || through > last || since > through {
            return None;
        }
        let start = inner.events.partition_point(|e| e.position <= since);
        Some(
            inner
                .events
                .range(start..)
                .take_while(|e| e.position <= through)
                .filter(|e| keep(e))
                .cloned()
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(position: Position) -> Arc<AssignmentEvent> {
        let text = format!(
            r#"{{"position":{position},"op":"insert","committed_at":"2026-11-25T19:32:44.5+00:00",
            "row":{{"id":"5b7f8a52-8f0e-4d51-9d7e-6a1f0f2f0c11",
            "session_id":"0e6b3a57-3f4c-4a9e-8a55-2f4b7a7d9a10","mechanic_id":null,
            "workshop_id":null,"status":"queued","created_at":"2026-11-25T19:32:43+00:00",
            "updated_at":"2026-11-25T19:32:43+00:00"}},"old":null}}"#
        );
        Arc::new(pgcast_events::decode_payload(&text).expect("test payload decodes"))
    }

    fn positions(events: Option<Vec<Arc<AssignmentEvent>>>) -> Option<Vec<Position>> {
        events.map(|e| e.iter().map(|e| e.position).collect())
    }

    #[test]
    fn covers_exactly_what_was_pushed_after_the_start() {
        let w = ReplayWindow::new(3);
        assert_eq!(positions(w.range(0, 0, |_| true)), None, "not started");
        w.start_after(10);
        assert_eq!(positions(w.range(10, 10, |_| true)), Some(vec![]));
        assert_eq!(positions(w.range(9, 10, |_| true)), None, "below the start");
        for p in [11, 13, 14] {
            w.push(&event(p));
        }
        assert_eq!(positions(w.range(10, 14, |_| true)), Some(vec![11, 13, 14]));
        assert_eq!(positions(w.range(11, 13, |_| true)), Some(vec![13]));
        assert_eq!(positions(w.range(12, 14, |_| true)), Some(vec![13, 14]));
        assert_eq!(
            positions(w.range(10, 15, |_| true)),
            None,
            "beyond the head"
        );
        assert_eq!(
            positions(w.range(14, 13, |_| true)),
            None,
            "since after through"
        );
        assert_eq!(
            positions(w.range(10, 14, |e| e.position != 13)),
            Some(vec![11, 14])
        );
    }

    #[test]
    fn evicting_the_oldest_raises_the_floor_to_it() {
        let w = ReplayWindow::new(2);
        w.start_after(0);
        for p in 1..=4 {
            w.push(&event(p));
        }
        // Holds 3 and 4: a resume after 2 is served, one after 1 would miss 2.
        assert_eq!(positions(w.range(2, 4, |_| true)), Some(vec![3, 4]));
        assert_eq!(positions(w.range(1, 4, |_| true)), None);
    }

    #[test]
    fn an_empty_window_serves_only_resumes_at_its_head() {
        let w = ReplayWindow::new(0);
        w.start_after(5);
        w.push(&event(6));
        assert_eq!(positions(w.range(6, 6, |_| true)), Some(vec![]));
        assert_eq!(positions(w.range(5, 6, |_| true)), None);
    }
}

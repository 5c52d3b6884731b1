//! The replay window: the newest events the listener delivered, kept in memory so that a client
//! resuming with `since` (after a restart, a deploy or a network blip: thousands at once) is
//! served without a database query. The listener read each of these events from the log once;
//! every resume inside the window shares that read.
//!
//! The window holds exactly the listener's stream, which is the log in position order, so the
//! events it returns for a range are the log's events for that range.
//!
//! It also remembers, per route key, the newest event it has let go of. A subscriber of a
//! quiet topic resumes from the last event it received, which may be far older than the
//! window; if no event of its route keys left the window since then, the window still holds
//! everything it may see, and the resume needs no database read either.
//!
//! Each event keeps the frames replays asked of it, one per topic: thousands of clients
//! resuming `queue` over the same events after a restart share one encoding of each.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::ws::Utf8Bytes;
use pgcast_events::{AssignmentEvent, EventFrame, Position, RouteKey, Topic};

/// One event of the window and the frames replays have encoded of it so far.
pub(crate) struct Entry {
    pub(crate) event: Arc<AssignmentEvent>,
    /// At most one per topic that replayed this event (few: `queue`, `assignments`, a session
    /// or customer topic); freed with the entry.
    frames: Mutex<Vec<(Topic, Utf8Bytes)>>,
}

impl Entry {
    /// The event's frame for `topic`, encoded by the first replay that asks for it.
    pub(crate) fn frame(&self, topic: &Topic) -> Utf8Bytes {
        let mut frames = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, frame)) = frames.iter().find(|(t, _)| t == topic) {
            return frame.clone();
        }
        let frame = Utf8Bytes::from(EventFrame::encode(topic, &self.event));
        frames.push((*topic, frame.clone()));
        frame
    }
}

/// The newest events, at most `capacity` of them.
pub(crate) struct ReplayWindow {
    capacity: usize,
    /// Most route keys whose last evicted position is remembered (then the older half is
    /// forgotten, raising `forgotten_through`).
    max_keys: usize,
    inner: RwLock<Events>,
}

struct Events {
    /// Position of the last event pushed (or where the stream started).
    head: Position,
    /// In position order.
    events: VecDeque<Arc<Entry>>,
    /// Per route key, the position of the newest event with that key that left the window.
    evicted: HashMap<RouteKey, Position>,
    /// For a key not in `evicted`, the newest event with it that left the window (or came
    /// before the stream started) is at most this.
    forgotten_through: Position,
}

impl ReplayWindow {
    pub(crate) fn new(capacity: usize) -> Self {
        ReplayWindow {
            capacity,
            max_keys: capacity.saturating_mul(4).max(1024),
            inner: RwLock::new(Events {
                head: Position::MIN,
                events: VecDeque::new(),
                evicted: HashMap::new(),
                forgotten_through: Position::MAX,
            }),
        }
    }

    /// The stream starts after `position`: the window knows nothing at or below it.
    pub(crate) fn start_after(&self, position: Position) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.head = position;
        inner.events.clear();
        inner.evicted.clear();
        inner.forgotten_through = position;
    }

    /// Appends the stream's next event, letting the oldest go when full. Called before the
    /// event is dispatched, so the window always reaches the hub's head.
    pub(crate) fn push(&self, event: &Arc<AssignmentEvent>) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.head = event.position;
        inner.events.push_back(Arc::new(Entry {
            event: event.clone(),
            frames: Mutex::default(),
        }));
        while inner.events.len() > self.capacity {
            let Some(oldest) = inner.events.pop_front() else {
                break;
            };
            for key in oldest.event.route_keys() {
                inner.evicted.insert(key, oldest.event.position);
            }
        }
        if inner.evicted.len() > self.max_keys {
            inner.forget_older_half();
        }
    }

    /// The events with `since < position <= through` that `keep` accepts, in order, for a
    /// subscriber whose topic routes by `keys`; `None` when an event of those keys in the range
    /// may have left the window (or `through` is beyond it), so the range must be read from
    /// the log.
    pub(crate) fn range(
        &self,
        since: Position,
        through: Position,
        keys: &[RouteKey],
        mut keep: impl FnMut(&AssignmentEvent) -> bool,
    ) -> Option<Vec<Arc<Entry>>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        if through > inner.head || since > through {
            return None;
        }
        let evicted_after_since = keys
            .iter()
            .any(|k| inner.evicted.get(k).map_or(inner.forgotten_through, |p| *p) > since);
        if evicted_after_since || keys.is_empty() && since < inner.forgotten_through {
            return None;
        }
        let start = inner.events.partition_point(|e| e.event.position <= since);
        Some(
            inner
                .events
                .range(start..)
                .take_while(|e| e.event.position <= through)
                .filter(|e| keep(&e.event))
                .cloned()
                .collect(),
        )
    }
}

impl Events {
    /// Bounds the per-key memory: the older half of the remembered keys is folded into
    /// `forgotten_through` (keys of quiet topics then fall back to the log a little sooner).
    fn forget_older_half(&mut self) {
        let mut positions: Vec<Position> = self.evicted.values().copied().collect();
        let middle = positions.len() / 2;
        let (_, threshold, _) = positions.select_nth_unstable(middle);
        let threshold = *threshold;
        self.evicted.retain(|_, p| *p > threshold);
        self.forgotten_through = self.forgotten_through.max(threshold);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_events::Change;

    fn event(position: Position) -> Arc<AssignmentEvent> {
        event_in(position, None)
    }

    /// A queued insert for `workshop` (None: the general queue).
    fn event_in(position: Position, workshop: Option<&str>) -> Arc<AssignmentEvent> {
        Change {
            workshop,
            ..Change::queued(position)
        }
        .event()
    }

    /// A `queue` subscriber's keys (general queue only: the test events are general).
    fn range(
        w: &ReplayWindow,
        since: Position,
        through: Position,
        keep: impl FnMut(&AssignmentEvent) -> bool,
    ) -> Option<Vec<Arc<Entry>>> {
        w.range(since, through, &[RouteKey::QueueGeneral], keep)
    }

    fn positions(events: Option<Vec<Arc<Entry>>>) -> Option<Vec<Position>> {
        events.map(|e| e.iter().map(|e| e.event.position).collect())
    }

    #[test]
    fn covers_exactly_what_was_pushed_after_the_start() {
        let w = ReplayWindow::new(3);
        assert_eq!(positions(range(&w, 0, 0, |_| true)), None, "not started");
        w.start_after(10);
        assert_eq!(positions(range(&w, 10, 10, |_| true)), Some(vec![]));
        assert_eq!(
            positions(range(&w, 9, 10, |_| true)),
            None,
            "below the start"
        );
        for p in [11, 13, 14] {
            w.push(&event(p));
        }
        assert_eq!(
            positions(range(&w, 10, 14, |_| true)),
            Some(vec![11, 13, 14])
        );
        assert_eq!(positions(range(&w, 11, 13, |_| true)), Some(vec![13]));
        assert_eq!(positions(range(&w, 12, 14, |_| true)), Some(vec![13, 14]));
        assert_eq!(
            positions(range(&w, 10, 15, |_| true)),
            None,
            "beyond the head"
        );
        assert_eq!(
            positions(range(&w, 14, 13, |_| true)),
            None,
            "since after through"
        );
        assert_eq!(
            positions(range(&w, 10, 14, |e| e.position != 13)),
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
        assert_eq!(positions(range(&w, 2, 4, |_| true)), Some(vec![3, 4]));
        assert_eq!(positions(range(&w, 1, 4, |_| true)), None);
    }

    #[test]
    fn an_empty_window_serves_only_resumes_at_its_head() {
        let w = ReplayWindow::new(0);
        w.start_after(5);
        w.push(&event(6));
        assert_eq!(positions(range(&w, 6, 6, |_| true)), Some(vec![]));
        assert_eq!(positions(range(&w, 5, 6, |_| true)), None);
    }

    #[test]
    fn a_quiet_topic_resumes_from_far_back_while_none_of_its_events_left() {
        const W: &str = "8d1e2a3b-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
        let workshop_keys = [RouteKey::QueueWorkshop(W.parse().expect("uuid"))];
        let w = ReplayWindow::new(2);
        w.start_after(0);
        w.push(&event_in(1, Some(W)));
        for p in 2..=10 {
            w.push(&event(p));
        }
        // Only general events left the window after 1: the workshop's resume after 1 is
        // served (nothing of it in 2..=10), a general queue's is not.
        assert_eq!(
            positions(w.range(1, 10, &workshop_keys, |_| true)),
            Some(vec![9, 10])
        );
        assert_eq!(positions(range(&w, 1, 10, |_| true)), None);
        // Before the stream started nothing is known, for any key.
        assert_eq!(positions(w.range(0, 10, &workshop_keys, |_| true)), None);
    }

    #[test]
    fn forgetting_keys_only_ever_sends_resumes_to_the_log() {
        let w = ReplayWindow::new(0);
        w.start_after(0);
        // Every event of its own mechanic's queue: more keys than remembered.
        let mechanics: Vec<uuid::Uuid> = (0..3000).map(|_| uuid::Uuid::new_v4()).collect();
        for (i, m) in mechanics.iter().enumerate() {
            let m = m.to_string();
            w.push(
                &Change {
                    status: "offered",
                    mechanic: Some(&m),
                    ..Change::queued(i as Position + 1)
                }
                .event(),
            );
        }
        let head = 3000;
        let inner = w.inner.read().expect("lock");
        assert!(inner.evicted.len() <= w.max_keys);
        let forgotten = inner.forgotten_through;
        drop(inner);
        assert!(forgotten > 0);
        // A mechanic whose offer left the window: never served from it after that offer...
        for (i, m) in mechanics.iter().enumerate() {
            let keys = [RouteKey::QueueMechanic(*m)];
            let at = i as Position + 1;
            assert_eq!(positions(w.range(at - 1, head, &keys, |_| true)), None);
            // ...and served (empty) from it after the offer only when the window still
            // remembers that it was the last, or everything up to it was forgotten.
            let served = w.range(at, head, &keys, |_| true).is_some();
            assert_eq!(served, at >= forgotten, "mechanic {i}");
        }
    }

    #[test]
    fn replays_of_the_same_topic_share_one_encoding_of_each_event() {
        let w = ReplayWindow::new(10);
        w.start_after(0);
        for p in 1..=3 {
            w.push(&event(p));
        }
        let first = range(&w, 0, 3, |_| true).expect("in the window");
        let again = range(&w, 1, 3, |_| true).expect("in the window");
        let a = first[2].frame(&Topic::Queue);
        let b = again[1].frame(&Topic::Queue);
        assert_eq!(a.as_str().as_ptr(), b.as_str().as_ptr(), "encoded once");
        assert_eq!(
            a.as_str(),
            EventFrame::encode(&Topic::Queue, &first[2].event),
            "the frame a live subscriber would get"
        );
        let other = first[2].frame(&Topic::Assignments);
        assert_ne!(other.as_str(), a.as_str(), "another topic, another frame");
    }
}

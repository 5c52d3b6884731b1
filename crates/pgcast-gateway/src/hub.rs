//! Fan-out: the index from route key to subscriptions, and the dispatch of one event to every
//! subscription that may see it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::outbox::{Eviction, Outbox, Pushed, Total, ENTRY_BYTES};
use crate::GatewayMetrics;
use axum::extract::ws::Utf8Bytes;
use pgcast_events::{AssignmentEvent, EventFrame, Position, Principal, Role, RouteKey, Topic};

/// Identifies one subscription for the lifetime of the process.
pub(crate) type SubId = u64;

/// One event frame queued for one connection.
#[derive(Debug)]
pub(crate) struct Outbound {
    pub(crate) sub: SubId,
    pub(crate) position: Position,
    pub(crate) committed_micros: i64,
    /// Shared by every recipient of the same (event, topic).
    pub(crate) frame: Utf8Bytes,
    /// Only for subscriptions whose right depends on the rows (a mechanic on `session:<id>`):
    /// what moves the membership, which the connection holds and judges by.
    pub(crate) membership: Option<MembershipChange>,
}

/// What moves a mechanic's membership of a session at an entry's position.
#[derive(Debug)]
pub(crate) enum MembershipChange {
    /// The event (the entry's frame): the connection applies it and decides.
    Event(Arc<AssignmentEvent>),
    /// A log row of the session that could not be decoded (the entry has no frame): the
    /// membership can no longer be judged, so the subscription is revoked.
    Unknown,
}

impl Outbound {
    /// What this entry counts against its connection's byte budget: the frame (shared, but
    /// held for as long as this entry waits) and the entry itself.
    pub(crate) fn cost(&self) -> usize {
        self.frame.len() + std::mem::size_of::<Outbound>()
    }
}

#[derive(Debug)]
pub(crate) struct Subscription {
    pub(crate) id: SubId,
    pub(crate) topic: Topic,
    pub(crate) principal: Principal,
    /// The queue of the connection that holds this subscription.
    pub(crate) conn: Arc<Outbox>,
}

impl Subscription {
    /// A mechanic on `session:<id>`: whether an event reaches them depends on the session's
    /// other rows at that position, which only the connection's membership state knows.
    pub(crate) fn follows_membership(&self) -> bool {
        matches!(self.topic, Topic::Session(_)) && self.principal.role == Role::Mechanic
    }
}

#[derive(Default)]
struct Index {
    by_key: HashMap<RouteKey, HashMap<SubId, Arc<Subscription>>>,
}

/// Subscriptions indexed by route key.
pub(crate) struct Hub {
    index: RwLock<Index>,
    /// Position of the last dispatched event. Read under the write lock when subscribing, so
    /// a new subscription knows exactly which events it will and will not receive.
    head: AtomicI64,
    /// `(from, through]`: positions a log that went back (a restore, a failover that lost
    /// commits) drew again, so a client's `since` in it refers to events that are gone.
    redrawn: Mutex<Option<(Position, Position)>>,
    next_id: AtomicU64,
    /// What every connection's queue holds together, against its limit.
    total: Arc<Total>,
    metrics: GatewayMetrics,
}

impl Hub {
    /// A hub whose connections' queues together may hold `total_bytes` before those holding
    /// more than their share are evicted.
    pub(crate) fn new(metrics: GatewayMetrics, total_bytes: usize) -> Self {
        Hub {
            index: RwLock::default(),
            head: AtomicI64::new(0),
            redrawn: Mutex::new(None),
            next_id: AtomicU64::new(1),
            total: Arc::new(Total::new(total_bytes, metrics.queued_bytes.clone())),
            metrics,
        }
    }

    /// A new connection's queue, with `budget_bytes` of its own, counted in the hub's total.
    pub(crate) fn outbox(&self, budget_bytes: usize) -> Outbox {
        Outbox::new(budget_bytes, self.total.clone())
    }

    /// Sets the position the dispatched stream starts after.
    pub(crate) fn start_after(&self, position: Position) {
        let _index = self.index.write().unwrap_or_else(|e| e.into_inner());
        self.head.store(position, Ordering::Release);
    }

    /// The log went back from `through` to `from`: the positions in between are drawn again
    /// (for the life of the process, together with any earlier such range).
    pub(crate) fn redrawn_after(&self, from: Position, through: Position) {
        let mut redrawn = self.redrawn.lock().unwrap_or_else(|e| e.into_inner());
        *redrawn = Some(match *redrawn {
            Some((f, t)) => (f.min(from), t.max(through)),
            None => (from, through),
        });
    }

    /// Does a client's `since` fall among positions drawn again after the log went back?
    pub(crate) fn redrawn(&self, since: Position) -> bool {
        let redrawn = self.redrawn.lock().unwrap_or_else(|e| e.into_inner());
        matches!(*redrawn, Some((from, through)) if since > from && since <= through)
    }

    pub(crate) fn next_id(&self) -> SubId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Files `sub` under its route keys. Returns the position of the last event dispatched
    /// before it: every later event that matches reaches it.
    pub(crate) fn subscribe(&self, sub: Arc<Subscription>) -> Position {
        let keys = sub.topic.route_keys(&sub.principal);
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        for key in keys {
            index
                .by_key
                .entry(key)
                .or_default()
                .insert(sub.id, sub.clone());
        }
        self.metrics.subscriptions.inc();
        self.head.load(Ordering::Acquire)
    }

    pub(crate) fn unsubscribe(&self, sub: &Subscription) {
        let keys = sub.topic.route_keys(&sub.principal);
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        let mut removed = false;
        for key in keys {
            if let Some(subs) = index.by_key.get_mut(&key) {
                removed |= subs.remove(&sub.id).is_some();
                if subs.is_empty() {
                    index.by_key.remove(&key);
                }
            }
        }
        if removed {
            self.metrics.subscriptions.dec();
        }
    }

    /// Evicts every connection with a subscription (each closes, and its client resumes with
    /// `since`). Returns how many connections this evicted.
    pub(crate) fn evict_all(&self, why: Eviction) -> usize {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        let mut evicted = 0;
        for subs in index.by_key.values() {
            for sub in subs.values() {
                if sub.conn.evict(why) {
                    evicted += 1;
                }
            }
        }
        evicted
    }

    /// The log row at `position`, committed at `committed_micros` (unknown: now), could not be
    /// decoded; it named `session` (any session when `None`). It may have ended a mechanic's
    /// membership, so every subscription that follows one of those sessions by membership is
    /// told so in its place in the stream (its connection revokes it; a new subscription is
    /// judged by the rows as they stand). Rare: without a session, the whole index is walked.
    pub(crate) fn undecodable(
        &self,
        position: Position,
        committed_micros: Option<i64>,
        session: Option<uuid::Uuid>,
    ) {
        let targets: Vec<Arc<Subscription>> = {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            let follows = |sub: &&Arc<Subscription>| sub.follows_membership();
            match session {
                Some(id) => index
                    .by_key
                    .get(&RouteKey::Session(id))
                    .map(|subs| subs.values().filter(follows).cloned().collect())
                    .unwrap_or_default(),
                None => index
                    .by_key
                    .iter()
                    .filter(|(key, _)| matches!(key, RouteKey::Session(_)))
                    .flat_map(|(_, subs)| subs.values().filter(follows).cloned())
                    .collect(),
            }
        };
        // Judged as of its commit, like an event: a token that expired after it still gets the
        // `revoked` (and whatever came before it).
        let committed_micros =
            committed_micros.unwrap_or_else(|| chrono::Utc::now().timestamp_micros());
        let mut queued = 0;
        for sub in targets {
            let out = Outbound {
                sub: sub.id,
                position,
                committed_micros,
                frame: Utf8Bytes::default(),
                membership: Some(MembershipChange::Unknown),
            };
            // Never refused for the total: the entry is what revokes.
            if sub.conn.push(out, None) == Pushed::Queued {
                queued += ENTRY_BYTES;
            }
        }
        self.total.add(queued);
    }

    /// Queues `event` for every subscription that may see it. Never waits: a full connection
    /// queue marks that connection slow. The index lock is held only to collect the targets,
    /// so subscribing and unsubscribing never wait behind a large fan-out.
    pub(crate) fn dispatch(&self, event: &Arc<AssignmentEvent>) {
        self.metrics.events.inc();
        let keys = event.route_keys();
        let (mut targets, several_keys) = {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            let found: Vec<_> = keys.iter().filter_map(|k| index.by_key.get(k)).collect();
            let mut targets: Vec<Arc<Subscription>> =
                Vec::with_capacity(found.iter().map(|subs| subs.len()).sum());
            for subs in &found {
                targets.extend(subs.values().cloned());
            }
            // Under the lock: a subscription made after this point is told this position and
            // does not expect the event; one made before it is in `targets`.
            self.head.store(event.position, Ordering::Release);
            (targets, found.len() > 1)
        };
        // A queue subscription is filed under several keys; deliver once. Within one key each
        // subscription is there once, so only targets gathered from several keys are sorted.
        if several_keys {
            targets.sort_unstable_by_key(|s| s.id);
            targets.dedup_by_key(|s| s.id);
        }
        // Each distinct frame is serialized once; most events have one or two topics.
        let mut frames: Vec<(Topic, Utf8Bytes)> = Vec::new();
        let committed_micros = event.committed_at.timestamp_micros();
        // Read once per event: while every queue together is over its limit, a connection
        // holding more than its share of it is evicted as slow instead of queueing more.
        let share = self.total.share(targets.len());
        let mut queued = 0;
        for sub in targets {
            // The index narrows; the rule decides (authorization enforced on every event).
            if !sub.topic.matches(&sub.principal, event) {
                continue;
            }
            let frame = match frames.iter().find(|(t, _)| *t == sub.topic) {
                Some((_, f)) => f.clone(),
                None => {
                    let f = Utf8Bytes::from(EventFrame::encode(&sub.topic, event));
                    frames.push((sub.topic, f.clone()));
                    f
                }
            };
            let out = Outbound {
                sub: sub.id,
                position: event.position,
                committed_micros,
                frame,
                membership: sub
                    .follows_membership()
                    .then(|| MembershipChange::Event(event.clone())),
            };
            // Over budget, the connection is declared slow and closes itself (4008); a
            // closed one unsubscribes itself. Either way the hub goes on.
            if sub.conn.push(out, share) == Pushed::Queued {
                queued += ENTRY_BYTES;
            }
        }
        self.total.add(queued);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_events::Change;
    use std::task::{Context, Poll};

    const WORKSHOP: &str = "8d0c6c1e-6f0e-4bb5-9a51-2a0b3d1c9e77";
    const MECHANIC: &str = "3f2a1d7c-0b9e-4e0f-8a3c-5d6e7f809a1b";

    /// An assignment change at `position`: `old` is the routing state before (JSON or null),
    /// `mechanic`/`workshop`/`status` the row after.
    fn event(
        position: Position,
        old: &str,
        status: &str,
        mechanic: Option<&str>,
        workshop: Option<&str>,
    ) -> Arc<AssignmentEvent> {
        Change {
            position,
            old: (old != "null").then_some(old),
            status,
            mechanic,
            workshop,
            committed_at: None,
        }
        .event()
    }

    fn principal(user: &str, workshop: Option<&str>) -> Principal {
        Principal {
            user_id: user.parse().expect("uuid"),
            role: Role::Mechanic,
            workshop_id: workshop.map(|w| w.parse().expect("uuid")),
        }
    }

    /// Files a subscription of `who` to `topic` with its own outbox.
    fn file(hub: &Hub, topic: Topic, who: Principal) -> (Arc<Subscription>, Arc<Outbox>) {
        let outbox = Arc::new(hub.outbox(1 << 20));
        let sub = Arc::new(Subscription {
            id: hub.next_id(),
            topic,
            principal: who,
            conn: outbox.clone(),
        });
        hub.subscribe(sub.clone());
        (sub, outbox)
    }

    /// Everything queued in `outbox`, without waiting.
    fn queued(outbox: &Outbox) -> Vec<Outbound> {
        let mut into = Vec::new();
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        while let Poll::Ready(()) = outbox.poll_take(&mut cx, &mut into, 1024) {}
        into
    }

    #[test]
    fn a_subscription_filed_under_several_matching_keys_gets_the_event_once() {
        let hub = Hub::new(GatewayMetrics::default(), usize::MAX);
        let (_, outbox) = file(&hub, Topic::Queue, principal(MECHANIC, Some(WORKSHOP)));
        // Queued for the workshop before, offered to the mechanic after: both keys route it.
        let old = format!(r#"{{"status":"queued","mechanic_id":null,"workshop_id":"{WORKSHOP}"}}"#);
        let offer = event(1, &old, "offered", Some(MECHANIC), Some(WORKSHOP));
        assert!(offer.route_keys().len() > 2, "the event has several keys");
        hub.dispatch(&offer);
        let got: Vec<_> = queued(&outbox).iter().map(|o| o.position).collect();
        assert_eq!(got, vec![1]);
    }

    #[test]
    fn the_rule_decides_on_every_event_not_the_index() {
        let hub = Hub::new(GatewayMetrics::default(), usize::MAX);
        let other = "11111111-2222-4333-8444-555555555555";
        let (_, mine) = file(&hub, Topic::Queue, principal(MECHANIC, None));
        let (_, theirs) = file(&hub, Topic::Queue, principal(other, None));
        hub.dispatch(&event(1, "null", "queued", None, None));
        hub.dispatch(&event(2, "null", "offered", Some(MECHANIC), None));
        let positions = |o: &Outbox| queued(o).iter().map(|o| o.position).collect::<Vec<_>>();
        assert_eq!(positions(&mine), vec![1, 2]);
        assert_eq!(positions(&theirs), vec![1], "an offer to another mechanic");
    }

    #[test]
    fn one_frame_is_shared_by_every_recipient_of_a_topic() {
        let hub = Hub::new(GatewayMetrics::default(), usize::MAX);
        let a = file(&hub, Topic::Queue, principal(MECHANIC, None)).1;
        let b = file(&hub, Topic::Queue, principal(WORKSHOP, None)).1;
        hub.dispatch(&event(1, "null", "queued", None, None));
        let (fa, fb) = (queued(&a).remove(0).frame, queued(&b).remove(0).frame);
        assert_eq!(fa, fb);
        assert_eq!(
            fa.as_str().as_ptr(),
            fb.as_str().as_ptr(),
            "serialized once"
        );
    }

    #[test]
    fn subscribe_reports_the_head_and_unsubscribe_stops_delivery() {
        let hub = Hub::new(GatewayMetrics::default(), usize::MAX);
        hub.start_after(41);
        let (sub, outbox) = file(&hub, Topic::Queue, principal(MECHANIC, None));
        hub.dispatch(&event(42, "null", "queued", None, None));
        let late = Arc::new(Subscription {
            id: hub.next_id(),
            topic: Topic::Queue,
            principal: principal(WORKSHOP, None),
            conn: Arc::new(hub.outbox(1 << 20)),
        });
        assert_eq!(
            hub.subscribe(late),
            42,
            "a later subscriber starts after 42"
        );
        hub.unsubscribe(&sub);
        hub.dispatch(&event(43, "null", "queued", None, None));
        let got: Vec<_> = queued(&outbox).iter().map(|o| o.position).collect();
        assert_eq!(got, vec![42]);
    }

    #[test]
    fn an_undecodable_row_reaches_only_the_membership_followers_of_its_session() {
        let hub = Hub::new(GatewayMetrics::default(), usize::MAX);
        let (s1, s2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let follower = file(&hub, Topic::Session(s1), principal(MECHANIC, None)).1;
        let elsewhere = file(&hub, Topic::Session(s2), principal(WORKSHOP, None)).1;
        let customer = Principal {
            role: Role::Customer,
            ..principal(MECHANIC, None)
        };
        let owner = file(&hub, Topic::Session(s1), customer).1;
        let queue = file(&hub, Topic::Queue, principal(MECHANIC, None)).1;
        let unknown = |o: &Outbox| {
            queued(o)
                .iter()
                .map(|o| {
                    assert!(o.frame.is_empty(), "nothing of the row is sent");
                    assert!(matches!(o.membership, Some(MembershipChange::Unknown)));
                    o.position
                })
                .collect::<Vec<_>>()
        };

        hub.undecodable(5, None, Some(s1));
        assert_eq!(unknown(&follower), vec![5]);
        assert_eq!(unknown(&elsewhere), Vec::<Position>::new());
        // Without a session, every session's mechanics; never a customer or another topic.
        hub.undecodable(6, Some(0), None);
        assert_eq!(unknown(&follower), vec![6]);
        assert_eq!(unknown(&elsewhere), vec![6]);
        assert_eq!(unknown(&owner), Vec::<Position>::new());
        assert_eq!(unknown(&queue), Vec::<Position>::new());
    }

    #[test]
    fn over_the_total_a_reader_holding_more_than_its_share_is_evicted_and_one_that_keeps_up_is_not()
    {
        // Room for 20 entries in all: a share is 10 each.
        let hub = Hub::new(GatewayMetrics::default(), ENTRY_BYTES * 20);
        let (_, slow) = file(&hub, Topic::Queue, principal(MECHANIC, None));
        let (_, fast) = file(&hub, Topic::Queue, principal(WORKSHOP, None));
        let mut fast_got = 0;
        for p in 1..=40 {
            hub.dispatch(&event(p, "null", "queued", None, None));
            fast_got += queued(&fast).len();
        }
        assert_eq!(
            slow.eviction(),
            Some(Eviction::Slow),
            "held 21 entries of 20"
        );
        assert_eq!(fast.eviction(), None);
        assert_eq!(fast_got, 40, "the reader that keeps up got every event");
        // The total is what operators see: the slow queue's 21 entries, until it closes.
        assert_eq!(hub.metrics.queued_bytes.get(), 21 * ENTRY_BYTES as i64);
        slow.close();
        assert_eq!(hub.metrics.queued_bytes.get(), 0);
    }

    #[test]
    fn a_gap_evicts_every_subscribed_connection_once_and_no_other() {
        let hub = Hub::new(GatewayMetrics::default(), usize::MAX);
        let (first, a) = file(&hub, Topic::Queue, principal(MECHANIC, Some(WORKSHOP)));
        // A second subscription of the same connection: evicted once, counted once.
        hub.subscribe(Arc::new(Subscription {
            id: hub.next_id(),
            topic: Topic::Assignments,
            principal: first.principal,
            conn: a.clone(),
        }));
        let b = file(&hub, Topic::Queue, principal(WORKSHOP, None)).1;
        // Already closing as slow: keeps its reason.
        let slow = file(&hub, Topic::Queue, principal(MECHANIC, None)).1;
        assert!(slow.evict(Eviction::Slow));
        let unsubscribed = hub.outbox(1 << 20);

        assert_eq!(hub.evict_all(Eviction::Gap), 2);
        assert_eq!(a.eviction(), Some(Eviction::Gap));
        assert_eq!(b.eviction(), Some(Eviction::Gap));
        assert!(a.evicted.is_cancelled() && b.evicted.is_cancelled());
        assert_eq!(slow.eviction(), Some(Eviction::Slow));
        assert_eq!(unsubscribed.eviction(), None);
        assert!(!unsubscribed.evicted.is_cancelled());
    }
}

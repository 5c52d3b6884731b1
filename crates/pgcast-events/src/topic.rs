//! Topics and the who-sees-what rules
//! (`docs/architecture.md#5-visibility-is-decided-per-event-at-its-position`).
//!
//! A rule has two faces that must agree: [`Topic::sees`] answers "may this subscriber see this
//! row state" (used for snapshots, replay and tests), and [`Topic::route_keys`] with
//! [`AssignmentEvent::route_keys`] let the gateway find the subscribers of an event through an
//! index instead of asking every connection. The unit tests check that both faces agree on
//! every combination of row state and subscriber.
//!
//! Half of this file is the exhaustive agreement tests of the two faces.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{AssignmentEvent, RowState, Status};

/// Longest topic string accepted (`workshop:` + a hyphenated UUID is 45).
pub const MAX_TOPIC_LEN: usize = 64;

/// Role claim of an authenticated user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Works assignments; may belong to a workshop.
    Mechanic,
    /// Opened help sessions.
    Customer,
    /// Another backend service or tool; sees every event.
    Service,
}

impl Role {
    /// Wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Mechanic => "mechanic",
            Role::Customer => "customer",
            Role::Service => "service",
        }
    }
}

/// Who is asking, as established by the JWT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    /// `sub` claim.
    pub user_id: Uuid,
    /// `role` claim.
    pub role: Role,
    /// `workshop_id` claim (mechanics of a workshop).
    pub workshop_id: Option<Uuid>,
}

/// What a client can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// The open queue of the subscribing mechanic.
    Queue,
    /// Everything assigned to one mechanic.
    Mechanic(Uuid),
    /// One help session's assignments.
    Session(Uuid),
    /// One workshop's assignments, any status.
    Workshop(Uuid),
    /// Every assignment of every session of one customer (an "active session" banner).
    Customer(Uuid),
    /// Every event (services).
    Assignments,
}

/// A topic string that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// Longer than [`MAX_TOPIC_LEN`].
    #[error("topic is longer than {MAX_TOPIC_LEN} bytes")]
    TooLong,
    /// Not one of the known topic kinds.
    #[error("unknown topic")]
    Unknown,
    /// A known kind whose id is not a UUID.
    #[error("topic id is not a UUID")]
    InvalidId,
}

impl std::str::FromStr for Topic {
    type Err = TopicError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_TOPIC_LEN {
            return Err(TopicError::TooLong);
        }
        match s {
            "queue" => return Ok(Topic::Queue),
            "assignments" => return Ok(Topic::Assignments),
            _ => {}
        }
        let (kind, id) = s.split_once(':').ok_or(TopicError::Unknown)?;
        let make: fn(Uuid) -> Topic = match kind {
            "mechanic" => Topic::Mechanic,
            "session" => Topic::Session,
            "workshop" => Topic::Workshop,
            "customer" => Topic::Customer,
            _ => return Err(TopicError::Unknown),
        };
        // Only the canonical lowercase hyphenated form, so one topic has exactly one spelling
        // (clients match replies and events by the topic string they sent).
        if id.len() != 36 || id.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(TopicError::InvalidId);
        }
        let id = Uuid::try_parse(id).map_err(|_| TopicError::InvalidId)?;
        Ok(make(id))
    }
}

impl std::fmt::Display for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Topic::Queue => f.write_str("queue"),
            Topic::Assignments => f.write_str("assignments"),
            Topic::Mechanic(id) => write!(f, "mechanic:{id}"),
            Topic::Session(id) => write!(f, "session:{id}"),
            Topic::Workshop(id) => write!(f, "workshop:{id}"),
            Topic::Customer(id) => write!(f, "customer:{id}"),
        }
    }
}

/// Result of checking a subscription request against the principal's claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The claims alone allow it.
    Allowed,
    /// Allowed only if the database says this user owns (or is assigned to) the session.
    NeedsSessionCheck,
    /// Never allowed for this principal.
    Forbidden,
}

/// Index key under which the gateway files subscriptions; an event is delivered to the
/// subscriptions filed under any of its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKey {
    /// Queued, not tied to a workshop or mechanic: every mechanic's queue.
    QueueGeneral,
    /// Queued for one workshop.
    QueueWorkshop(Uuid),
    /// Queued or offered directly to one mechanic.
    QueueMechanic(Uuid),
    /// `mechanic:<id>` topic.
    Mechanic(Uuid),
    /// `session:<id>` topic.
    Session(Uuid),
    /// `workshop:<id>` topic.
    Workshop(Uuid),
    /// `customer:<id>` topic.
    Customer(Uuid),
    /// `assignments` topic.
    All,
}

/// The queue a row state belongs to, if it is in one at all.
fn queue_key(state: &RowState) -> Option<RouteKey> {
    match (state.status, state.mechanic_id, state.workshop_id) {
        // Offered or queued to one mechanic directly: that mechanic only, whatever the workshop.
        (Status::Queued | Status::Offered, Some(m), _) => Some(RouteKey::QueueMechanic(m)),
        (Status::Queued, None, Some(w)) => Some(RouteKey::QueueWorkshop(w)),
        (Status::Queued, None, None) => Some(RouteKey::QueueGeneral),
        _ => None,
    }
}

fn state_keys(state: &RowState, keys: &mut Vec<RouteKey>) {
    keys.extend(queue_key(state));
    keys.extend(state.mechanic_id.map(RouteKey::Mechanic));
    keys.extend(state.workshop_id.map(RouteKey::Workshop));
    keys.push(RouteKey::Session(state.session_id));
    keys.extend(state.customer_id.map(RouteKey::Customer));
}

impl AssignmentEvent {
    /// Every index key under which a subscriber may see this event: the keys of the row
    /// before the change and after it, so a card leaves old queues and enters new ones.
    /// Sorted and without duplicates.
    pub fn route_keys(&self) -> Vec<RouteKey> {
        let mut keys = vec![RouteKey::All];
        for state in [self.before(), self.after()].into_iter().flatten() {
            state_keys(&state, &mut keys);
        }
        keys.sort_unstable();
        keys.dedup();
        keys
    }
}

impl Topic {
    /// Checks the claims for a subscription to this topic.
    pub fn authorize(&self, who: &Principal) -> Access {
        match (self, who.role) {
            (Topic::Assignments, Role::Service) => Access::Allowed,
            (Topic::Queue, Role::Mechanic) => Access::Allowed,
            (Topic::Mechanic(id), Role::Mechanic) if *id == who.user_id => Access::Allowed,
            (Topic::Workshop(id), Role::Mechanic) if who.workshop_id == Some(*id) => {
                Access::Allowed
            }
            (Topic::Customer(id), Role::Customer) if *id == who.user_id => Access::Allowed,
            // A service sees every event through `assignments`; the narrower topics show it
            // nothing more, so tools may use them too.
            (
                Topic::Mechanic(_) | Topic::Workshop(_) | Topic::Session(_) | Topic::Customer(_),
                Role::Service,
            ) => Access::Allowed,
            (Topic::Session(_), Role::Customer | Role::Mechanic) => Access::NeedsSessionCheck,
            _ => Access::Forbidden,
        }
    }

    /// The index keys a subscription of `who` to this topic is filed under.
    pub fn route_keys(&self, who: &Principal) -> Vec<RouteKey> {
        match self {
            Topic::Queue => {
                let mut keys = vec![RouteKey::QueueGeneral, RouteKey::QueueMechanic(who.user_id)];
                keys.extend(who.workshop_id.map(RouteKey::QueueWorkshop));
                keys
            }
            Topic::Mechanic(id) => vec![RouteKey::Mechanic(*id)],
            Topic::Session(id) => vec![RouteKey::Session(*id)],
            Topic::Workshop(id) => vec![RouteKey::Workshop(*id)],
            Topic::Customer(id) => vec![RouteKey::Customer(*id)],
            Topic::Assignments => vec![RouteKey::All],
        }
    }

    /// May a subscriber `who` of this topic see a row in `state`? (Authorization of the
    /// subscription itself is [`Topic::authorize`].)
    pub fn sees(&self, who: &Principal, state: &RowState) -> bool {
        match self {
            Topic::Queue => match (state.status, state.mechanic_id, state.workshop_id) {
                (Status::Queued | Status::Offered, Some(m), _) => m == who.user_id,
                (Status::Queued, None, Some(w)) => who.workshop_id == Some(w),
                (Status::Queued, None, None) => true,
                _ => false,
            },
            Topic::Mechanic(id) => state.mechanic_id == Some(*id),
            Topic::Session(id) => state.session_id == *id,
            Topic::Workshop(id) => state.workshop_id == Some(*id),
            Topic::Customer(id) => state.customer_id == Some(*id),
            Topic::Assignments => true,
        }
    }

    /// Is `event` delivered to a subscriber `who` of this topic: could they see the row
    /// before or after the change?
    pub fn matches(&self, who: &Principal, event: &AssignmentEvent) -> bool {
        [event.before(), event.after()]
            .into_iter()
            .flatten()
            .any(|state| self.sees(who, &state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Assignment, EventKind, PriorState};

    fn uuid(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    const W1: u128 = 0x100;
    const W2: u128 = 0x200;
    const M1: u128 = 0x1; // workshop W1
    const M2: u128 = 0x2; // workshop W2
    const M3: u128 = 0x3; // freelancer

    fn mechanic(m: u128, w: Option<u128>) -> Principal {
        Principal {
            user_id: uuid(m),
            role: Role::Mechanic,
            workshop_id: w.map(uuid),
        }
    }

    fn state(status: Status, m: Option<u128>, w: Option<u128>) -> RowState {
        RowState {
            session_id: uuid(0x5e55),
            customer_id: Some(uuid(0xc)),
            status,
            mechanic_id: m.map(uuid),
            workshop_id: w.map(uuid),
        }
    }

    fn event(before: Option<RowState>, after: RowState) -> AssignmentEvent {
        AssignmentEvent {
            position: 1,
            kind: if before.is_some() {
                EventKind::Updated
            } else {
                EventKind::Created
            },
            assignment: Assignment {
                id: uuid(0xa),
                session_id: after.session_id,
                mechanic_id: after.mechanic_id,
                workshop_id: after.workshop_id,
                status: after.status,
                urgent: false,
                customer_name: None,
                vehicle_summary: None,
                concern: None,
                created_at: None,
                updated_at: None,
            },
            prior: before.map(|b| PriorState {
                status: b.status,
                mechanic_id: b.mechanic_id,
                workshop_id: b.workshop_id,
            }),
            committed_at: chrono::DateTime::UNIX_EPOCH,
            customer_id: after.customer_id,
        }
    }

    #[test]
    fn topics_round_trip_and_reject_tricks() {
        for s in [
            "queue",
            "assignments",
            "mechanic:5b7f8a52-8f0e-4d51-9d7e-6a1f0f2f0c11",
            "session:5b7f8a52-8f0e-4d51-9d7e-6a1f0f2f0c11",
            "workshop:5b7f8a52-8f0e-4d51-9d7e-6a1f0f2f0c11",
            "customer:5b7f8a52-8f0e-4d51-9d7e-6a1f0f2f0c11",
        ] {
            assert_eq!(s.parse::<Topic>().unwrap().to_string(), s);
        }
        for bad in [
            "",
            "Queue",
            "queue ",
            "queue:1",
            "mechanic:",
            "mechanic:../../etc/passwd",
            "mechanic:5b7f8a528f0e4d519d7e6a1f0f2f0c11",
            "mechanic:{5b7f8a52-8f0e-4d51-9d7e-6a1f0f2f0c11}",
            "mechanic:5B7F8A52-8F0E-4D51-9D7E-6A1F0F2F0C11x",
            "mechanic:5B7F8A52-8F0E-4D51-9D7E-6A1F0F2F0C11",
            // Found by the client_frame fuzz target: one uppercase digit.
            "session:5bf87a52-8f0e-4D51-9d7e-6a1f0f2f0c11",
            "mechanic:5b7f8a52-8f0e-4d51-9d7e-6a1f0f2f0c11\n",
            "garage:5b7f8a52-8f0e-4d51-9d7e-6a1f0f2f0c11",
            "assignments\u{0}",
        ] {
            assert!(bad.parse::<Topic>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            "x".repeat(10_000).parse::<Topic>(),
            Err(TopicError::TooLong)
        );
    }

    #[test]
    fn queue_rules_of_design_section_5() {
        let m1 = mechanic(M1, Some(W1));
        let m2 = mechanic(M2, Some(W2));
        let m3 = mechanic(M3, None);
        let q = Topic::Queue;
        // General assignments: everybody, workshop mechanics included.
        let general = state(Status::Queued, None, None);
        assert!(q.sees(&m1, &general) && q.sees(&m2, &general) && q.sees(&m3, &general));
        // Workshop assignment: only that workshop.
        let w1 = state(Status::Queued, None, Some(W1));
        assert!(q.sees(&m1, &w1) && !q.sees(&m2, &w1) && !q.sees(&m3, &w1));
        // Offered directly: only that mechanic, even inside their workshop.
        let offered = state(Status::Offered, Some(M1), Some(W1));
        assert!(q.sees(&m1, &offered) && !q.sees(&m2, &offered) && !q.sees(&m3, &offered));
        let mut colleague = mechanic(0x9, Some(W1));
        assert!(!q.sees(&colleague, &offered));
        colleague.user_id = uuid(M1);
        assert!(q.sees(&colleague, &offered));
        // Not queued any more: out of every queue.
        for st in [
            Status::Accepted,
            Status::Cancelled,
            Status::Expired,
            Status::Completed,
        ] {
            assert!(!q.sees(&m3, &state(st, None, None)));
            assert!(!q.sees(&m1, &state(st, Some(M1), Some(W1))));
        }
    }

    #[test]
    fn leaving_the_queue_reaches_everybody_who_saw_it() {
        let accepted = event(
            Some(state(Status::Queued, None, None)),
            state(Status::Accepted, Some(M3), None),
        );
        for m in [
            mechanic(M1, Some(W1)),
            mechanic(M2, Some(W2)),
            mechanic(M3, None),
        ] {
            assert!(Topic::Queue.matches(&m, &accepted));
        }
        let moved = event(
            Some(state(Status::Queued, None, Some(W1))),
            state(Status::Queued, None, Some(W2)),
        );
        assert!(Topic::Queue.matches(&mechanic(M1, Some(W1)), &moved));
        assert!(Topic::Queue.matches(&mechanic(M2, Some(W2)), &moved));
        assert!(!Topic::Queue.matches(&mechanic(M3, None), &moved));
        assert!(Topic::Workshop(uuid(W1)).matches(&mechanic(M1, Some(W1)), &moved));
        assert!(Topic::Workshop(uuid(W2)).matches(&mechanic(M2, Some(W2)), &moved));
    }

    #[test]
    fn authorization_by_claims() {
        let m1 = mechanic(M1, Some(W1));
        let customer = Principal {
            user_id: uuid(0xc),
            role: Role::Customer,
            workshop_id: None,
        };
        let service = Principal {
            user_id: uuid(0xd),
            role: Role::Service,
            workshop_id: None,
        };
        assert_eq!(Topic::Queue.authorize(&m1), Access::Allowed);
        assert_eq!(Topic::Queue.authorize(&customer), Access::Forbidden);
        assert_eq!(Topic::Mechanic(uuid(M1)).authorize(&m1), Access::Allowed);
        assert_eq!(Topic::Mechanic(uuid(M2)).authorize(&m1), Access::Forbidden);
        assert_eq!(Topic::Workshop(uuid(W1)).authorize(&m1), Access::Allowed);
        assert_eq!(Topic::Workshop(uuid(W2)).authorize(&m1), Access::Forbidden);
        assert_eq!(Topic::Assignments.authorize(&m1), Access::Forbidden);
        assert_eq!(Topic::Assignments.authorize(&customer), Access::Forbidden);
        assert_eq!(Topic::Assignments.authorize(&service), Access::Allowed);
        assert_eq!(
            Topic::Session(uuid(1)).authorize(&customer),
            Access::NeedsSessionCheck
        );
        assert_eq!(
            Topic::Session(uuid(1)).authorize(&m1),
            Access::NeedsSessionCheck
        );
        assert_eq!(
            Topic::Mechanic(uuid(M1)).authorize(&customer),
            Access::Forbidden
        );
        assert_eq!(Topic::Queue.authorize(&service), Access::Forbidden);
        // customer:<id>: that customer only (and services).
        assert_eq!(
            Topic::Customer(uuid(0xc)).authorize(&customer),
            Access::Allowed
        );
        assert_eq!(
            Topic::Customer(uuid(0xd)).authorize(&customer),
            Access::Forbidden
        );
        assert_eq!(Topic::Customer(uuid(0xc)).authorize(&m1), Access::Forbidden);
        assert_eq!(
            Topic::Customer(uuid(0xc)).authorize(&service),
            Access::Allowed
        );
    }

    /// The index (route keys) and the rule (`matches`) must agree on every combination of
    /// before/after state, topic and subscriber, or live delivery would differ from replay.
    #[test]
    fn route_keys_agree_with_the_rules_exhaustively() {
        let workshops = [None, Some(W1), Some(W2)];
        let mechanics = [None, Some(M1), Some(M2), Some(M3)];
        let mut states = Vec::new();
        for st in Status::ALL {
            for m in mechanics {
                for w in workshops {
                    states.push(state(st, m, w));
                }
            }
        }
        // A session whose customer the log does not know reaches no customer topic.
        states.push(RowState {
            customer_id: None,
            ..state(Status::Queued, None, None)
        });
        let subscribers = [
            mechanic(M1, Some(W1)),
            mechanic(M2, Some(W2)),
            mechanic(M3, None),
            mechanic(0x4, Some(W1)),
        ];
        let mut checked = 0;
        for after in &states {
            for before in std::iter::once(None).chain(states.iter().copied().map(Some)) {
                let ev = event(before, *after);
                let keys = ev.route_keys();
                for who in &subscribers {
                    for topic in [
                        Topic::Queue,
                        Topic::Mechanic(who.user_id),
                        Topic::Workshop(uuid(W1)),
                        Topic::Session(uuid(0x5e55)),
                        Topic::Session(uuid(0x5e56)),
                        Topic::Customer(uuid(0xc)),
                        Topic::Customer(uuid(0xd)),
                        Topic::Assignments,
                    ] {
                        let routed = topic.route_keys(who).iter().any(|k| keys.contains(k));
                        assert_eq!(routed, topic.matches(who, &ev), "{topic} {who:?} {ev:?}");
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 100_000);
    }
}

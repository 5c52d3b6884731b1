//! The tests' one independent reading of "who sees what" (README, Protocol → Topics), written
//! from the README and not taken from `pgcast_events`, so that a wrong rule in the library
//! shows up as a difference between what a client received and what this oracle expects.
//! Used by the gateway tests, the process tests, and open to the bench.
//!
//! It judges one row state at a time. The one rule that depends on other rows — a mechanic
//! on `session:<id>` sees it while one of their assignments in it stands `accepted` or
//! `completed`, judged at each position — is [`is_member`], which the caller evaluates over the
//! session's rows as they stand at that position.

use pgcast_events::{Principal, Role};
use serde_json::Value;
use uuid::Uuid;

/// Every assignment status the schema allows.
pub const STATUSES: [&str; 7] = [
    "queued",
    "offered",
    "accepted",
    "declined",
    "cancelled",
    "expired",
    "completed",
];

/// The statuses a snapshot of `assignments`, `mechanic:`, `workshop:` and `customer:` holds:
/// the open ones (history comes from the log with `since`).
pub const OPEN: [&str; 3] = ["queued", "offered", "accepted"];

/// The fields of an assignment row that decide who may see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Row {
    /// `session_id`.
    pub session: Uuid,
    /// `status`, one of [`STATUSES`].
    pub status: &'static str,
    /// `mechanic_id`.
    pub mechanic: Option<Uuid>,
    /// `workshop_id`.
    pub workshop: Option<Uuid>,
}

/// `s` as the `&'static str` of [`STATUSES`]; fails the test on an unknown status.
pub fn status(s: &str) -> &'static str {
    STATUSES
        .iter()
        .find(|x| **x == s)
        .unwrap_or_else(|| panic!("unknown status {s:?}"))
}

fn uuid_field(v: &Value, name: &str) -> Option<Uuid> {
    v[name].as_str().map(|s| {
        s.parse()
            .unwrap_or_else(|e| panic!("{name} {s:?} is not a uuid: {e}"))
    })
}

impl Row {
    /// A row as JSON (an event frame's `assignment`, a snapshot entry, the log's `row`).
    pub fn from_json(a: &Value) -> Row {
        Row {
            session: uuid_field(a, "session_id").unwrap_or_else(|| panic!("no session_id: {a}")),
            status: status(
                a["status"]
                    .as_str()
                    .unwrap_or_else(|| panic!("no status: {a}")),
            ),
            mechanic: uuid_field(a, "mechanic_id"),
            workshop: uuid_field(a, "workshop_id"),
        }
    }

    /// Whether the status is one of [`OPEN`].
    pub fn is_open(&self) -> bool {
        OPEN.contains(&self.status)
    }
}

/// May `who`, subscribed to `topic`, see a row in state `row`? `customer_of` is the customer
/// owning the row's session (for `customer:<id>`), if it has one.
///
/// A mechanic on `session:<id>` is judged by [`is_member`] instead; here that case is just
/// "the row is in the session".
pub fn may_see(topic: &str, who: &Principal, row: &Row, customer_of: Option<Uuid>) -> bool {
    match topic {
        // The open queue: queued rows that are general or for the own workshop; a row tied to
        // one mechanic (offered or queued to them directly) is in that mechanic's queue only,
        // never in another workshop's or another mechanic's.
        "queue" => {
            who.role == Role::Mechanic
                && match row.mechanic {
                    Some(m) => {
                        m == who.user_id && (row.status == "queued" || row.status == "offered")
                    }
                    None => {
                        row.status == "queued"
                            && (row.workshop.is_none() || row.workshop == who.workshop_id)
                    }
                }
        }
        "assignments" => true,
        _ => {
            let (kind, id) = topic
                .split_once(':')
                .unwrap_or_else(|| panic!("unknown topic {topic:?}"));
            let id: Uuid = id
                .parse()
                .unwrap_or_else(|e| panic!("topic {topic:?}: {e}"));
            match kind {
                "mechanic" => row.mechanic == Some(id),
                "workshop" => row.workshop == Some(id),
                "session" => row.session == id,
                "customer" => customer_of == Some(id),
                _ => panic!("unknown topic {topic:?}"),
            }
        }
    }
}

/// An event reaches every subscriber who could see the row before **or** after the change
/// (`before` is `None` for an insert, `after` for a delete).
pub fn sees_change(
    topic: &str,
    who: &Principal,
    before: Option<&Row>,
    after: Option<&Row>,
    customer_of: Option<Uuid>,
) -> bool {
    before
        .into_iter()
        .chain(after)
        .any(|r| may_see(topic, who, r, customer_of))
}

/// Does a snapshot of `topic` for `who` hold a row in state `row`? The visible rows, open ones
/// only except for `queue` (already open by its rule) and `session:`.
pub fn in_snapshot(topic: &str, who: &Principal, row: &Row, customer_of: Option<Uuid>) -> bool {
    let all_statuses = topic == "queue" || topic.starts_with("session:");
    may_see(topic, who, row, customer_of) && (all_statuses || row.is_open())
}

/// Is `mechanic` a member of `session` with the rows as they stand in `rows`: does one of
/// their assignments in it stand `accepted` or `completed`?
pub fn is_member<'a>(
    rows: impl IntoIterator<Item = &'a Row>,
    session: Uuid,
    mechanic: Uuid,
) -> bool {
    rows.into_iter().any(|r| {
        r.session == session
            && r.mechanic == Some(mechanic)
            && (r.status == "accepted" || r.status == "completed")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(role: Role, workshop: Option<Uuid>) -> Principal {
        Principal {
            user_id: Uuid::new_v4(),
            role,
            workshop_id: workshop,
        }
    }

    #[test]
    fn the_queue_holds_general_own_workshop_and_own_offers_only() {
        let w = Uuid::new_v4();
        let me = who(Role::Mechanic, Some(w));
        let other = Uuid::new_v4();
        let row = |status, mechanic, workshop| Row {
            session: Uuid::new_v4(),
            status,
            mechanic,
            workshop,
        };
        assert!(may_see("queue", &me, &row("queued", None, None), None));
        assert!(may_see("queue", &me, &row("queued", None, Some(w)), None));
        assert!(!may_see(
            "queue",
            &me,
            &row("queued", None, Some(other)),
            None
        ));
        assert!(may_see(
            "queue",
            &me,
            &row("offered", Some(me.user_id), None),
            None
        ));
        assert!(!may_see(
            "queue",
            &me,
            &row("offered", Some(other), Some(w)),
            None
        ));
        assert!(!may_see(
            "queue",
            &me,
            &row("accepted", Some(me.user_id), None),
            None
        ));
        assert!(!may_see(
            "queue",
            &who(Role::Service, None),
            &row("queued", None, None),
            None
        ));
        let accepted = row("accepted", Some(me.user_id), None);
        assert!(sees_change(
            "queue",
            &me,
            Some(&row("queued", None, None)),
            Some(&accepted),
            None
        ));
        assert!(in_snapshot(
            &format!("mechanic:{}", me.user_id),
            &me,
            &accepted,
            None
        ));
        let done = Row {
            status: "completed",
            ..accepted
        };
        assert!(!in_snapshot("assignments", &me, &done, None));
        assert!(is_member([&done], done.session, me.user_id));
        assert!(!is_member(
            [&row("offered", Some(me.user_id), None)],
            done.session,
            me.user_id
        ));
    }
}

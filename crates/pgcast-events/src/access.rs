//! A mechanic's right to follow a session, evaluated at every event's position
//! (`docs/architecture.md#5-visibility-is-decided-per-event-at-its-position`).
//!
//! A mechanic may see `session:<id>` only while one of their assignments in that session is
//! accepted or completed. Unlike the other rules, this one is not a property of the changed row
//! alone: it depends on the session's other rows. [`SessionMembership`] keeps the set of rows
//! that grant the right and moves it event by event, forwards for live delivery and backwards
//! for a replay that starts from the state read at the log head.
//!
//! ```text
//!   rows at head H (one REPEATABLE READ read) ──new──▶ membership at H
//!        replay (since, H]:  rewind from H down to since, then apply upwards, delivering
//!        live (H, …):        apply; the change that ends the right is delivered, then revoked
//! ```

use uuid::Uuid;

use crate::{AssignmentEvent, RowState, Status};

/// What to do with one event of the followed session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The mechanic could see the session before or after the change, and still can.
    Deliver,
    /// The mechanic could see the session before the change and no longer can after it:
    /// deliver this event, then revoke the subscription.
    DeliverThenRevoke,
    /// The mechanic could see the session neither before nor after: not theirs to see.
    Skip,
}

/// The assignments of one session that make one mechanic a member of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionMembership {
    session: Uuid,
    mechanic: Uuid,
    /// Ids of the session's assignments held by the mechanic as accepted or completed. A
    /// session has a handful of assignments, so a vector beats a set.
    granting: Vec<Uuid>,
}

/// Does a row in `state` make `mechanic` a member of its session?
fn grants(state: Option<RowState>, mechanic: Uuid) -> bool {
    state.is_some_and(|s| {
        s.mechanic_id == Some(mechanic) && matches!(s.status, Status::Accepted | Status::Completed)
    })
}

impl SessionMembership {
    /// The membership as read from the table: `granting` are the ids of the session's rows
    /// whose mechanic is `mechanic` and whose status is accepted or completed.
    pub fn new(session: Uuid, mechanic: Uuid, granting: impl IntoIterator<Item = Uuid>) -> Self {
        let mut granting: Vec<Uuid> = granting.into_iter().collect();
        granting.sort_unstable();
        granting.dedup();
        SessionMembership {
            session,
            mechanic,
            granting,
        }
    }

    /// May the mechanic see the session now?
    pub fn is_member(&self) -> bool {
        !self.granting.is_empty()
    }

    /// The session followed.
    pub fn session(&self) -> Uuid {
        self.session
    }

    fn set(&mut self, assignment: Uuid, grants: bool) {
        match (self.granting.binary_search(&assignment), grants) {
            (Ok(i), false) => {
                self.granting.remove(i);
            }
            (Err(i), true) => self.granting.insert(i, assignment),
            _ => {}
        }
    }

    /// Moves the membership past `event` and says whether the mechanic receives it. Events of
    /// other sessions change nothing and are skipped.
    pub fn apply(&mut self, event: &AssignmentEvent) -> Verdict {
        if event.assignment.session_id != self.session {
            return Verdict::Skip;
        }
        let before = self.is_member();
        self.set(event.assignment.id, grants(event.after(), self.mechanic));
        match (before, self.is_member()) {
            (_, true) => Verdict::Deliver,
            (true, false) => Verdict::DeliverThenRevoke,
            (false, false) => Verdict::Skip,
        }
    }

    /// Moves the membership back to just before `event` (the row's state before the change is
    /// in the event), so a replay can start from the membership read at the log head.
    pub fn rewind(&mut self, event: &AssignmentEvent) {
        if event.assignment.session_id == self.session {
            self.set(event.assignment.id, grants(event.before(), self.mechanic));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Assignment, EventKind, PriorState};

    const S: Uuid = Uuid::from_u128(0x5e55);
    const M: Uuid = Uuid::from_u128(0x1);
    const OTHER: Uuid = Uuid::from_u128(0x2);

    fn event(
        position: i64,
        id: u128,
        before: Option<(Status, Option<Uuid>)>,
        after: Option<(Status, Option<Uuid>)>,
    ) -> AssignmentEvent {
        let (kind, (status, mechanic_id)) = match (before, after) {
            (None, Some(a)) => (EventKind::Created, a),
            (Some(_), Some(a)) => (EventKind::Updated, a),
            (Some(b), None) => (EventKind::Deleted, b),
            (None, None) => unreachable!("an event has a before or an after"),
        };
        AssignmentEvent {
            position,
            kind,
            assignment: Assignment {
                id: Uuid::from_u128(id),
                session_id: S,
                mechanic_id,
                workshop_id: None,
                status,
                urgent: false,
                customer_name: None,
                vehicle_summary: None,
                concern: None,
                created_at: None,
                updated_at: None,
            },
            prior: before.map(|(status, mechanic_id)| PriorState {
                status,
                mechanic_id,
                workshop_id: None,
            }),
            committed_at: chrono::DateTime::UNIX_EPOCH,
            customer_id: None,
        }
    }

    #[test]
    fn accepting_grants_and_reassigning_revokes_after_the_change() {
        let mut m = SessionMembership::new(S, M, []);
        assert!(!m.is_member());
        let queued = event(1, 0xa, None, Some((Status::Queued, None)));
        assert_eq!(m.apply(&queued), Verdict::Skip);
        let offered = event(
            2,
            0xa,
            Some((Status::Queued, None)),
            Some((Status::Offered, Some(M))),
        );
        assert_eq!(
            m.apply(&offered),
            Verdict::Skip,
            "an offer is not membership"
        );
        let accepted = event(
            3,
            0xa,
            Some((Status::Offered, Some(M))),
            Some((Status::Accepted, Some(M))),
        );
        assert_eq!(m.apply(&accepted), Verdict::Deliver);
        assert!(m.is_member());
        let edit = event(4, 0xb, None, Some((Status::Queued, None)));
        assert_eq!(
            m.apply(&edit),
            Verdict::Deliver,
            "the session's other rows too"
        );
        let reassigned = event(
            5,
            0xa,
            Some((Status::Accepted, Some(M))),
            Some((Status::Accepted, Some(OTHER))),
        );
        assert_eq!(m.apply(&reassigned), Verdict::DeliverThenRevoke);
        assert!(!m.is_member());
        let later = event(
            6,
            0xa,
            Some((Status::Accepted, Some(OTHER))),
            Some((Status::Completed, Some(OTHER))),
        );
        assert_eq!(m.apply(&later), Verdict::Skip);
    }

    #[test]
    fn two_granting_rows_revoke_only_when_both_are_gone() {
        let mut m = SessionMembership::new(S, M, [Uuid::from_u128(0xa), Uuid::from_u128(0xb)]);
        let cancel_a = event(
            7,
            0xa,
            Some((Status::Accepted, Some(M))),
            Some((Status::Cancelled, Some(M))),
        );
        assert_eq!(m.apply(&cancel_a), Verdict::Deliver);
        let delete_b = event(8, 0xb, Some((Status::Completed, Some(M))), None);
        assert_eq!(m.apply(&delete_b), Verdict::DeliverThenRevoke);
    }

    #[test]
    fn other_sessions_change_nothing() {
        let mut m = SessionMembership::new(S, M, [Uuid::from_u128(0xa)]);
        let mut elsewhere = event(
            9,
            0xa,
            Some((Status::Accepted, Some(M))),
            Some((Status::Cancelled, Some(M))),
        );
        elsewhere.assignment.session_id = Uuid::from_u128(0x5e56);
        assert_eq!(m.apply(&elsewhere), Verdict::Skip);
        m.rewind(&elsewhere);
        assert!(m.is_member());
    }

    /// Rewinding a history from its end and applying it again yields, at every event, the
    /// verdict of an oracle that recomputes membership from scratch at each position.
    #[test]
    fn rewind_then_apply_agrees_with_recomputing_from_the_rows() {
        let statuses = Status::ALL;
        let mechanics = [None, Some(M), Some(OTHER)];
        // A deterministic pseudo-random walk over three rows of the session.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _round in 0..200 {
            let mut rows: [Option<(Status, Option<Uuid>)>; 3] = [None; 3];
            let mut history = Vec::new();
            let mut member_after = Vec::new();
            for position in 1..=30 {
                let i = next(3);
                let after = if rows[i].is_some() && next(6) == 0 {
                    None
                } else {
                    Some((statuses[next(7)], mechanics[next(3)]))
                };
                if rows[i].is_none() && after.is_none() {
                    continue;
                }
                history.push(event(position, i as u128, rows[i], after));
                rows[i] = after;
                member_after.push(rows.iter().flatten().any(|(s, m)| {
                    *m == Some(M) && matches!(s, Status::Accepted | Status::Completed)
                }));
            }
            let granting = rows.iter().enumerate().filter_map(|(i, r)| {
                r.filter(|(s, m)| {
                    *m == Some(M) && matches!(s, Status::Accepted | Status::Completed)
                })
                .map(|_| Uuid::from_u128(i as u128))
            });
            let mut m = SessionMembership::new(S, M, granting);
            for e in history.iter().rev() {
                m.rewind(e);
            }
            assert!(!m.is_member(), "before any row existed nobody is a member");
            let mut was = false;
            for (e, now) in history.iter().zip(&member_after) {
                let expected = match (was, *now) {
                    (_, true) => Verdict::Deliver,
                    (true, false) => Verdict::DeliverThenRevoke,
                    (false, false) => Verdict::Skip,
                };
                assert_eq!(m.apply(e), expected, "{e:?}");
                was = *now;
            }
        }
    }
}

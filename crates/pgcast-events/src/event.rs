//! [`AssignmentEvent`]: one committed change of a row at its log [`Position`], with the routing
//! fields of the row before ([`PriorState`]) and after it ([`RowState`]), so an update reaches
//! everybody who could see the row on either side of the change.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Assignment, Status};

/// Commit-ordered position of an event in `pgcast.assignment_events`.
///
/// Strictly increasing in commit order; may have holes (a transaction that drew a position and
/// then failed to commit), which readers must tolerate.
pub type Position = i64;

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// The row was inserted.
    #[serde(rename = "assignment.created")]
    Created,
    /// The row was updated.
    #[serde(rename = "assignment.updated")]
    Updated,
    /// The row was deleted.
    #[serde(rename = "assignment.deleted")]
    Deleted,
}

impl EventKind {
    /// The wire name, e.g. `assignment.created`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "assignment.created",
            EventKind::Updated => "assignment.updated",
            EventKind::Deleted => "assignment.deleted",
        }
    }
}

/// The routing fields of a row before an UPDATE or DELETE.
///
/// Kept so that an update reaches everybody who could see the row *before* it, not only after
/// (a card must leave the queues it was in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriorState {
    /// Status before the change.
    pub status: Status,
    /// Mechanic before the change.
    pub mechanic_id: Option<Uuid>,
    /// Workshop before the change.
    pub workshop_id: Option<Uuid>,
}

/// The fields of a row that visibility rules look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowState {
    /// Session of the row (never changes in practice; taken from the row image).
    pub session_id: Uuid,
    /// Customer of the row's session, when known (recorded in the log at commit; a row read
    /// alone does not carry it).
    pub customer_id: Option<Uuid>,
    /// Status.
    pub status: Status,
    /// Mechanic.
    pub mechanic_id: Option<Uuid>,
    /// Workshop.
    pub workshop_id: Option<Uuid>,
}

/// One committed change of `session_assignments`, typed and complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignmentEvent {
    /// Commit-ordered position in the log.
    pub position: Position,
    /// Insert, update or delete.
    pub kind: EventKind,
    /// The row after the change (for a delete: the row as it was).
    pub assignment: Assignment,
    /// Routing fields before the change; `Some` exactly for updates and deletes.
    pub prior: Option<PriorState>,
    /// When the writing transaction committed (clock of the database), for latency metrics.
    pub committed_at: DateTime<Utc>,
    /// Customer of the row's session as the database stood at commit (`sessions.customer_id`,
    /// recorded in the log by the trigger); `None` when the session has no row there. A
    /// session's customer never changes, so it is the same before and after the change.
    pub customer_id: Option<Uuid>,
}

impl AssignmentEvent {
    /// The status before the change, as sent in `old_status`.
    pub fn old_status(&self) -> Option<Status> {
        self.prior.map(|p| p.status)
    }

    /// The row's visibility state before the change (`None` for an insert).
    pub fn before(&self) -> Option<RowState> {
        self.prior.map(|p| RowState {
            session_id: self.assignment.session_id,
            customer_id: self.customer_id,
            status: p.status,
            mechanic_id: p.mechanic_id,
            workshop_id: p.workshop_id,
        })
    }

    /// The row's visibility state after the change (`None` for a delete).
    pub fn after(&self) -> Option<RowState> {
        match self.kind {
            EventKind::Deleted => None,
            EventKind::Created | EventKind::Updated => Some(RowState {
                customer_id: self.customer_id,
                ..self.assignment.row_state()
            }),
        }
    }
}

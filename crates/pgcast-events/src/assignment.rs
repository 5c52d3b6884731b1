//! A `session_assignments` row as events and snapshots carry it: [`Assignment`] and its
//! lifecycle [`Status`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Lifecycle state of a `session_assignments` row (the column's check constraint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Waiting in a queue for a mechanic to take it.
    Queued,
    /// Offered to one mechanic directly.
    Offered,
    /// A mechanic took it.
    Accepted,
    /// The offered mechanic said no.
    Declined,
    /// The customer or the platform withdrew it.
    Cancelled,
    /// Nobody took it in time.
    Expired,
    /// The help session ended.
    Completed,
}

impl Status {
    /// Every status, in lifecycle order (for tests and simulations).
    pub const ALL: [Status; 7] = [
        Status::Queued,
        Status::Offered,
        Status::Accepted,
        Status::Declined,
        Status::Cancelled,
        Status::Expired,
        Status::Completed,
    ];

    /// The spelling used in SQL and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Offered => "offered",
            Status::Accepted => "accepted",
            Status::Declined => "declined",
            Status::Cancelled => "cancelled",
            Status::Expired => "expired",
            Status::Completed => "completed",
        }
    }
}

/// A status string that is not one of [`Status::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown assignment status {0:?}")]
pub struct StatusParseError(pub String);

impl std::str::FromStr for Status {
    type Err = StatusParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| StatusParseError(s.to_owned()))
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `session_assignments` row as clients see it.
///
/// `id`, `session_id` and `status` are required when decoding: a row image without them is a
/// decode error, never an assignment with a hole in it. The optional columns are `null` on the
/// wire when the row has no value, so a client can tell "no mechanic" from "field forgotten".
/// Columns an application adds to its table are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// Primary key.
    pub id: Uuid,
    /// The help session this assignment belongs to.
    pub session_id: Uuid,
    /// The mechanic it is offered to or taken by, if any.
    pub mechanic_id: Option<Uuid>,
    /// The workshop whose queue it is in, if any (none = general queue).
    pub workshop_id: Option<Uuid>,
    /// Lifecycle state.
    pub status: Status,
    /// Shown first in queues.
    #[serde(default)]
    pub urgent: bool,
    /// Display name of the customer.
    pub customer_name: Option<String>,
    /// e.g. "2014 VW Golf, 1.6 TDI".
    pub vehicle_summary: Option<String>,
    /// What the customer wrote.
    pub concern: Option<String>,
    /// Row creation time.
    pub created_at: Option<DateTime<Utc>>,
    /// Last update time.
    pub updated_at: Option<DateTime<Utc>>,
}

impl Assignment {
    /// The fields that decide who may see this row. The row alone does not name its session's
    /// customer: `customer_id` is `None` (the caller sets it when it knows it).
    pub fn row_state(&self) -> crate::RowState {
        crate::RowState {
            session_id: self.session_id,
            customer_id: None,
            status: self.status,
            mechanic_id: self.mechanic_id,
            workshop_id: self.workshop_id,
        }
    }
}

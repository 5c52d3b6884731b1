//! A `session_assignments` row as events and snapshots carry it: [`Assignment`] and its
//! lifecycle [`Status`].

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
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
    /// Shown first in queues (a null, from a nullable column, is not urgent).
    #[serde(default, deserialize_with = "null_as_false")]
    pub urgent: bool,
    /// Display name of the customer.
    pub customer_name: Option<String>,
    /// e.g. "2014 VW Golf, 1.6 TDI".
    pub vehicle_summary: Option<String>,
    /// What the customer wrote.
    pub concern: Option<String>,
    /// Row creation time.
    #[serde(default, deserialize_with = "row_time")]
    pub created_at: Option<DateTime<Utc>>,
    /// Last update time.
    #[serde(default, deserialize_with = "row_time")]
    pub updated_at: Option<DateTime<Utc>>,
}

/// Reads `urgent`: the application's column may be nullable, and null is not urgent.
fn null_as_false<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// Reads a row time as `to_json` and `to_jsonb` write it: with an offset from a `timestamptz` column, or
/// without one from a `timestamp` column (an application's table may use either), which is
/// read as UTC. Anything else (`infinity`, garbage) is an error: the row is not decoded.
fn row_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    let Some(text) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    if let Ok(time) = text.parse::<DateTime<Utc>>() {
        return Ok(Some(time));
    }
    text.parse::<NaiveDateTime>()
        .map(|naive| Some(naive.and_utc()))
        .map_err(|_| D::Error::custom(format!("not a timestamp: {text:?}")))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(urgent: &str, created_at: &str) -> String {
        format!(
            r#"{{"id":"3f2a1d7c-0b9e-4e0f-8a3c-5d6e7f809a1b",
                "session_id":"8d0c6c1e-6f0e-4bb5-9a51-2a0b3d1c9e77",
                "mechanic_id":null,"workshop_id":null,"status":"queued",
                "urgent":{urgent},"created_at":{created_at},"updated_at":null}}"#
        )
    }

    #[test]
    fn a_timestamp_without_offset_is_read_as_utc_and_a_null_urgent_as_false() {
        // As to_json and to_jsonb write a `timestamp` column and a nullable boolean.
        let a: Assignment =
            serde_json::from_str(&row("null", r#""2026-11-29T04:05:06.123456""#)).unwrap();
        assert!(!a.urgent);
        let utc: DateTime<Utc> = "2026-11-29T04:05:06.123456Z".parse().unwrap();
        assert_eq!(a.created_at, Some(utc));
        // And as it writes `timestamptz` (here in a session whose time zone is not UTC).
        let a: Assignment =
            serde_json::from_str(&row("true", r#""2026-11-29T06:05:06.123456+02:00""#)).unwrap();
        assert!(a.urgent);
        assert_eq!(a.created_at, Some(utc));
        // The wire form carries the offset.
        let wire = serde_json::to_value(&a).unwrap();
        assert_eq!(wire["created_at"], "2026-11-29T04:05:06.123456Z");
    }

    #[test]
    fn a_time_that_is_no_timestamp_is_an_error() {
        for bad in [r#""infinity""#, r#""yesterday""#, "17"] {
            let err = serde_json::from_str::<Assignment>(&row("false", bad));
            assert!(err.is_err(), "{bad} was read");
        }
    }
}

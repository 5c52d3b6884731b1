//! Decoding of the JSON that `pgcast.emit_assignment_event()` stores in
//! `pgcast.assignment_events.payload`. It is the only source of events: the NOTIFY that goes with
//! a commit is a doorbell without content (any role that can connect may NOTIFY), so live events
//! and replayed ones are decoded from the same log rows and cannot differ.

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::{Assignment, AssignmentEvent, EventKind, Position, PriorState};

/// Why a log row could not become an [`AssignmentEvent`]. Such rows are counted and logged by
/// the listener and skipped; they never produce a partial event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not JSON, or JSON of the wrong shape (a missing `id`, an unknown status, …).
    #[error("malformed payload: {0}")]
    Malformed(serde_json::Error),
    /// Well-formed JSON that breaks an invariant of the event log.
    #[error("inconsistent payload: {0}")]
    Inconsistent(&'static str),
}

impl DecodeError {
    /// True when the payload was not valid JSON of the expected shape.
    pub fn is_malformed(&self) -> bool {
        matches!(self, DecodeError::Malformed(_))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Op {
    #[serde(alias = "INSERT")]
    Insert,
    #[serde(alias = "UPDATE")]
    Update,
    #[serde(alias = "DELETE")]
    Delete,
}

#[derive(Deserialize)]
struct RawPayload {
    position: Position,
    op: Option<Op>,
    committed_at: Option<DateTime<Utc>>,
    row: Option<Assignment>,
    old: Option<PriorState>,
    /// Written by schema version 2 and later; older rows have none.
    #[serde(default)]
    customer_id: Option<uuid::Uuid>,
}

/// Decodes a log row's `payload` column.
pub fn decode_payload(text: &str) -> Result<AssignmentEvent, DecodeError> {
    let raw: RawPayload = serde_json::from_str(text).map_err(DecodeError::Malformed)?;
    if raw.position <= 0 {
        return Err(DecodeError::Inconsistent("position must be positive"));
    }
    let op = raw.op.ok_or(DecodeError::Inconsistent("missing op"))?;
    let assignment = raw.row.ok_or(DecodeError::Inconsistent("missing row"))?;
    let committed_at = raw
        .committed_at
        .ok_or(DecodeError::Inconsistent("missing committed_at"))?;
    let (kind, prior) = match (op, raw.old) {
        (Op::Insert, None) => (EventKind::Created, None),
        (Op::Insert, Some(_)) => return Err(DecodeError::Inconsistent("insert with old state")),
        (Op::Update, Some(old)) => (EventKind::Updated, Some(old)),
        (Op::Delete, Some(old)) => (EventKind::Deleted, Some(old)),
        (Op::Update | Op::Delete, None) => {
            return Err(DecodeError::Inconsistent(
                "update or delete without old state",
            ))
        }
    };
    Ok(AssignmentEvent {
        position: raw.position,
        kind,
        assignment,
        prior,
        committed_at,
        customer_id: raw.customer_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Status;

    const ROW: &str = r#"{"id":"5b7f8a52-8f0e-4d51-9d7e-6a1f0f2f0c11","session_id":"0e6b3a57-3f4c-4a9e-8a55-2f4b7a7d9a10",
        "mechanic_id":null,"workshop_id":"8d1e2a3b-1c2d-4e5f-8a9b-0c1d2e3f4a5b","status":"queued","urgent":true,
        "customer_name":"Ana","vehicle_summary":"2014 VW Golf","concern":"noise","extra_app_column":42,
        "created_at":"2026-11-25T19:32:43.123456+00:00","updated_at":"2026-11-25T19:32:43.123456+00:00"}"#;

    fn payload(op: &str, old: &str) -> String {
        format!(
            r#"{{"position":7,"op":"{op}","committed_at":"2026-11-25T19:32:44.5+00:00","row":{ROW},"old":{old}}}"#
        )
    }

    #[test]
    fn decodes_a_full_insert() {
        let e = decode_payload(&payload("insert", "null")).unwrap();
        assert_eq!(e.position, 7);
        assert_eq!(e.kind, EventKind::Created);
        assert_eq!(e.assignment.status, Status::Queued);
        assert!(e.assignment.urgent);
        assert_eq!(e.assignment.mechanic_id, None);
        assert!(e.assignment.workshop_id.is_some());
        assert_eq!(e.prior, None);
        assert_eq!(e.before(), None);
        assert!(e.after().is_some());
    }

    #[test]
    fn update_and_delete_carry_prior_routing_fields() {
        let old = r#"{"status":"offered","mechanic_id":"11111111-1111-4111-8111-111111111111","workshop_id":null}"#;
        let u = decode_payload(&payload("update", old)).unwrap();
        assert_eq!(u.kind, EventKind::Updated);
        assert_eq!(u.old_status(), Some(Status::Offered));
        assert_eq!(
            u.before()
                .and_then(|b| b.mechanic_id)
                .map(|m| m.to_string()),
            Some("11111111-1111-4111-8111-111111111111".to_owned())
        );
        let d = decode_payload(&payload("delete", old)).unwrap();
        assert_eq!(d.kind, EventKind::Deleted);
        assert_eq!(d.after(), None);
    }

    #[test]
    fn a_row_without_id_is_an_error_not_a_half_event() {
        let without_id = payload("insert", "null")
            .replace(r#""id":"5b7f8a52-8f0e-4d51-9d7e-6a1f0f2f0c11","#, "");
        let err = decode_payload(&without_id).unwrap_err();
        assert!(err.is_malformed(), "{err}");
        assert!(err.to_string().contains("id"), "{err}");
    }

    #[test]
    fn a_null_id_is_an_error() {
        let null_id = payload("insert", "null").replace(
            r#""id":"5b7f8a52-8f0e-4d51-9d7e-6a1f0f2f0c11""#,
            r#""id":null"#,
        );
        assert!(decode_payload(&null_id).is_err());
    }

    #[test]
    fn garbage_and_broken_invariants_are_errors() {
        for bad in [
            "",
            "hello",
            "{}",
            "[1,2]",
            r#"{"position":"7"}"#,
            r#"{"position":0,"ref":true}"#,
            r#"{"position":-3,"ref":true}"#,
            // The reference notifications of schema version 1 are not events.
            r#"{"position":9001,"ref":true}"#,
            r#"{"position":7,"op":"insert"}"#,
            r#"{"position":7,"op":"truncate","committed_at":"2026-11-25T19:32:44Z","row":{}}"#,
        ] {
            assert!(decode_payload(bad).is_err(), "{bad:?} decoded");
        }
        let old = r#"{"status":"queued","mechanic_id":null,"workshop_id":null}"#;
        assert!(decode_payload(&payload("insert", old)).is_err());
        assert!(decode_payload(&payload("update", "null")).is_err());
        let unknown_status = payload("insert", "null").replace("\"queued\"", "\"teleported\"");
        assert!(decode_payload(&unknown_status).is_err());
    }
}

//! Decoding of a log row into an [`AssignmentEvent`]: its position and commit time, and the
//! event JSON that `pgcast.capture_assignment_changes()` stored when the change was captured
//! (`pgcast.assignment_changes.event`: op, row, old, customer_id). The log is the only source
//! of events: the NOTIFY that goes with a commit is a doorbell without content (any role that
//! can connect may NOTIFY), so live events and replayed ones are decoded from the same log rows
//! and cannot differ.

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::{Assignment, AssignmentEvent, EventKind, Position, PriorState};

/// Why a log row could not become an [`AssignmentEvent`]. Such rows are counted and logged by
/// the listener and skipped; they never produce a partial event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not JSON, or JSON of the wrong shape (a missing `id`, an unknown status, …).
    #[error("malformed event: {0}")]
    Malformed(serde_json::Error),
    /// Well-formed JSON that breaks an invariant of the event log.
    #[error("inconsistent event: {0}")]
    Inconsistent(&'static str),
}

impl DecodeError {
    /// True when the event was not valid JSON of the expected shape.
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

/// The stored event. Other keys are ignored: the view `pgcast.assignment_events` shows the same
/// object with `position` and `committed_at` merged in, and decodes the same.
#[derive(Deserialize)]
struct RawEvent {
    op: Option<Op>,
    row: Option<Assignment>,
    old: Option<PriorState>,
    /// Written by schema version 2 and later; older rows have none.
    #[serde(default)]
    customer_id: Option<uuid::Uuid>,
}

/// Decodes the log row at `position`, committed at `committed_at`, whose stored event is
/// `event`.
pub fn decode_event(
    position: Position,
    committed_at: DateTime<Utc>,
    event: &str,
) -> Result<AssignmentEvent, DecodeError> {
    if position <= 0 {
        return Err(DecodeError::Inconsistent("position must be positive"));
    }
    let raw: RawEvent = serde_json::from_str(event).map_err(DecodeError::Malformed)?;
    let op = raw.op.ok_or(DecodeError::Inconsistent("missing op"))?;
    let assignment = raw.row.ok_or(DecodeError::Inconsistent("missing row"))?;
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
        position,
        kind,
        assignment,
        prior,
        committed_at,
        customer_id: raw.customer_id,
    })
}

/// The session named by a stored event that did not decode, read as leniently as can be (only
/// `row.session_id`). A row that cannot be decoded may still have changed who belongs to that
/// session (an application's new status, say), so whoever follows the session by membership
/// must be told that it can no longer be judged. `None` when even that cannot be read: then
/// any session may be the one.
pub fn session_of_undecodable(event: &str) -> Option<uuid::Uuid> {
    #[derive(Deserialize)]
    struct Row {
        session_id: uuid::Uuid,
    }
    #[derive(Deserialize)]
    struct Named {
        row: Row,
    }
    serde_json::from_str::<Named>(event)
        .ok()
        .map(|named| named.row.session_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Status;

    const ROW: &str = r#"{"id":"5b7f8a52-8f0e-4d51-9d7e-6a1f0f2f0c11","session_id":"0e6b3a57-3f4c-4a9e-8a55-2f4b7a7d9a10",
        "mechanic_id":null,"workshop_id":"8d1e2a3b-1c2d-4e5f-8a9b-0c1d2e3f4a5b","status":"queued","urgent":true,
        "customer_name":"Ana","vehicle_summary":"2014 VW Golf","concern":"noise","extra_app_column":42,
        "created_at":"2026-11-25T19:32:43.123456+00:00","updated_at":"2026-11-25T19:32:43.123456+00:00"}"#;

    fn stored(op: &str, old: &str) -> String {
        format!(r#"{{"op":"{op}","row":{ROW},"old":{old}}}"#)
    }

    fn at() -> DateTime<Utc> {
        "2026-11-25T19:32:44.5+00:00".parse().unwrap()
    }

    /// The row at position 7.
    fn decode(event: &str) -> Result<AssignmentEvent, DecodeError> {
        decode_event(7, at(), event)
    }

    #[test]
    fn decodes_a_full_insert() {
        let e = decode(&stored("insert", "null")).unwrap();
        assert_eq!(e.position, 7);
        assert_eq!(e.committed_at, at());
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
        let u = decode(&stored("update", old)).unwrap();
        assert_eq!(u.kind, EventKind::Updated);
        assert_eq!(u.old_status(), Some(Status::Offered));
        assert_eq!(
            u.before()
                .and_then(|b| b.mechanic_id)
                .map(|m| m.to_string()),
            Some("11111111-1111-4111-8111-111111111111".to_owned())
        );
        let d = decode(&stored("delete", old)).unwrap();
        assert_eq!(d.kind, EventKind::Deleted);
        assert_eq!(d.after(), None);
    }

    #[test]
    fn a_row_without_id_is_an_error_not_a_half_event() {
        let without_id =
            stored("insert", "null").replace(r#""id":"5b7f8a52-8f0e-4d51-9d7e-6a1f0f2f0c11","#, "");
        let err = decode(&without_id).unwrap_err();
        assert!(err.is_malformed(), "{err}");
        assert!(err.to_string().contains("id"), "{err}");
    }

    #[test]
    fn a_null_id_is_an_error() {
        let null_id = stored("insert", "null").replace(
            r#""id":"5b7f8a52-8f0e-4d51-9d7e-6a1f0f2f0c11""#,
            r#""id":null"#,
        );
        assert!(decode(&null_id).is_err());
    }

    #[test]
    fn garbage_and_broken_invariants_are_errors() {
        for bad in [
            "",
            "hello",
            "{}",
            "[1,2]",
            // The reference notifications of schema version 1 are not events.
            r#"{"position":9001,"ref":true}"#,
            r#"{"op":"insert"}"#,
            r#"{"op":"truncate","row":{}}"#,
        ] {
            assert!(decode(bad).is_err(), "{bad:?} decoded");
        }
        let old = r#"{"status":"queued","mechanic_id":null,"workshop_id":null}"#;
        assert!(decode(&stored("insert", old)).is_err());
        assert!(decode(&stored("update", "null")).is_err());
        let unknown_status = stored("insert", "null").replace("\"queued\"", "\"teleported\"");
        assert!(decode(&unknown_status).is_err());
    }

    #[test]
    fn the_session_of_an_undecodable_event_is_read_when_it_is_there() {
        let session = "0e6b3a57-3f4c-4a9e-8a55-2f4b7a7d9a10".parse().ok();
        let unknown_status =
            stored("update", r#"{"status":"paused"}"#).replace("\"queued\"", "\"teleported\"");
        assert!(decode(&unknown_status).is_err());
        assert_eq!(session_of_undecodable(&unknown_status), session);
        let without_id =
            stored("insert", "null").replace(r#""id":"5b7f8a52-8f0e-4d51-9d7e-6a1f0f2f0c11","#, "");
        assert_eq!(session_of_undecodable(&without_id), session);
        for unnamed in [
            "",
            "{}",
            r#"{"row":{"session_id":null}}"#,
            r#"{"row":{"session_id":"not a uuid"}}"#,
            r#"{"row":[1]}"#,
        ] {
            assert_eq!(session_of_undecodable(unnamed), None, "{unnamed:?}");
        }
    }

    #[test]
    fn a_position_that_is_not_positive_is_an_error() {
        for position in [0, -3] {
            let err = decode_event(position, at(), &stored("insert", "null")).unwrap_err();
            assert!(!err.is_malformed(), "{err}");
        }
    }

    #[test]
    fn the_views_payload_decodes_the_same() {
        // pgcast.assignment_events shows the stored event with position and committed_at
        // merged in; those keys are the row's own, and decoding ignores them.
        let merged = format!(
            r#"{{"position":9,"committed_at":"2000-01-01T00:00:00Z",{}"#,
            &stored("insert", "null")[1..]
        );
        let e = decode(&merged).unwrap();
        assert_eq!((e.position, e.committed_at), (7, at()));
    }
}

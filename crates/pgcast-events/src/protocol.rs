//! Wire protocol v1 (`README.md#protocol-v1`): JSON text frames on `GET /ws`.

use serde::{Deserialize, Serialize};

use crate::{Assignment, AssignmentEvent, Position, Role, Status, Topic};

/// Longest request id accepted from a client (it is echoed back).
pub const MAX_ID_LEN: usize = 128;

/// A frame from the client.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// Must be the first frame.
    Auth {
        /// JWT. Sent again on a live connection, it refreshes the token (same `sub` and `role`).
        token: String,
    },
    /// Start receiving a topic.
    Subscribe {
        /// Request id, echoed in the reply.
        #[serde(default)]
        id: Option<String>,
        /// Topic string, e.g. `queue`.
        topic: String,
        /// Replay every event after this position first.
        #[serde(default)]
        since: Option<Position>,
        /// Send the current state first.
        #[serde(default)]
        snapshot: Option<bool>,
    },
    /// Stop receiving a topic.
    Unsubscribe {
        /// Request id, echoed in errors.
        #[serde(default)]
        id: Option<String>,
        /// Topic string.
        topic: String,
    },
    /// Liveness check from the client.
    Ping {
        /// Request id, echoed in the pong.
        #[serde(default)]
        id: Option<String>,
    },
}

/// A client frame that is not a valid v1 message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Invalid JSON, unknown `type`, missing or mistyped field.
    #[error("invalid message: {0}")]
    Invalid(serde_json::Error),
    /// A request id longer than [`MAX_ID_LEN`].
    #[error("id is longer than {MAX_ID_LEN} bytes")]
    IdTooLong,
}

impl ClientMessage {
    /// Parses one text frame.
    pub fn parse(text: &str) -> Result<ClientMessage, ProtocolError> {
        let msg: ClientMessage = serde_json::from_str(text).map_err(ProtocolError::Invalid)?;
        let id = match &msg {
            ClientMessage::Subscribe { id, .. }
            | ClientMessage::Unsubscribe { id, .. }
            | ClientMessage::Ping { id } => id.as_deref(),
            ClientMessage::Auth { .. } => None,
        };
        if id.is_some_and(|id| id.len() > MAX_ID_LEN) {
            return Err(ProtocolError::IdTooLong);
        }
        Ok(msg)
    }
}

/// `code` of an `error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame could not be understood.
    BadRequest,
    /// Missing or invalid token (the connection is then closed with 1008).
    Unauthorized,
    /// The user may not subscribe to that topic.
    Forbidden,
    /// The topic string names no topic.
    UnknownTopic,
    /// The per-connection subscription limit was reached.
    TooManySubscriptions,
    /// The client sends too fast.
    RateLimited,
    /// The server could not complete the request (e.g. the database is unreachable); retry.
    Unavailable,
    /// The snapshot asked for would hold more rows than the server's limit
    /// (`--snapshot-limit`): asking again cannot succeed; follow the topic without a snapshot
    /// (or with `since`).
    SnapshotTooLarge,
    /// The token reached its `exp` without a refresh; the connection is then closed with 4001.
    /// Reconnect with a fresh token and `since`.
    TokenExpired,
}

/// A frame from the server other than `event` (see [`EventFrame`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Authentication succeeded.
    Ready {
        /// `sub` of the token.
        user_id: uuid::Uuid,
        /// `role` of the token.
        role: Role,
        /// The token's `exp` (unix seconds): refresh with a new `auth` frame before it, or the
        /// connection is closed with 4001 and nothing committed after it is sent.
        expires_at: u64,
    },
    /// The subscription is active from `position` on.
    Subscribed {
        /// Request id.
        id: Option<String>,
        /// Canonical topic.
        topic: String,
        /// Events after this position follow.
        position: Position,
    },
    /// Current state of the topic at `position`.
    Snapshot {
        /// Canonical topic.
        topic: String,
        /// The snapshot includes every event up to this position.
        position: Position,
        /// Assignments visible to the subscriber.
        assignments: Vec<Assignment>,
    },
    /// A request failed.
    Error {
        /// Request id, when the failed frame had one.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<String>,
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// The requested `since` is older than the retained log; take a fresh snapshot.
    Resync {
        /// Canonical topic.
        topic: String,
        /// Why.
        reason: String,
    },
    /// The subscriber lost the right to the topic (e.g. a mechanic no longer assigned to the
    /// session, or a refreshed token that names another workshop): the subscription is gone and
    /// nothing more of it is sent. The event that removed the right, if any, came just before.
    Revoked {
        /// Canonical topic.
        topic: String,
        /// Why.
        reason: String,
    },
    /// Reply to `ping`.
    Pong {
        /// Request id.
        id: Option<String>,
    },
}

impl ServerMessage {
    /// Serializes to a JSON text frame.
    pub fn encode(&self) -> String {
        // Serializing these plain data types cannot fail (no maps with non-string keys, no
        // custom Serialize impls), so an error here would be a bug in this crate.
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"type":"error","code":"bad_request","message":"encode: {e}"}}"#)
        })
    }
}

/// An `event` frame: one event as delivered on one topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventFrame {
    /// Always `"event"`.
    #[serde(rename = "type")]
    pub frame_type: String,
    /// Canonical topic.
    pub topic: String,
    /// Position of the event.
    pub position: Position,
    /// `assignment.created` | `assignment.updated` | `assignment.deleted`.
    pub event: crate::EventKind,
    /// The row after the change (deleted: as it was).
    pub assignment: Assignment,
    /// Status before the change (`null` for created).
    pub old_status: Option<Status>,
}

#[derive(Serialize)]
struct EventFrameRef<'a> {
    #[serde(rename = "type")]
    frame_type: &'static str,
    topic: &'a str,
    position: Position,
    event: crate::EventKind,
    assignment: &'a Assignment,
    old_status: Option<Status>,
}

impl EventFrame {
    /// Serializes `event` as delivered on `topic`. Called once per (event, topic) and the
    /// bytes shared by every recipient.
    pub fn encode(topic: &Topic, event: &AssignmentEvent) -> String {
        let topic = topic.to_string();
        let frame = EventFrameRef {
            frame_type: "event",
            topic: &topic,
            position: event.position,
            event: event.kind,
            assignment: &event.assignment,
            old_status: event.old_status(),
        };
        serde_json::to_string(&frame).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_client_message() {
        assert_eq!(
            ClientMessage::parse(r#"{"type":"auth","token":"abc"}"#).unwrap(),
            ClientMessage::Auth {
                token: "abc".into()
            }
        );
        assert_eq!(
            ClientMessage::parse(
                r#"{"type":"subscribe","id":"1","topic":"queue","since":5,"snapshot":true}"#
            )
            .unwrap(),
            ClientMessage::Subscribe {
                id: Some("1".into()),
                topic: "queue".into(),
                since: Some(5),
                snapshot: Some(true)
            }
        );
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"unsubscribe","topic":"queue"}"#).unwrap(),
            ClientMessage::Unsubscribe { id: None, .. }
        ));
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"ping","id":"p"}"#).unwrap(),
            ClientMessage::Ping { id: Some(_) }
        ));
    }

    #[test]
    fn rejects_bad_frames() {
        for bad in [
            "",
            "not json",
            "{}",
            "[]",
            r#"{"type":"dance"}"#,
            r#"{"type":"subscribe","id":"1"}"#,
            r#"{"type":"subscribe","topic":7}"#,
            r#"{"type":"subscribe","topic":"queue","since":"yesterday"}"#,
            r#"{"type":"auth"}"#,
            r#"{"type":"auth","token":"t","extra":1}"#,
        ] {
            assert!(ClientMessage::parse(bad).is_err(), "{bad:?} parsed");
        }
        let long_id = format!(r#"{{"type":"ping","id":"{}"}}"#, "x".repeat(MAX_ID_LEN + 1));
        assert!(matches!(
            ClientMessage::parse(&long_id),
            Err(ProtocolError::IdTooLong)
        ));
    }

    #[test]
    fn server_messages_use_the_documented_names() {
        let v: serde_json::Value = serde_json::from_str(
            &ServerMessage::Error {
                id: None,
                code: ErrorCode::TooManySubscriptions,
                message: "m".into(),
            }
            .encode(),
        )
        .unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "too_many_subscriptions");
        assert!(v.get("id").is_none());
        let v: serde_json::Value = serde_json::from_str(
            &ServerMessage::Subscribed {
                id: Some("a".into()),
                topic: "queue".into(),
                position: 3,
            }
            .encode(),
        )
        .unwrap();
        assert_eq!(v["type"], "subscribed");
        assert_eq!(v["position"], 3);
    }

    #[test]
    fn event_frames_carry_every_id() {
        let id = uuid::Uuid::from_u128(7);
        let ev = AssignmentEvent {
            position: 42,
            kind: crate::EventKind::Updated,
            assignment: Assignment {
                id,
                session_id: uuid::Uuid::from_u128(8),
                mechanic_id: Some(uuid::Uuid::from_u128(9)),
                workshop_id: None,
                status: Status::Accepted,
                urgent: true,
                customer_name: Some("Ana".into()),
                vehicle_summary: None,
                concern: None,
                created_at: None,
                updated_at: None,
            },
            prior: Some(crate::PriorState {
                status: Status::Queued,
                mechanic_id: None,
                workshop_id: None,
            }),
            committed_at: chrono::DateTime::UNIX_EPOCH,
            customer_id: None,
        };
        let text = EventFrame::encode(&Topic::Queue, &ev);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "event");
        assert_eq!(v["topic"], "queue");
        assert_eq!(v["position"], 42);
        assert_eq!(v["event"], "assignment.updated");
        assert_eq!(v["old_status"], "queued");
        assert_eq!(v["assignment"]["id"], id.to_string());
        assert_eq!(v["assignment"]["workshop_id"], serde_json::Value::Null);
        for key in [
            "id",
            "session_id",
            "mechanic_id",
            "workshop_id",
            "status",
            "urgent",
            "customer_name",
            "vehicle_summary",
            "concern",
            "created_at",
            "updated_at",
        ] {
            assert!(v["assignment"].get(key).is_some(), "{key} missing");
        }
        let back: EventFrame = serde_json::from_str(&text).unwrap();
        assert_eq!(back.assignment, ev.assignment);
    }
}

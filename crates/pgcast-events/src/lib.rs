//! The vocabulary of pgcast, with no IO: typed assignment events, the log rows they are
//! decoded from, topics, the who-sees-what rules, and the JSON frames of wire protocol v1.
//!
//! Every other crate builds on this one, so a rule written here is the rule everywhere:
//!
//! ```text
//!   log row (pgcast.assignment_events) ──decode_event────▶ AssignmentEvent
//!                                                     │ route_keys()          (which subscribers)
//!   client frame ──ClientMessage::parse──▶ Topic ─────┤ Topic::matches()      (may this one see it)
//!                                                     ▼
//!                                       EventFrame::encode (serialized once per topic)
//! ```
//!
//! The visibility rules live in [`Topic::sees`] and [`Topic::route_keys`]; the gateway indexes
//! subscribers by [`RouteKey`] and never decides visibility on its own (see
//! `docs/architecture.md#5-visibility-is-decided-per-event-at-its-position`).

mod access;
mod assignment;
mod event;
mod payload;
mod protocol;
mod topic;

pub use access::{SessionMembership, Verdict};
pub use assignment::{Assignment, Status, StatusParseError};
pub use event::{AssignmentEvent, EventKind, Position, PriorState, RowState};
pub use payload::{decode_event, session_of_undecodable, DecodeError};
pub use protocol::{
    ClientMessage, ErrorCode, EventFrame, ProtocolError, ServerMessage, MAX_ID_LEN,
};
pub use topic::{Access, Principal, Role, RouteKey, Topic, TopicError, MAX_TOPIC_LEN};

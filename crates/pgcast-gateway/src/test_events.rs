//! Events for the gateway's unit tests, decoded from the log's event format (so they are
//! exactly what the listener hands the gateway).

use std::sync::Arc;

use pgcast_events::{AssignmentEvent, Position};

/// One change of one assignment row, described by what routing depends on.
pub(crate) struct Change<'a> {
    pub(crate) position: Position,
    /// The routing state before (`{"status":…,"mechanic_id":…,"workshop_id":…}`); `None` for
    /// an insert.
    pub(crate) old: Option<&'a str>,
    pub(crate) status: &'a str,
    pub(crate) mechanic: Option<&'a str>,
    pub(crate) workshop: Option<&'a str>,
    /// RFC 3339; a fixed instant when `None`.
    pub(crate) committed_at: Option<&'a str>,
}

impl Change<'_> {
    /// A general queued insert at `position`.
    pub(crate) fn queued(position: Position) -> Change<'static> {
        Change {
            position,
            old: None,
            status: "queued",
            mechanic: None,
            workshop: None,
            committed_at: None,
        }
    }

    pub(crate) fn event(&self) -> Arc<AssignmentEvent> {
        let quoted = |v: Option<&str>| v.map_or("null".to_owned(), |v| format!("\"{v}\""));
        let op = if self.old.is_some() {
            "update"
        } else {
            "insert"
        };
        let text = format!(
            r#"{{"op":"{op}",
            "row":{{"id":"5b7f8a52-8f0e-4d51-9d7e-6a1f0f2f0c11",
            "session_id":"0e6b3a57-3f4c-4a9e-8a55-2f4b7a7d9a10","mechanic_id":{mechanic},
            "workshop_id":{workshop},"status":"{status}","created_at":"2026-11-25T19:32:43+00:00",
            "updated_at":"2026-11-25T19:32:43+00:00"}},"old":{old}}}"#,
            mechanic = quoted(self.mechanic),
            workshop = quoted(self.workshop),
            status = self.status,
            old = self.old.unwrap_or("null"),
        );
        let committed_at = self
            .committed_at
            .unwrap_or("2026-11-25T19:32:44.5+00:00")
            .parse()
            .expect("test commit time");
        Arc::new(
            pgcast_events::decode_event(self.position, committed_at, &text)
                .expect("test event decodes"),
        )
    }
}

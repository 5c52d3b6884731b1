//! A log row's stored event (written by the trigger; a corrupted or hand-edited row must not
//! crash the listener): it decodes to a complete event or fails, and a decoded event routes and
//! serializes without panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use chrono::{TimeZone, Utc};
use pgcast_events::{decode_event, EventFrame, Topic};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(committed_at) = Utc.timestamp_opt(1_764_000_000, 0).single() else {
        return;
    };
    match decode_event(7, committed_at, text) {
        Ok(event) => {
            assert_eq!((event.position, event.committed_at), (7, committed_at));
            assert_eq!(event.prior.is_some(), event.before().is_some());
            let keys = event.route_keys();
            assert!(!keys.is_empty());
            let frame = EventFrame::encode(&Topic::Assignments, &event);
            let back: EventFrame = serde_json_roundtrip(&frame);
            assert_eq!(back.assignment, event.assignment);
        }
        Err(_) => {}
    }
});

fn serde_json_roundtrip(frame: &str) -> EventFrame {
    match serde_json::from_str(frame) {
        Ok(f) => f,
        Err(e) => panic!("an encoded frame does not decode: {e}: {frame}"),
    }
}

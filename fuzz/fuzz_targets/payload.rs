//! Log row payloads (written by the trigger; a corrupted or hand-edited row must not crash the
//! listener): they decode to a complete event or fail, and a decoded event routes and
//! serializes without panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgcast_events::{decode_payload, EventFrame, Topic};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match decode_payload(text) {
        Ok(event) => {
            assert!(event.position > 0);
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

//! Notification payloads (anyone who can connect to the database can NOTIFY the channel): they
//! decode to a complete event or fail, and a decoded event routes and serializes without panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgcast_events::{decode_payload, EventFrame, Payload, Topic};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match decode_payload(text) {
        Ok(Payload::Event(event)) => {
            assert!(event.position > 0);
            assert_eq!(event.prior.is_some(), event.before().is_some());
            let keys = event.route_keys();
            assert!(!keys.is_empty());
            let frame = EventFrame::encode(&Topic::Assignments, &event);
            let back: EventFrame = serde_json_roundtrip(&frame);
            assert_eq!(back.assignment, event.assignment);
        }
        Ok(Payload::Reference(p)) => assert!(p > 0),
        Err(_) => {}
    }
});

fn serde_json_roundtrip(frame: &str) -> EventFrame {
    match serde_json::from_str(frame) {
        Ok(f) => f,
        Err(e) => panic!("an encoded frame does not decode: {e}: {frame}"),
    }
}

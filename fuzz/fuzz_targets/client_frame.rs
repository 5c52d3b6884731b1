//! Client frames: any text a peer may send after connecting must parse or fail cleanly, and a
//! subscribe's topic must round-trip through its canonical spelling.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgcast_events::{ClientMessage, Topic, MAX_ID_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ClientMessage::parse(text) {
        Ok(ClientMessage::Subscribe { id, topic, .. }) => {
            assert!(id.is_none_or(|id| id.len() <= MAX_ID_LEN));
            if let Ok(t) = topic.parse::<Topic>() {
                let canonical = t.to_string();
                assert_eq!(canonical.parse::<Topic>(), Ok(t));
                assert_eq!(canonical, topic, "a topic has exactly one spelling");
            }
        }
        Ok(ClientMessage::Ping { id }) | Ok(ClientMessage::Unsubscribe { id, .. }) => {
            assert!(id.is_none_or(|id| id.len() <= MAX_ID_LEN));
        }
        Ok(ClientMessage::Auth { .. }) | Err(_) => {}
    }
});

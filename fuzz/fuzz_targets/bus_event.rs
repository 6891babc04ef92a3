//! Bus events as every consumer decodes them (`swimlane_core::Event::decode`).
//!
//! Checks: never a panic; a decoded event has a valid user id and encodes to bytes
//! that decode to the same event.
#![no_main]
use libfuzzer_sys::fuzz_target;
use swimlane_core::{Event, UserId};

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = Event::decode(data) {
        assert!(UserId::new(e.user().as_str()).is_ok());
        assert!(!e.topic().is_empty());
        assert_eq!(Event::decode(&e.encode()).expect("re-decodes"), e);
    }
});

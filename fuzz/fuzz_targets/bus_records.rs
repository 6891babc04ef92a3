//! What the bus keeps in the store: embedded-log records
//! (`swimlane_bus::wire::decode_log_record`) and Kafka-bus outbox entries
//! (`decode_outbox_entry`). The first byte picks the format.
//!
//! Checks: never a panic; what decodes encodes back to exactly its bytes; a payload
//! that decodes goes on to `Event::decode` as a consumer would.
#![no_main]
use libfuzzer_sys::fuzz_target;
use swimlane_bus::wire::{
    decode_log_record, decode_outbox_entry, encode_log_record, encode_outbox_entry,
};
use swimlane_core::Event;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    if selector & 1 == 0 {
        if let Ok((key, payload)) = decode_log_record(bytes) {
            assert_eq!(encode_log_record(&key, &payload), bytes);
            let _ = Event::decode(&payload);
        }
    } else if let Ok(e) = decode_outbox_entry(bytes) {
        assert_eq!(encode_outbox_entry(&e.topic, &e.key, &e.payload), bytes);
        let _ = Event::decode(&e.payload);
    }
});

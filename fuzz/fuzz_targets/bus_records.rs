//! What the bus keeps in the store: embedded-log records
//! (`swimlane_bus::wire::decode_log_record`) and Kafka-bus outbox entries
//! (`decode_outbox_entry`). The first byte picks the format.
//!
//! Checks: never a panic; what decodes encodes back to exactly its bytes; a payload
//! that decodes goes on to `Event::decode` as a consumer would.
#![no_main]
include!("../checks/bus_records.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));

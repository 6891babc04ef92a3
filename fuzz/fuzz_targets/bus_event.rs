//! Bus events as every consumer decodes them (`swimlane_core::Event::decode`).
//!
//! Checks: never a panic; a decoded event has a valid user id and encodes to bytes
//! that decode to the same event.
#![no_main]
include!("../checks/bus_event.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));

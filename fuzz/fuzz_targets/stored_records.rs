//! The JSON records kept in the store, through the decoders the stages use: the batch
//! record (`BatchRecord::decode`) and `swimlane_state::decode_record` for run records,
//! model versions, user states and token records. The first byte picks the record.
//!
//! Checks: never a panic; what decodes has the current schema version and encodes
//! again.
#![no_main]
include!("../checks/stored_records.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));

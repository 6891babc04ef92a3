//! The JSON records kept in the store, through the decoders the stages use: the batch
//! record (`BatchRecord::decode`) and `swimlane_state::decode_record` for run records,
//! model versions, user states and token records. The first byte picks the record.
//!
//! Checks: never a panic; what decodes has the current schema version and encodes
//! again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use swimlane_core::records::{BatchRecord, ModelVersionRecord, RunRecord, UserState};
use swimlane_state::tokens::TokenRecord;
use swimlane_state::{decode_record, StoredRecord};

fn check<T: StoredRecord + serde::Serialize>(bytes: &[u8]) {
    if let Ok(r) = decode_record::<T>(bytes) {
        assert_eq!(r.schema_version(), T::VERSION);
        let again = serde_json::to_vec(&r).expect("a record serialises");
        assert!(!again.is_empty());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    match selector % 5 {
        0 => {
            if let Ok(r) = BatchRecord::decode(bytes) {
                assert_eq!(r.v, 1);
                assert_eq!(BatchRecord::decode(&r.encode()).expect("re-decodes"), r);
            }
        }
        1 => check::<RunRecord>(bytes),
        2 => check::<ModelVersionRecord>(bytes),
        3 => check::<UserState>(bytes),
        _ => check::<TokenRecord>(bytes),
    }
});

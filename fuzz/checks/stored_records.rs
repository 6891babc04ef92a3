// The checks of the fuzz target `stored_records` (fuzz/fuzz_targets/stored_records.rs says what it
// feeds and what it checks). Included by that target and by the corpus replay in
// the workspace's tests (cli/tests/fuzz_corpus.rs): plain comments, no inner
// attributes, so `include!` takes it anywhere.
use swimlane_core::records::{BatchRecord, ModelVersionRecord, RunRecord, UserState};
use swimlane_state::tokens::TokenRecord;
use swimlane_state::{decode_record, StoredRecord};

fn check_record<T: StoredRecord + serde::Serialize>(bytes: &[u8]) {
    if let Ok(r) = decode_record::<T>(bytes) {
        assert_eq!(r.schema_version(), T::VERSION);
        let again = serde_json::to_vec(&r).expect("a record serialises");
        assert!(!again.is_empty());
    }
}

pub fn check(data: &[u8]) {
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
        1 => check_record::<RunRecord>(bytes),
        2 => check_record::<ModelVersionRecord>(bytes),
        3 => check_record::<UserState>(bytes),
        _ => check_record::<TokenRecord>(bytes),
    }
}

// The checks of the fuzz target `bus_records` (fuzz/fuzz_targets/bus_records.rs says what it
// feeds and what it checks). Included by that target and by the corpus replay in
// the workspace's tests (cli/tests/fuzz_corpus.rs): plain comments, no inner
// attributes, so `include!` takes it anywhere.
use swimlane_bus::wire::{
    decode_log_record, decode_outbox_entry, encode_log_record, encode_outbox_entry,
};
use swimlane_core::Event;

pub fn check(data: &[u8]) {
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
}

// The checks of the fuzz target `bus_event` (fuzz/fuzz_targets/bus_event.rs says what it
// feeds and what it checks). Included by that target and by the corpus replay in
// the workspace's tests (cli/tests/fuzz_corpus.rs): plain comments, no inner
// attributes, so `include!` takes it anywhere.
use swimlane_core::{Event, UserId};

pub fn check(data: &[u8]) {
    if let Ok(e) = Event::decode(data) {
        assert!(UserId::new(e.user().as_str()).is_ok());
        assert!(!e.topic().is_empty());
        assert_eq!(Event::decode(&e.encode()).expect("re-decodes"), e);
    }
}

// The checks of the fuzz target `auth_header` (fuzz/fuzz_targets/auth_header.rs says what it
// feeds and what it checks). Included by that target and by the corpus replay in
// the workspace's tests (cli/tests/fuzz_corpus.rs): plain comments, no inner
// attributes, so `include!` takes it anywhere.
use swimlane_state::tokens::{bearer_token, hash_token, is_admin_hash, MAX_TOKEN_LEN};

pub fn check(data: &[u8]) {
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(t) = bearer_token(header) {
        assert!(!t.is_empty() && t.len() <= MAX_TOKEN_LEN);
        assert!(header.contains(t));
        assert!(!t.contains(' '));
        let h = hash_token(t);
        assert!(is_admin_hash(&h, &h.to_ascii_uppercase()));
        assert!(!is_admin_hash(&h, ""));
    }
}

//! `Authorization` header values as ingest and the publisher parse them
//! (`swimlane_state::tokens::bearer_token`, then hashing and the admin match).
//!
//! Checks: never a panic; an accepted token is a non-empty token68 of at most
//! `MAX_TOKEN_LEN` bytes that appears in the header.
#![no_main]
use libfuzzer_sys::fuzz_target;
use swimlane_state::tokens::{bearer_token, hash_token, is_admin_hash, MAX_TOKEN_LEN};

fuzz_target!(|data: &[u8]| {
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
});

//! Bearer tokens. A token is `swl_` followed by 64 hex digits (32 random bytes). Only
//! its SHA-256 is stored, under `Keys::token(sha256_hex)`, as
//! `{"v":1,"user":"...","created_at_ms":...,"revoked":false}`; requests are matched by
//! hashing the presented token, so the token itself is never stored, logged or
//! compared. The admin token is configured the same way, as `admin_token_sha256`.
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use swimlane_core::keys::Keys;
use swimlane_core::UserId;
use swimlane_store::{Db, KvError, Transaction};

/// Every token starts with this.
pub const TOKEN_PREFIX: &str = "swl_";

/// The stored record of a token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub v: u32,
    pub user: UserId,
    pub created_at_ms: u64,
    pub revoked: bool,
}

/// SHA-256 (lowercase hex) of a token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh random token (not stored). For the admin token: configure only its
/// [`hash_token`].
pub fn generate_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// Equality that takes the same time wherever the inputs differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Create a token for `user` and store its hash; returns the token (shown once).
pub fn create_token(db: &Db, keys: &Keys, user: &UserId, now_ms: u64) -> Result<String, KvError> {
    let token = generate_token();
    let record = TokenRecord {
        v: 1,
        user: user.clone(),
        created_at_ms: now_ms,
        revoked: false,
    };
    let key = keys.token(&hash_token(&token));
    let value = serde_json::to_vec(&record).expect("token records serialize");
    db.transact(|tx| tx.set(&key, &value))?;
    Ok(token)
}

/// Revoke a token; `Ok(false)` if no such token is stored.
pub fn revoke_token(db: &Db, keys: &Keys, token: &str) -> Result<bool, KvError> {
    revoke_token_hash(db, keys, &hash_token(token))
}

/// Revoke the token whose SHA-256 is `hash_hex`; `Ok(false)` if none is stored.
pub fn revoke_token_hash(db: &Db, keys: &Keys, hash_hex: &str) -> Result<bool, KvError> {
    let key = keys.token(hash_hex);
    db.transact(|tx| {
        let Some(mut record) = lookup(tx, &key)? else {
            return Ok(false);
        };
        record.revoked = true;
        tx.set(
            &key,
            &serde_json::to_vec(&record).expect("token records serialize"),
        )?;
        Ok(true)
    })
}

/// The record of the token whose hash is `hash_hex`, if stored.
pub fn lookup_token(
    tx: &mut Transaction<'_>,
    keys: &Keys,
    hash_hex: &str,
) -> Result<Option<TokenRecord>, KvError> {
    lookup(tx, &keys.token(hash_hex))
}

fn lookup(tx: &mut Transaction<'_>, key: &[u8]) -> Result<Option<TokenRecord>, KvError> {
    let Some(bytes) = tx.get(key)? else {
        return Ok(None);
    };
    let record: TokenRecord = serde_json::from_slice(&bytes).map_err(|e| KvError::Corrupt {
        what: "token record".into(),
        reason: e.to_string(),
    })?;
    if record.v != 1 {
        return Err(KvError::Corrupt {
            what: "token record".into(),
            reason: format!("unsupported schema version {}", record.v),
        });
    }
    Ok(Some(record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_and_hashed() {
        let a = generate_token();
        let b = generate_token();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == 4 + 64);
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), hash_token(&b));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn create_lookup_revoke() {
        let db = Db::new(swimlane_store::embedded::EmbeddedBackend::open_temp().unwrap());
        let keys = Keys::new("t");
        let u = UserId::new("u1").unwrap();
        let t = create_token(&db, &keys, &u, 42).unwrap();
        let h = hash_token(&t);
        let r = db
            .transact(|tx| lookup_token(tx, &keys, &h))
            .unwrap()
            .unwrap();
        assert_eq!(r.user, u);
        assert_eq!(r.created_at_ms, 42);
        assert!(!r.revoked);
        // Only the hash is stored: the token's bytes appear nowhere in the store.
        let all = db
            .transact(|tx| tx.get_range(&swimlane_store::RangeOption::prefix(keys.root())))
            .unwrap();
        for (k, v) in &all {
            let hay = [k.as_slice(), v.as_slice()].concat();
            assert!(!hay.windows(t.len()).any(|w| w == t.as_bytes()));
        }
        assert!(revoke_token(&db, &keys, &t).unwrap());
        let r = db
            .transact(|tx| lookup_token(tx, &keys, &h))
            .unwrap()
            .unwrap();
        assert!(r.revoked);
        assert!(!revoke_token(&db, &keys, "swl_nope").unwrap());
    }
}

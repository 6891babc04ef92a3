//! Bearer tokens: devices hold a per-user token, operators an admin token.
//!
//! Guarantees: only the SHA-256 of a token is stored (`("token", sha256_hex)` →
//! record) or configured (the admin token's hash); tokens are compared by hash, never
//! logged, and never appear in an error message.
use serde::{Deserialize, Serialize};
use swimlane_core::UserId;
use swimlane_store::{KvError, Transaction};

use crate::{sha256_hex, Repo};

/// Prefix of every user token (helps secret scanners recognise leaked tokens).
pub const TOKEN_PREFIX: &str = "swl_";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct TokenRecord {
    v: u32,
    user: String,
    created_at_ms: u64,
    revoked: bool,
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    User(UserId),
    Admin,
}

/// Why a request is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token, a malformed header, an unknown or revoked token: HTTP 401.
    #[error("missing or invalid bearer token")]
    Unauthenticated,
    /// A valid token for another user (or a user token on an admin route): HTTP 403.
    #[error("this token may not access this resource")]
    Forbidden,
}

/// A new random token (32 bytes from the OS RNG, hex, prefixed).
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

impl Repo {
    /// Store the hash of `token` as belonging to `user`.
    pub fn put_token(
        &self,
        tx: &mut Transaction<'_>,
        user: &UserId,
        token: &str,
        now_ms: u64,
    ) -> Result<(), KvError> {
        let r = TokenRecord {
            v: 1,
            user: user.to_string(),
            created_at_ms: now_ms,
            revoked: false,
        };
        tx.set(
            &self.keys.token(&sha256_hex(token.as_bytes())),
            &serde_json::to_vec(&r).expect("serializes"),
        )
    }

    /// Revoke `token`; returns whether it existed.
    pub fn revoke_token(&self, tx: &mut Transaction<'_>, token: &str) -> Result<bool, KvError> {
        let key = self.keys.token(&sha256_hex(token.as_bytes()));
        let Some(b) = tx.get(&key)? else {
            return Ok(false);
        };
        let mut r: TokenRecord = serde_json::from_slice(&b).map_err(|e| KvError::Corrupt {
            what: "token record".into(),
            reason: e.to_string(),
        })?;
        r.revoked = true;
        tx.set(&key, &serde_json::to_vec(&r).expect("serializes"))?;
        Ok(true)
    }

    /// Identify the caller from an `Authorization` header value. `admin_sha256` is the
    /// configured admin token hash (empty: no admin token).
    pub fn authenticate(
        &self,
        tx: &mut Transaction<'_>,
        authorization: Option<&str>,
        admin_sha256: &str,
    ) -> Result<Result<Caller, AuthError>, KvError> {
        let Some(token) = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
        else {
            return Ok(Err(AuthError::Unauthenticated));
        };
        if token.is_empty() || token.len() > 256 {
            return Ok(Err(AuthError::Unauthenticated));
        }
        let hash = sha256_hex(token.as_bytes());
        if !admin_sha256.is_empty() && constant_time_eq(hash.as_bytes(), admin_sha256.as_bytes()) {
            return Ok(Ok(Caller::Admin));
        }
        let Some(b) = tx.get(&self.keys.token(&hash))? else {
            return Ok(Err(AuthError::Unauthenticated));
        };
        let r: TokenRecord = match serde_json::from_slice(&b) {
            Ok(r) => r,
            Err(_) => return Ok(Err(AuthError::Unauthenticated)),
        };
        if r.revoked {
            return Ok(Err(AuthError::Unauthenticated));
        }
        Ok(UserId::new(r.user)
            .map(Caller::User)
            .map_err(|_| AuthError::Unauthenticated))
    }
}

impl Caller {
    /// May this caller touch `user`'s data?
    pub fn may_access(&self, user: &UserId) -> Result<(), AuthError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::User(u) if u == user => Ok(()),
            Caller::User(_) => Err(AuthError::Forbidden),
        }
    }
    /// Is this the admin?
    pub fn require_admin(&self) -> Result<(), AuthError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::User(_) => Err(AuthError::Forbidden),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

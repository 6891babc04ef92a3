//! Bearer tokens: devices hold a per-user token, operators an admin token. The one
//! implementation of token generation, hashing, lookup, revocation and admin matching,
//! used by ingest, the publisher and `swimlane admin token`.
//!
//! A token is [`TOKEN_PREFIX`] followed by 64 hex digits (32 random bytes). Only its
//! SHA-256 (lowercase hex, [`hash_token`]) is stored, under `Keys::token(sha256_hex)`,
//! as `{"v":1,"user":"...","created_at_ms":...,"revoked":false}`; the admin token is
//! configured the same way, as its hash only.
//!
//! Guarantees: a presented token is hashed, then matched by hash (the admin hash in
//! constant time); the token itself is never stored, logged, or put in an error
//! message. Anything but `Authorization: Bearer <token68>` with a token of at most
//! [`MAX_TOKEN_LEN`] bytes is refused before hashing or touching the store.
use serde::{Deserialize, Serialize};
use swimlane_core::UserId;
use swimlane_store::{Db, Transaction};

use crate::{sha256_hex, Repo, Res};

/// Prefix of every user token (helps secret scanners recognise leaked tokens).
pub const TOKEN_PREFIX: &str = "swl_";

/// Longest bearer token accepted, in bytes (ours are 68); longer ones are refused
/// without hashing them.
pub const MAX_TOKEN_LEN: usize = 256;

/// The stored record of a token (keyed by the token's SHA-256).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Schema version: 1.
    pub v: u32,
    pub user: UserId,
    pub created_at_ms: u64,
    pub revoked: bool,
}

impl crate::StoredRecord for TokenRecord {
    const WHAT: &'static str = "token record";
    fn schema_version(&self) -> u32 {
        self.v
    }
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    User(UserId),
    Admin,
}

/// Why a request is refused. The messages never contain the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token, a malformed header, an unknown or revoked token: HTTP 401.
    #[error("missing or invalid bearer token")]
    Unauthenticated,
    /// A valid token for another user (or a user token on an admin route): HTTP 403.
    #[error("this token may not access this resource")]
    Forbidden,
}

/// A new random token (32 bytes from the OS RNG, hex, prefixed). Not stored: see
/// [`Repo::put_token`]; for the admin token, configure only its [`hash_token`].
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// SHA-256 (lowercase hex) of a token: what is stored and configured.
pub fn hash_token(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

/// The token of an `Authorization` header value: `Bearer` (any case), one or more
/// spaces, then a non-empty RFC 6750 `token68` of at most [`MAX_TOKEN_LEN`] bytes.
/// `None` for anything else (another scheme, inner whitespace, odd characters).
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, rest) = authorization.trim_start().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_matches(|c| c == ' ' || c == '\t');
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return None;
    }
    // token68 = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
    let body = token.trim_end_matches('=');
    let ok = !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        });
    ok.then_some(token)
}

/// Is `token_sha256` the configured admin hash? Constant time in the hash's content;
/// hex case is ignored; an empty `admin_sha256` (no admin token) matches nothing.
pub fn is_admin_hash(token_sha256: &str, admin_sha256: &str) -> bool {
    let admin = admin_sha256.trim();
    !admin.is_empty()
        && constant_time_eq_ignore_ascii_case(token_sha256.as_bytes(), admin.as_bytes())
}

/// What the header alone decides, before any store read.
enum Presented {
    Refused,
    Admin,
    /// A well-formed non-admin token, by hash: look it up.
    Lookup(String),
}

fn presented(authorization: Option<&str>, admin_sha256: &str) -> Presented {
    let Some(token) = authorization.and_then(bearer_token) else {
        return Presented::Refused;
    };
    let hash = hash_token(token);
    if is_admin_hash(&hash, admin_sha256) {
        Presented::Admin
    } else {
        Presented::Lookup(hash)
    }
}

impl Presented {
    /// The caller: decided by the header alone, or by `lookup` of the token's hash.
    fn caller(
        self,
        lookup: impl FnOnce(&str) -> Res<Result<Caller, AuthError>>,
    ) -> Res<Result<Caller, AuthError>> {
        match self {
            Presented::Refused => Ok(Err(AuthError::Unauthenticated)),
            Presented::Admin => Ok(Ok(Caller::Admin)),
            Presented::Lookup(hash) => lookup(&hash),
        }
    }
}

impl Repo {
    /// Store the hash of `token` as a live token of `user`.
    pub fn put_token(
        &self,
        tx: &mut Transaction<'_>,
        user: &UserId,
        token: &str,
        now_ms: u64,
    ) -> Res<()> {
        let r = TokenRecord {
            v: 1,
            user: user.clone(),
            created_at_ms: now_ms,
            revoked: false,
        };
        self.put_token_record(tx, &hash_token(token), &r)
    }

    fn put_token_record(
        &self,
        tx: &mut Transaction<'_>,
        token_sha256: &str,
        r: &TokenRecord,
    ) -> Res<()> {
        tx.set(
            &self.keys.token(token_sha256),
            &serde_json::to_vec(r).expect("token records serialize"),
        )
    }

    /// The record of the token whose SHA-256 is `token_sha256`, if stored (revoked or
    /// not). An unreadable record or an unknown schema version is [`KvError::Corrupt`].
    pub fn token_record(
        &self,
        tx: &mut Transaction<'_>,
        token_sha256: &str,
    ) -> Res<Option<TokenRecord>> {
        let Some(b) = tx.get(&self.keys.token(token_sha256))? else {
            return Ok(None);
        };
        crate::decode_record(&b).map(Some)
    }

    /// Revoke `token`; returns whether it existed.
    pub fn revoke_token(&self, tx: &mut Transaction<'_>, token: &str) -> Res<bool> {
        self.revoke_token_sha256(tx, &hash_token(token))
    }

    /// Revoke the token whose SHA-256 is `token_sha256` (for an operator who only has
    /// the hash); returns whether it existed.
    pub fn revoke_token_sha256(&self, tx: &mut Transaction<'_>, token_sha256: &str) -> Res<bool> {
        let Some(mut r) = self.token_record(tx, token_sha256)? else {
            return Ok(false);
        };
        r.revoked = true;
        self.put_token_record(tx, token_sha256, &r)?;
        Ok(true)
    }

    fn caller_of(
        &self,
        tx: &mut Transaction<'_>,
        token_sha256: &str,
    ) -> Res<Result<Caller, AuthError>> {
        Ok(match self.token_record(tx, token_sha256)? {
            Some(r) if !r.revoked => Ok(Caller::User(r.user)),
            _ => Err(AuthError::Unauthenticated),
        })
    }

    /// Identify the caller from an `Authorization` header value (see
    /// [`bearer_token`]). `admin_sha256` is the configured admin token hash (empty: no
    /// admin token). Missing, malformed, unknown and revoked tokens are
    /// [`AuthError::Unauthenticated`]; only a store failure is an `Err`.
    pub fn authenticate(
        &self,
        tx: &mut Transaction<'_>,
        authorization: Option<&str>,
        admin_sha256: &str,
    ) -> Res<Result<Caller, AuthError>> {
        let lookup = |hash: &str| self.caller_of(tx, hash);
        presented(authorization, admin_sha256).caller(lookup)
    }

    /// [`Repo::authenticate`] in a read transaction of its own, opened only when a
    /// user token has to be looked up: refusing a malformed header and recognising the
    /// admin token need no store.
    pub fn authenticate_db(
        &self,
        db: &Db,
        authorization: Option<&str>,
        admin_sha256: &str,
    ) -> Res<Result<Caller, AuthError>> {
        let lookup = |hash: &str| db.transact(|tx| self.caller_of(tx, hash));
        presented(authorization, admin_sha256).caller(lookup)
    }
}

impl Caller {
    /// May this caller touch `user`'s data? The admin may touch anyone's.
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

/// Equality (ignoring ASCII case) that takes the same time wherever the inputs differ.
fn constant_time_eq_ignore_ascii_case(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).fold(0u8, |acc, (x, y)| {
            acc | (x.to_ascii_lowercase() ^ y.to_ascii_lowercase())
        }) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use swimlane_core::keys::Keys;
    use swimlane_store::embedded::EmbeddedBackend;
    use swimlane_store::{KvError, RangeOption};

    struct T {
        db: Db,
        repo: Repo,
        alice: String,
        bob: String,
        admin: String,
        admin_sha256: String,
    }

    fn uid(s: &str) -> UserId {
        UserId::new(s).unwrap()
    }

    fn setup() -> T {
        let db = Db::new(EmbeddedBackend::open_temp().unwrap());
        let repo = Repo::new(Keys::new("test"));
        let (alice, bob, admin) = (new_token(), new_token(), new_token());
        db.transact(|tx| {
            repo.put_token(tx, &uid("alice"), &alice, 42)?;
            repo.put_token(tx, &uid("bob"), &bob, 43)
        })
        .unwrap();
        let admin_sha256 = hash_token(&admin);
        T {
            db,
            repo,
            alice,
            bob,
            admin,
            admin_sha256,
        }
    }

    impl T {
        /// Authenticate `header` both ways; they must agree.
        fn auth(&self, header: Option<&str>) -> Result<Caller, AuthError> {
            let in_tx = self
                .db
                .transact(|tx| self.repo.authenticate(tx, header, &self.admin_sha256))
                .unwrap();
            let own = self
                .repo
                .authenticate_db(&self.db, header, &self.admin_sha256)
                .unwrap();
            assert_eq!(in_tx, own, "authenticate and authenticate_db disagree");
            in_tx
        }
        fn bearer(&self, token: &str) -> Result<Caller, AuthError> {
            self.auth(Some(&format!("Bearer {token}")))
        }
    }

    #[test]
    fn tokens_are_random_prefixed_and_hashed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        assert!(a[TOKEN_PREFIX.len()..]
            .bytes()
            .all(|c| c.is_ascii_hexdigit()));
        assert_eq!(hash_token(&a), sha256_hex(a.as_bytes()));
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), hash_token(&b));
        assert_eq!(bearer_token(&format!("Bearer {a}")), Some(a.as_str()));
    }

    #[test]
    fn a_created_token_authenticates_as_its_user() {
        let t = setup();
        let caller = t.bearer(&t.alice).unwrap();
        assert_eq!(caller, Caller::User(uid("alice")));
        assert_eq!(caller.may_access(&uid("alice")), Ok(()));
        assert_eq!(t.bearer(&t.bob), Ok(Caller::User(uid("bob"))));
        let r =
            t.db.transact(|tx| t.repo.token_record(tx, &hash_token(&t.alice)))
                .unwrap()
                .unwrap();
        assert_eq!(
            r,
            TokenRecord {
                v: 1,
                user: uid("alice"),
                created_at_ms: 42,
                revoked: false
            }
        );
    }

    #[test]
    fn another_users_path_is_forbidden() {
        let t = setup();
        let caller = t.bearer(&t.alice).unwrap();
        assert_eq!(caller.may_access(&uid("bob")), Err(AuthError::Forbidden));
        assert_eq!(caller.may_access(&uid("carol")), Err(AuthError::Forbidden));
    }

    #[test]
    fn a_revoked_token_is_unauthenticated() {
        let t = setup();
        assert!(t
            .db
            .transact(|tx| t.repo.revoke_token(tx, &t.alice))
            .unwrap());
        assert_eq!(t.bearer(&t.alice), Err(AuthError::Unauthenticated));
        // Bob's token is untouched; revoking again still finds the record.
        assert_eq!(t.bearer(&t.bob), Ok(Caller::User(uid("bob"))));
        assert!(t
            .db
            .transact(|tx| t.repo.revoke_token(tx, &t.alice))
            .unwrap());
        let r =
            t.db.transact(|tx| t.repo.token_record(tx, &hash_token(&t.alice)))
                .unwrap()
                .unwrap();
        assert!(r.revoked);
        // Revoking by hash works too; unknown tokens are reported as such.
        assert!(t
            .db
            .transact(|tx| t.repo.revoke_token_sha256(tx, &hash_token(&t.bob)))
            .unwrap());
        assert_eq!(t.bearer(&t.bob), Err(AuthError::Unauthenticated));
        assert!(!t
            .db
            .transact(|tx| t.repo.revoke_token(tx, &new_token()))
            .unwrap());
    }

    #[test]
    fn malformed_empty_unknown_and_oversized_tokens_are_unauthenticated() {
        let t = setup();
        let a = &t.alice;
        let long = format!("{a}{}", "0".repeat(MAX_TOKEN_LEN));
        let cases = [
            None,
            Some(String::new()),
            Some("Bearer".into()),
            Some("Bearer ".into()),
            Some("Bearer    ".into()),
            Some(a.clone()),
            Some(format!("Basic {a}")),
            Some(format!("Bearer{a}")),
            Some(format!("Token {a}")),
            Some(format!("Bearer {a} extra")),
            Some(format!("Bearer {a},{a}")),
            Some(format!("Bearer \"{a}\"")),
            Some("Bearer ====".into()),
            Some(format!("Bearer {long}")),
            Some(format!("Bearer {}", new_token())),
            Some(format!("Bearer {}", &a[..a.len() - 1])),
            Some(format!("Bearer {}", a.to_uppercase())),
        ];
        for h in &cases {
            assert_eq!(
                t.auth(h.as_deref()),
                Err(AuthError::Unauthenticated),
                "{h:?}"
            );
        }
        // An oversized token is refused even when its hash is stored.
        t.db.transact(|tx| t.repo.put_token(tx, &uid("alice"), &long, 1))
            .unwrap();
        assert_eq!(t.bearer(&long), Err(AuthError::Unauthenticated));
        let just_fits = "a".repeat(MAX_TOKEN_LEN);
        t.db.transact(|tx| t.repo.put_token(tx, &uid("alice"), &just_fits, 1))
            .unwrap();
        assert_eq!(t.bearer(&just_fits), Ok(Caller::User(uid("alice"))));
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_spaces_around_the_token_are_ignored() {
        let t = setup();
        let a = &t.alice;
        for h in [
            format!("bearer {a}"),
            format!("BEARER {a}"),
            format!("Bearer   {a}"),
            format!("Bearer {a}  "),
            format!("  Bearer {a}"),
        ] {
            assert_eq!(t.auth(Some(&h)), Ok(Caller::User(uid("alice"))), "{h:?}");
        }
        assert_eq!(bearer_token("Bearer abc+/=="), Some("abc+/=="));
        assert_eq!(bearer_token("Bearer a=b"), None);
    }

    #[test]
    fn the_admin_token_may_access_anyone_and_admin_routes() {
        let t = setup();
        let caller = t.bearer(&t.admin).unwrap();
        assert_eq!(caller, Caller::Admin);
        for u in ["alice", "bob", "someone-never-seen"] {
            assert_eq!(caller.may_access(&uid(u)), Ok(()));
        }
        assert_eq!(caller.require_admin(), Ok(()));
        // The configured hash may be written in either hex case.
        let upper = t.admin_sha256.to_uppercase();
        let db_caller = t
            .repo
            .authenticate_db(&t.db, Some(&format!("Bearer {}", t.admin)), &upper)
            .unwrap();
        assert_eq!(db_caller, Ok(Caller::Admin));
        // Without an admin hash configured, the admin token is just unknown.
        for admin_sha256 in ["", "   "] {
            let r =
                t.db.transact(|tx| {
                    t.repo
                        .authenticate(tx, Some(&format!("Bearer {}", t.admin)), admin_sha256)
                })
                .unwrap();
            assert_eq!(r, Err(AuthError::Unauthenticated));
        }
        // The hash itself is not a token.
        assert_eq!(t.bearer(&t.admin_sha256), Err(AuthError::Unauthenticated));
    }

    #[test]
    fn a_user_token_on_an_admin_only_route_is_forbidden() {
        let t = setup();
        let caller = t.bearer(&t.alice).unwrap();
        assert_eq!(caller.require_admin(), Err(AuthError::Forbidden));
    }

    #[test]
    fn only_the_hash_is_stored() {
        let t = setup();
        let all =
            t.db.transact(|tx| tx.get_range(&RangeOption::prefix(t.repo.keys.root())))
                .unwrap();
        assert_eq!(all.len(), 2);
        for tok in [&t.alice, &t.bob] {
            for (k, v) in &all {
                let hay = [k.as_slice(), v.as_slice()].concat();
                assert!(!hay.windows(tok.len()).any(|w| w == tok.as_bytes()));
            }
        }
        // The stored JSON is the documented record.
        let (_, v) = &all[0];
        let j: serde_json::Value = serde_json::from_slice(v).unwrap();
        assert_eq!(j["v"], 1);
        assert!(j["user"] == "alice" || j["user"] == "bob");
        assert_eq!(j["revoked"], false);
    }

    #[test]
    fn corrupt_records_are_store_errors_not_callers() {
        let t = setup();
        for bad in [
            &b"not json"[..],
            br#"{"v":2,"user":"alice","created_at_ms":1,"revoked":false}"#,
            br#"{"v":1,"user":"../x","created_at_ms":1,"revoked":false}"#,
        ] {
            let token = new_token();
            let key = t.repo.keys.token(&hash_token(&token));
            t.db.transact(|tx| tx.set(&key, bad)).unwrap();
            let header = format!("Bearer {token}");
            let r =
                t.db.transact(|tx| t.repo.authenticate(tx, Some(&header), &t.admin_sha256));
            assert!(matches!(r, Err(KvError::Corrupt { .. })), "{r:?}");
            let r = t.db.transact(|tx| t.repo.revoke_token(tx, &token));
            assert!(matches!(r, Err(KvError::Corrupt { .. })), "{r:?}");
        }
    }

    #[test]
    fn errors_never_carry_the_token() {
        for e in [AuthError::Unauthenticated, AuthError::Forbidden] {
            let s = format!("{e} {e:?}");
            assert!(!s.contains(TOKEN_PREFIX));
        }
        assert!(constant_time_eq_ignore_ascii_case(b"abc", b"ABC"));
        assert!(!constant_time_eq_ignore_ascii_case(b"abc", b"abd"));
        assert!(!constant_time_eq_ignore_ascii_case(b"abc", b"ab"));
    }
}

//! Validated identifiers. A value of these types is always safe to put in a key, a
//! URL path, a log line and a metric-free label.
use serde::{Deserialize, Serialize};

/// Longest user or batch id, in bytes.
pub const MAX_ID_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} id is empty")]
    Empty { kind: &'static str },
    #[error("{kind} id is longer than {max} bytes")]
    TooLong { kind: &'static str, max: usize },
    #[error("{kind} id may only contain ASCII letters, digits, '-', '_' and '.'")]
    BadChar { kind: &'static str },
}

fn check(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            kind,
            max: MAX_ID_LEN,
        });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(IdError::BadChar { kind });
    }
    Ok(())
}

macro_rules! id_type {
    ($name:ident, $kind:literal) => {
        #[doc = concat!("A validated ", $kind, " id: 1 to 128 bytes of `[A-Za-z0-9._-]`.")]
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validate and wrap `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check($kind, &s)?;
                Ok($name(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                $name::new(s)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                $name::new(s)
            }
        }
    };
}

id_type!(UserId, "user");
id_type!(BatchId, "batch");

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn ids_reject_empty_long_and_odd_characters() {
        assert!(UserId::new("swimmer-01.a_b").is_ok());
        assert_eq!(UserId::new(""), Err(IdError::Empty { kind: "user" }));
        assert!(matches!(
            UserId::new("a".repeat(129)),
            Err(IdError::TooLong { .. })
        ));
        assert!(matches!(BatchId::new("a/b"), Err(IdError::BadChar { .. })));
        assert!(matches!(BatchId::new("é"), Err(IdError::BadChar { .. })));
        let j: Result<UserId, _> = serde_json::from_str("\"../x\"");
        assert!(j.is_err());
    }
}

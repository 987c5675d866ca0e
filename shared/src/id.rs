//! Validated identifiers. Every id that reaches a NATS subject, a KV key or a Redis key goes
//! through one of these parsers first, so subject injection (`.`, `*`, `>`, whitespace) is
//! impossible by construction.

use std::fmt;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id was empty.
    #[error("{kind} is empty")]
    Empty {
        /// Which kind of id.
        kind: &'static str,
    },
    /// The id was longer than allowed.
    #[error("{kind} is longer than {max} characters")]
    TooLong {
        /// Which kind of id.
        kind: &'static str,
        /// The maximum length.
        max: usize,
    },
    /// The id contained a character outside `[A-Za-z0-9_-]`.
    #[error("{kind} may only contain letters, digits, '-' and '_'")]
    BadChar {
        /// Which kind of id.
        kind: &'static str,
    },
}

fn check(kind: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > max {
        return Err(IdError::TooLong { kind, max });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(IdError::BadChar { kind });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Parses and validates an id from untrusted input.
            ///
            /// # Errors
            /// [`IdError`] if the id is empty, too long, or has a character outside `[A-Za-z0-9_-]`.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                check($kind, s, $max)?;
                Ok(Self(s.to_owned()))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

id_type!(
    /// A conversation (session) id. New ones are `uuid4().hex`, as in OpenHands.
    SessionId,
    "conversation id",
    64
);
id_type!(
    /// A user id: who owns a conversation.
    UserId,
    "user id",
    64
);
id_type!(
    /// A worker's id (`OH_WORKER_ID`), recorded as the owner of the sessions it runs.
    WorkerId,
    "worker id",
    64
);

impl SessionId {
    /// A fresh random id in OpenHands' format (32 lowercase hex digits).
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string())
    }
}

impl UserId {
    /// The user of single-user mode (no `OH_AUTH_TOKENS`).
    pub fn local() -> Self {
        Self("local".to_owned())
    }
}

impl WorkerId {
    /// A generated worker id: `w-` and 12 hex digits.
    pub fn generate() -> Self {
        let hex = uuid::Uuid::new_v4().simple().to_string();
        Self(format!("w-{}", &hex[..12]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_tokens_are_refused() {
        for bad in ["a.b", "a*", ">", "a b", "", "é"] {
            assert!(SessionId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            SessionId::parse(&"x".repeat(65)),
            Err(IdError::TooLong {
                kind: "conversation id",
                max: 64
            })
        );
        assert!(SessionId::parse("3396c6f9bc024b81ad9bd57d9b9a6768").is_ok());
        let g = SessionId::generate();
        assert_eq!(g.as_str().len(), 32);
        assert!(SessionId::parse(g.as_str()).is_ok());
        assert!(WorkerId::parse(WorkerId::generate().as_str()).is_ok());
    }
}

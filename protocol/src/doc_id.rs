//! Document ids.
//!
//! Ids are opaque strings such as `myapp/confluence-123`. They travel in URLs, logs and storage
//! keys, so the character set is small and fixed: ASCII letters and digits and `-_.~:@+=/`, at
//! most [`DocId::MAX_LEN`] bytes, with no empty, `.` or `..` path segment.

use std::fmt;

/// A validated document id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocId(String);

/// Why a string is not a valid document id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocIdError {
    #[error("document id is empty")]
    Empty,
    #[error("document id is longer than {} bytes", DocId::MAX_LEN)]
    TooLong,
    #[error("document id contains a character outside [A-Za-z0-9-_.~:@+=/] at byte {0}")]
    BadCharacter(usize),
    #[error("document id has an empty, '.' or '..' path segment")]
    BadSegment,
}

impl DocId {
    /// Longest accepted id, in bytes.
    pub const MAX_LEN: usize = 255;

    /// Validates `id`.
    pub fn parse(id: &str) -> Result<Self, DocIdError> {
        if id.is_empty() {
            return Err(DocIdError::Empty);
        }
        if id.len() > Self::MAX_LEN {
            return Err(DocIdError::TooLong);
        }
        if let Some(pos) = id.bytes().position(|b| !Self::allowed(b)) {
            return Err(DocIdError::BadCharacter(pos));
        }
        if id
            .split('/')
            .any(|segment| segment.is_empty() || segment == "." || segment == "..")
        {
            return Err(DocIdError::BadSegment);
        }
        Ok(Self(id.to_owned()))
    }

    fn allowed(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b"-_.~:@+=/".contains(&b)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for DocId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for DocId {
    type Err = DocIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_synchrony_style_ids() {
        for ok in [
            "a",
            "myapp/confluence-123",
            "app/confluence-1-title",
            "x:y@z+1=2~",
        ] {
            assert_eq!(DocId::parse(ok).map(|d| d.to_string()), Ok(ok.to_owned()));
        }
    }

    #[test]
    fn rejects_bad_ids() {
        let long = "a".repeat(DocId::MAX_LEN + 1);
        let cases: &[(&str, DocIdError)] = &[
            ("", DocIdError::Empty),
            (&long, DocIdError::TooLong),
            ("a b", DocIdError::BadCharacter(1)),
            ("a%2e", DocIdError::BadCharacter(1)),
            ("é", DocIdError::BadCharacter(0)),
            ("a\n", DocIdError::BadCharacter(1)),
            ("/a", DocIdError::BadSegment),
            ("a//b", DocIdError::BadSegment),
            ("a/../b", DocIdError::BadSegment),
            ("a/.", DocIdError::BadSegment),
            ("a/", DocIdError::BadSegment),
        ];
        for (input, want) in cases {
            assert_eq!(DocId::parse(input).as_ref(), Err(want), "input {input:?}");
        }
        assert!(DocId::parse(&"a".repeat(DocId::MAX_LEN)).is_ok());
    }
}

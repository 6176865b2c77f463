//! SPIFFE IDs as the SPIFFE-ID standard defines them.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// IDs up to this length must be supported; longer ones are refused.
pub const MAX_LEN: usize = 2048;
const MAX_TRUST_DOMAIN_LEN: usize = 255;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    /// Empty for the trust domain's own ID, else starts with '/'.
    path: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID {0:?} does not start with spiffe://")]
    Scheme(String),
    #[error("SPIFFE ID {0:?} is longer than 2048 bytes")]
    TooLong(String),
    #[error("SPIFFE ID {0:?} has an empty trust domain")]
    EmptyTrustDomain(String),
    #[error("trust domain {0:?} may only contain lowercase letters, digits, '.', '-' and '_' (no port, userinfo or uppercase)")]
    TrustDomainChars(String),
    #[error("trust domain {0:?} is longer than 255 bytes")]
    TrustDomainTooLong(String),
    #[error("SPIFFE ID {0:?} has an empty path segment")]
    EmptySegment(String),
    #[error("SPIFFE ID {0:?} has a '.' or '..' path segment")]
    DotSegment(String),
    #[error(
        "SPIFFE ID {0:?}: path segments may only contain letters, digits, '.', '-' and '_' (no query or fragment)"
    )]
    PathChars(String),
    #[error("SPIFFE ID {0:?} ends with '/'")]
    TrailingSlash(String),
}

fn valid_td(td: &str) -> bool {
    td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
}

/// Validates a trust domain name (no scheme).
pub fn parse_trust_domain(td: &str) -> Result<String, SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain(td.into()));
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(td.into()));
    }
    if !valid_td(td) {
        return Err(SpiffeIdError::TrustDomainChars(td.into()));
    }
    Ok(td.to_owned())
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.len() > MAX_LEN {
            return Err(SpiffeIdError::TooLong(s.chars().take(64).collect()));
        }
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| SpiffeIdError::Scheme(s.into()))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain(s.into()));
        }
        if td.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(SpiffeIdError::TrustDomainTooLong(td.into()));
        }
        if !valid_td(td) {
            return Err(SpiffeIdError::TrustDomainChars(td.into()));
        }
        if !path.is_empty() {
            if path.ends_with('/') {
                return Err(SpiffeIdError::TrailingSlash(s.into()));
            }
            for seg in path[1..].split('/') {
                if seg.is_empty() {
                    return Err(SpiffeIdError::EmptySegment(s.into()));
                }
                if seg == "." || seg == ".." {
                    return Err(SpiffeIdError::DotSegment(s.into()));
                }
                if !seg.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')) {
                    return Err(SpiffeIdError::PathChars(s.into()));
                }
            }
        }
        Ok(SpiffeId { trust_domain: td.to_owned(), path: path.to_owned() })
    }

    /// `spiffe://<td>/<segments joined by '/'>`, validated.
    pub fn from_parts(trust_domain: &str, segments: &[&str]) -> Result<Self, SpiffeIdError> {
        let mut s = format!("spiffe://{trust_domain}");
        for seg in segments {
            s.push('/');
            s.push_str(seg);
        }
        Self::parse(&s)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// True for the trust domain's own ID (no path); workload SVIDs must not carry one.
    pub fn is_trust_domain_id(&self) -> bool {
        self.path.is_empty()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for ok in
            ["spiffe://example.org", "spiffe://example.org/a/b-c/d_e.f", "spiffe://td_1.x-y/A/9", "spiffe://a/..a/.b"]
        {
            let id = SpiffeId::parse(ok).unwrap();
            assert_eq!(id.to_string(), ok);
        }
        assert!(SpiffeId::parse("spiffe://example.org").unwrap().is_trust_domain_id());
        let long = format!("spiffe://example.org/{}", "a".repeat(MAX_LEN - 21));
        assert_eq!(long.len(), MAX_LEN);
        assert!(SpiffeId::parse(&long).is_ok());
    }

    #[test]
    fn rejects_what_the_standard_forbids() {
        use SpiffeIdError::*;
        let cases = [
            ("http://example.org/a", Scheme("http://example.org/a".into())),
            ("spiffe:///a", EmptyTrustDomain("spiffe:///a".into())),
            ("spiffe://Example.org/a", TrustDomainChars("Example.org".into())),
            ("spiffe://example.org:8080/a", TrustDomainChars("example.org:8080".into())),
            ("spiffe://user@example.org/a", TrustDomainChars("user@example.org".into())),
            ("spiffe://example.org//a", EmptySegment("spiffe://example.org//a".into())),
            ("spiffe://example.org/a/./b", DotSegment("spiffe://example.org/a/./b".into())),
            ("spiffe://example.org/a/../b", DotSegment("spiffe://example.org/a/../b".into())),
            ("spiffe://example.org/a?x=1", PathChars("spiffe://example.org/a?x=1".into())),
            ("spiffe://example.org/a#f", PathChars("spiffe://example.org/a#f".into())),
            ("spiffe://example.org/a b", PathChars("spiffe://example.org/a b".into())),
            ("spiffe://example.org/a/", TrailingSlash("spiffe://example.org/a/".into())),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input), Err(want), "{input}");
        }
        assert!(matches!(SpiffeId::parse("spiffe://example.org/a/"), Err(TrailingSlash(_))));
        assert!(matches!(SpiffeId::parse("spiffe://e.org/a?x"), Err(PathChars(_))));
        let too_long = format!("spiffe://example.org/{}", "a".repeat(MAX_LEN));
        assert!(matches!(SpiffeId::parse(&too_long), Err(TooLong(_))));
        let td = "a".repeat(256);
        assert!(matches!(SpiffeId::parse(&format!("spiffe://{td}/x")), Err(TrustDomainTooLong(_))));
    }

    #[test]
    fn error_messages_name_the_input() {
        let e = SpiffeId::parse("spiffe://example.org/a/../b").unwrap_err().to_string();
        assert!(e.contains("spiffe://example.org/a/../b") && e.contains("'..'"), "{e}");
    }
}

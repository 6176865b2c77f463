//! Selectors: `type:value` facts about a workload or node, spelled as SPIRE users know them
//! where the meaning is the same (`unix:uid:1000`, `unix:sha256:<hex>`, `systemd:id:x.service`).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    /// The namespace: `unix`, `systemd`, `cgroup`, `k8s`, `tpm`, ...
    pub kind: String,
    /// Everything after the first colon, e.g. `uid:1000`.
    pub value: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error("selector {0:?} has no type: expected type:value, e.g. unix:uid:1000")]
    NoType(String),
    #[error("selector {0:?}: type must be lowercase letters, digits, '-' or '_'")]
    BadType(String),
    #[error("selector {0:?} has an empty value")]
    EmptyValue(String),
    #[error("selector {0:?} contains a control character")]
    Control(String),
}

impl Selector {
    pub fn new(kind: &str, value: impl Into<String>) -> Self {
        Selector { kind: kind.to_owned(), value: value.into() }
    }

    /// Parses `type:value`, as written in registration entries and on the command line.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        if s.chars().any(char::is_control) {
            return Err(SelectorError::Control(s.into()));
        }
        let (kind, value) = s.split_once(':').ok_or_else(|| SelectorError::NoType(s.into()))?;
        if kind.is_empty()
            || !kind.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(SelectorError::BadType(s.into()));
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue(s.into()));
        }
        Ok(Selector::new(kind, value))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Selector::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A registration entry's selectors match a workload when every one of them is among the
/// workload's. An entry with no selectors matches nothing.
pub fn is_subset(entry: &[Selector], workload: &[Selector]) -> bool {
    !entry.is_empty() && entry.iter().all(|s| workload.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_spire_style_and_names_errors() {
        assert_eq!(Selector::parse("unix:uid:1000").unwrap(), Selector::new("unix", "uid:1000"));
        assert_eq!(Selector::parse("k8s:pod-uid:a:b").unwrap().value, "pod-uid:a:b");
        assert_eq!(Selector::parse("uid1000"), Err(SelectorError::NoType("uid1000".into())));
        assert_eq!(Selector::parse(":x"), Err(SelectorError::BadType(":x".into())));
        assert_eq!(Selector::parse("Unix:uid:1"), Err(SelectorError::BadType("Unix:uid:1".into())));
        assert_eq!(Selector::parse("unix:"), Err(SelectorError::EmptyValue("unix:".into())));
        assert_eq!(Selector::parse("unix:uid:1\n"), Err(SelectorError::Control("unix:uid:1\n".into())));
    }

    #[test]
    fn subset_matching() {
        let have: Vec<Selector> =
            ["unix:uid:0", "unix:gid:0", "cgroup:path:/a"].iter().map(|s| Selector::parse(s).unwrap()).collect();
        let want: Vec<Selector> =
            ["unix:uid:0", "cgroup:path:/a"].iter().map(|s| Selector::parse(s).unwrap()).collect();
        assert!(is_subset(&want, &have));
        assert!(!is_subset(&have, &want));
        assert!(!is_subset(&[], &have), "an entry with no selectors matches nothing");
    }
}

//! Identity selectors and how an identity is matched against them. compile() and explain()
//! both go through `IdentitySelector::mismatch`, so an explanation can never disagree with
//! what the kernel was told.

use std::collections::BTreeMap;
use std::fmt;

/// The attributes of an identity a selector looks at.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Subject<'a> {
    pub spiffe_id: &'a str,
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub golden: bool,
}

/// All present keys must hold. At least one key is present (checked at parse time).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentitySelector {
    pub spiffe_id: Option<String>,
    /// Matches whole path segments: `spiffe://td/web` covers `spiffe://td/web/x`, not
    /// `spiffe://td/webhook`.
    pub spiffe_id_prefix: Option<String>,
    pub spiffe_id_pattern: Option<SpiffePattern>,
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
}

impl IdentitySelector {
    /// None if `s` matches; otherwise every reason it does not, with `role` ("source",
    /// "destination") naming the side.
    pub(crate) fn mismatch(&self, role: &str, s: Subject<'_>) -> Option<String> {
        let mut why = Vec::new();
        if let Some(id) = &self.spiffe_id {
            if s.spiffe_id != id {
                why.push(format!("{role} {} is not {id}", s.spiffe_id));
            }
        }
        if let Some(prefix) = &self.spiffe_id_prefix {
            if !prefix_matches(prefix, s.spiffe_id) {
                why.push(format!("{role} {} is not under {prefix}", s.spiffe_id));
            }
        }
        if let Some(pattern) = &self.spiffe_id_pattern {
            if !pattern.matches(s.spiffe_id) {
                why.push(format!("{role} {} does not match {pattern}", s.spiffe_id));
            }
        }
        if let Some(ns) = &self.namespace {
            if s.namespace != ns {
                why.push(format!("{role} namespace {:?} is not {ns:?}", s.namespace));
            }
        }
        for (k, v) in &self.labels {
            match s.labels.get(k) {
                None => why.push(format!("{role} has no label {k}={v}")),
                Some(have) if have != v => why.push(format!("{role} has label {k}={have}, not {k}={v}")),
                Some(_) => {}
            }
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

impl fmt::Display for IdentitySelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(id) = &self.spiffe_id {
            parts.push(id.clone());
        }
        if let Some(p) = &self.spiffe_id_prefix {
            parts.push(format!("under {p}"));
        }
        if let Some(p) = &self.spiffe_id_pattern {
            parts.push(format!("matching {p}"));
        }
        if let Some(ns) = &self.namespace {
            parts.push(format!("namespace {ns}"));
        }
        parts.extend(self.labels.iter().map(|(k, v)| format!("{k}={v}")));
        f.write_str(&parts.join(", "))
    }
}

fn prefix_matches(prefix: &str, id: &str) -> bool {
    match id.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

/// A SPIFFE ID glob: `*` matches within one path segment, a `**` segment matches any number
/// of whole segments (none included, so `spiffe://td/**/db` matches `spiffe://td/db`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffePattern(String);

impl SpiffePattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| format!("{s:?} does not start with spiffe://"))?;
        for seg in rest.split('/') {
            if seg.is_empty() {
                return Err(format!("{s:?} has an empty path segment"));
            }
            if seg.contains("**") && seg != "**" {
                return Err(format!("{s:?}: `**` must be a whole path segment"));
            }
            if !seg.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'*')) {
                return Err(format!("{s:?}: path segments may only contain letters, digits, '.', '-', '_' and '*'"));
            }
        }
        Ok(SpiffePattern(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, id: &str) -> bool {
        let (Some(pat), Some(id)) = (self.0.strip_prefix("spiffe://"), id.strip_prefix("spiffe://")) else {
            return false;
        };
        let pat: Vec<&str> = pat.split('/').collect();
        let id: Vec<&str> = id.split('/').collect();
        // reach[j]: the pattern so far can consume exactly the first j segments. Quadratic in
        // segments at worst, never exponential, whatever a policy author (or fuzzer) writes.
        let mut reach = vec![false; id.len() + 1];
        reach[0] = true;
        for p in pat {
            let mut next = vec![false; id.len() + 1];
            if p == "**" {
                let mut any = false;
                for j in 0..=id.len() {
                    any |= reach[j];
                    next[j] = any;
                }
            } else {
                for j in 0..id.len() {
                    next[j + 1] = reach[j] && segment_matches(p.as_bytes(), id[j].as_bytes());
                }
            }
            reach = next;
        }
        reach[id.len()]
    }
}

impl fmt::Display for SpiffePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `*` matches any run of characters; the usual greedy algorithm with one backtrack point,
/// linear-ish and never exponential.
fn segment_matches(pat: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pat.len() && pat[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|b| *b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject<'a>(id: &'a str, ns: &'a str, labels: &'a BTreeMap<String, String>) -> Subject<'a> {
        Subject { spiffe_id: id, namespace: ns, labels, golden: false }
    }

    #[test]
    fn patterns() {
        let cases = [
            ("spiffe://example.org/web/*", "spiffe://example.org/web/a", true),
            ("spiffe://example.org/web/*", "spiffe://example.org/web/a/b", false),
            ("spiffe://example.org/web/*", "spiffe://example.org/web", false),
            ("spiffe://example.org/web/**", "spiffe://example.org/web/a/b", true),
            ("spiffe://example.org/web/**", "spiffe://example.org/web", true),
            ("spiffe://example.org/**/db", "spiffe://example.org/db", true),
            ("spiffe://example.org/**/db", "spiffe://example.org/prod/eu/db", true),
            ("spiffe://example.org/**/db", "spiffe://example.org/prod/db2", false),
            ("spiffe://*/web", "spiffe://other.org/web", true),
            ("spiffe://*.example.org/web", "spiffe://eu.example.org/web", true),
            ("spiffe://example.org/web-*", "spiffe://example.org/web-1", true),
            ("spiffe://example.org/web-*", "spiffe://example.org/web", false),
            ("spiffe://example.org/*-api-*", "spiffe://example.org/a-api-b-api-c", true),
            ("spiffe://example.org/a*b*c", "spiffe://example.org/abxd", false),
            ("spiffe://example.org/web", "spiffe://example.org/web", true),
            ("spiffe://example.org/web", "spiffe://example.org/web/x", false),
            ("spiffe://example.org/**", "http://example.org/x", false),
        ];
        for (p, id, want) in cases {
            assert_eq!(SpiffePattern::parse(p).unwrap().matches(id), want, "{p} vs {id}");
        }
        for (p, msg) in [
            ("example.org/*", "\"example.org/*\" does not start with spiffe://"),
            ("spiffe://example.org//x", "\"spiffe://example.org//x\" has an empty path segment"),
            ("spiffe://example.org/a**", "\"spiffe://example.org/a**\": `**` must be a whole path segment"),
            (
                "spiffe://example.org/a?",
                "\"spiffe://example.org/a?\": path segments may only contain letters, digits, '.', '-', '_' and '*'",
            ),
        ] {
            assert_eq!(SpiffePattern::parse(p), Err(msg.to_string()), "{p}");
        }
    }

    #[test]
    fn long_patterns_stay_fast() {
        let p = SpiffePattern::parse(&format!("spiffe://td/{}x", "**/*a*/".repeat(200))).unwrap();
        let id = format!("spiffe://td/{}", "aaaa/".repeat(400));
        assert!(!p.matches(&id));
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("spiffe://example.org/web/", "spiffe://example.org/web/a"));
        assert!(!prefix_matches("spiffe://example.org/web/", "spiffe://example.org/web"));
        assert!(prefix_matches("spiffe://example.org/web", "spiffe://example.org/web"));
        assert!(prefix_matches("spiffe://example.org/web", "spiffe://example.org/web/a/b"));
        assert!(!prefix_matches("spiffe://example.org/web", "spiffe://example.org/webhook"));
    }

    #[test]
    fn all_keys_must_hold_and_each_failure_is_named() {
        let labels: BTreeMap<String, String> =
            [("app".to_string(), "web".to_string()), ("tier".to_string(), "front".to_string())].into();
        let sel = IdentitySelector {
            spiffe_id_prefix: Some("spiffe://example.org/web".into()),
            namespace: Some("prod".into()),
            labels: [("app".to_string(), "web".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(sel.mismatch("source", subject("spiffe://example.org/web/1", "prod", &labels)), None);
        assert_eq!(
            sel.mismatch("source", subject("spiffe://example.org/api", "default", &BTreeMap::new())).unwrap(),
            "source spiffe://example.org/api is not under spiffe://example.org/web; \
             source namespace \"default\" is not \"prod\"; source has no label app=web"
        );
        let other: BTreeMap<String, String> = [("app".to_string(), "api".to_string())].into();
        assert_eq!(
            sel.mismatch("destination", subject("spiffe://example.org/web", "prod", &other)).unwrap(),
            "destination has label app=api, not app=web"
        );
        let exact = IdentitySelector { spiffe_id: Some("spiffe://example.org/db".into()), ..Default::default() };
        assert_eq!(
            exact.mismatch("destination", subject("spiffe://x/y", "default", &labels)).unwrap(),
            "destination spiffe://x/y is not spiffe://example.org/db"
        );
    }
}

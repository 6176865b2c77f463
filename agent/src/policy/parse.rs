//! From TOML text to a validated `Policy`. Serde refuses unknown keys and wrong types; the
//! checks here refuse what types cannot say. Both kinds of error are placed by span.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use tether_attestors::SpiffeId;
use toml::Spanned;

use super::locate::Locator;
use super::net::{Ipv4Net, PortRange, Protocol};
use super::selector::{IdentitySelector, SpiffePattern};
use super::{Defaults, Peers, Policy, PolicyError, Rule};

/// More would not fit the kernel's tables anyway; the bound keeps rule indices in a u32 and a
/// hostile file from costing more than it is worth.
pub const MAX_RULES: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    defaults: Option<RawDefaults>,
    #[serde(default, rename = "rule")]
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    require_node_attested: Option<bool>,
    require_golden_binary: Option<bool>,
}

// Required keys are Options so that their absence is reported here, with the rule's name and
// line, rather than as serde's bare "missing field".
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Spanned<String>>,
    from: Option<Spanned<RawSelector>>,
    to: Option<Spanned<RawSelector>>,
    ports: Option<Vec<Spanned<RawPort>>>,
    protocol: Option<Spanned<String>>,
    require_node_attested: Option<bool>,
    require_golden_binary: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelector {
    spiffe_id: Option<Spanned<String>>,
    spiffe_id_prefix: Option<Spanned<String>>,
    spiffe_id_pattern: Option<Spanned<String>>,
    namespace: Option<Spanned<String>>,
    labels: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    cidr: Option<Spanned<Vec<Spanned<String>>>>,
}

/// A `ports` entry: `443` or `"8000-8080"`.
enum RawPort {
    Number(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawPort;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a \"lo-hi\" string")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<RawPort, E> {
                Ok(RawPort::Number(n))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<RawPort, E> {
                Ok(RawPort::Number(i64::try_from(n).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawPort, E> {
                Ok(RawPort::Text(s.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

pub(crate) fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
    let locator = Locator::new(text);
    let raw: RawPolicy = toml::from_str(text).map_err(|e| {
        let at = locator.locate(e.span().unwrap_or(0..0));
        let message = e.message().to_owned();
        if locator.is_toml() {
            PolicyError::Invalid { path: path.into(), at, message }
        } else {
            PolicyError::Syntax { path: path.into(), line: at.line, column: at.column, message }
        }
    })?;
    Checker { path, locator }.policy(raw)
}

struct Checker<'a> {
    path: &'a Path,
    locator: Locator<'a>,
}

impl Checker<'_> {
    fn invalid(&self, span: Range<usize>, message: impl Into<String>) -> PolicyError {
        PolicyError::Invalid { path: self.path.into(), at: self.locator.locate(span), message: message.into() }
    }

    /// An absent key has no span of its own: it is placed at its table.
    fn missing(&self, table: Range<usize>, key: &str) -> PolicyError {
        let mut at = self.locator.locate(table);
        at.key = if at.key.is_empty() { key.to_owned() } else { format!("{}.{key}", at.key) };
        PolicyError::Invalid { path: self.path.into(), at, message: "is required".into() }
    }

    fn policy(&self, raw: RawPolicy) -> Result<Policy, PolicyError> {
        let base = Defaults::default();
        let defaults = raw.defaults.map_or(base, |d| Defaults {
            require_node_attested: d.require_node_attested.unwrap_or(base.require_node_attested),
            require_golden_binary: d.require_golden_binary.unwrap_or(base.require_golden_binary),
        });
        if let Some(extra) = raw.rules.get(MAX_RULES) {
            return Err(self.invalid(extra.span(), format!("more than {MAX_RULES} rules")));
        }
        let mut rules: Vec<Rule> = Vec::with_capacity(raw.rules.len());
        let mut seen: HashMap<String, usize> = HashMap::new();
        for raw_rule in raw.rules {
            let span = raw_rule.span();
            let (rule, name_span) = self.rule(raw_rule.into_inner(), span, &defaults)?;
            if let Some(first) = seen.insert(rule.name.clone(), rules.len()) {
                let line = rules.get(first).map_or(0, |r| r.line);
                return Err(
                    self.invalid(name_span, format!("duplicate name; rule[{first}] at line {line} has it already"))
                );
            }
            rules.push(rule);
        }
        Ok(Policy { defaults, rules, source: self.path.into() })
    }

    /// The rule, and where its name is.
    fn rule(&self, raw: RawRule, span: Range<usize>, defaults: &Defaults) -> Result<(Rule, Range<usize>), PolicyError> {
        let name = raw.name.ok_or_else(|| self.missing(span.clone(), "name"))?;
        if name.get_ref().trim().is_empty() {
            return Err(self.invalid(name.span(), "must not be empty"));
        }
        if name.get_ref().chars().any(char::is_control) {
            // Names go into audit lines and explanations, one per line.
            return Err(self.invalid(name.span(), "must not contain control characters"));
        }
        let from = raw.from.ok_or_else(|| self.missing(span.clone(), "from"))?;
        let to = raw.to.ok_or_else(|| self.missing(span.clone(), "to"))?;
        let to_span = to.span();
        let peers = match (self.selector(from)?, self.selector(to)?) {
            (Selector::Identity(from), Selector::Identity(to)) => Peers::Identity { from, to },
            (Selector::Identity(from), Selector::Cidr(to)) => Peers::Egress { from, to },
            (Selector::Cidr(from), Selector::Identity(to)) => Peers::Ingress { from, to },
            (Selector::Cidr(_), Selector::Cidr(_)) => {
                return Err(self.invalid(
                    to_span,
                    "`from` and `to` are both networks: a rule needs an identity on at least one side, \
                     or it protects nothing",
                ));
            }
        };
        let protocol = match &raw.protocol {
            None => Protocol::default(),
            Some(p) => match p.get_ref().as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                "any" => Protocol::Any,
                other => return Err(self.invalid(p.span(), format!("{other:?} is not \"tcp\", \"udp\" or \"any\""))),
            },
        };
        let mut ports = Vec::new();
        for port in raw.ports.unwrap_or_default() {
            let range = match port.get_ref() {
                RawPort::Number(n) => PortRange::single(*n),
                RawPort::Text(s) => PortRange::parse(s),
            };
            ports.push(range.map_err(|m| self.invalid(port.span(), m))?);
        }
        let name_span = name.span();
        let rule = Rule {
            line: self.locator.line_col(name_span.start).0,
            name: name.into_inner(),
            peers,
            protocol,
            ports: PortRange::normalize(ports),
            require_node_attested: raw.require_node_attested.unwrap_or(defaults.require_node_attested),
            require_golden_binary: raw.require_golden_binary.unwrap_or(defaults.require_golden_binary),
        };
        Ok((rule, name_span))
    }

    fn selector(&self, raw: Spanned<RawSelector>) -> Result<Selector, PolicyError> {
        let span = raw.span();
        let raw = raw.into_inner();
        let identity_keys = [&raw.spiffe_id, &raw.spiffe_id_prefix, &raw.spiffe_id_pattern, &raw.namespace];
        let first_identity_key = identity_keys
            .iter()
            .filter_map(|k| k.as_ref().map(|k| k.span()))
            .chain(raw.labels.iter().flat_map(|l| l.keys().map(|k| k.span())))
            .min_by_key(|s| s.start);
        if let Some(cidr) = raw.cidr {
            if let Some(key) = first_identity_key {
                return Err(
                    self.invalid(key, "cannot be combined with `cidr`: a selector names either identities or networks")
                );
            }
            if cidr.get_ref().is_empty() {
                return Err(self.invalid(cidr.span(), "is empty; list at least one network"));
            }
            let mut nets = Vec::new();
            for c in cidr.into_inner() {
                nets.push(Ipv4Net::parse(c.get_ref()).map_err(|m| self.invalid(c.span(), m))?);
            }
            nets.sort();
            nets.dedup();
            return Ok(Selector::Cidr(nets));
        }
        if first_identity_key.is_none() {
            return Err(self.invalid(
                span,
                "selects nothing: give spiffe_id, spiffe_id_prefix, spiffe_id_pattern, namespace, labels or cidr",
            ));
        }
        let mut sel = IdentitySelector::default();
        if let Some(id) = raw.spiffe_id {
            SpiffeId::parse(id.get_ref()).map_err(|e| self.invalid(id.span(), e.to_string()))?;
            sel.spiffe_id = Some(id.into_inner());
        }
        if let Some(prefix) = raw.spiffe_id_prefix {
            // A prefix is a SPIFFE ID, or one with a trailing '/' to say "strictly below".
            let p = prefix.get_ref();
            let bare = p.strip_suffix('/').filter(|b| b.len() > "spiffe://".len()).unwrap_or(p);
            SpiffeId::parse(bare).map_err(|e| self.invalid(prefix.span(), e.to_string()))?;
            sel.spiffe_id_prefix = Some(prefix.into_inner());
        }
        if let Some(pattern) = raw.spiffe_id_pattern {
            sel.spiffe_id_pattern =
                Some(SpiffePattern::parse(pattern.get_ref()).map_err(|m| self.invalid(pattern.span(), m))?);
        }
        if let Some(ns) = raw.namespace {
            if ns.get_ref().is_empty() {
                return Err(self.invalid(ns.span(), "must not be empty"));
            }
            sel.namespace = Some(ns.into_inner());
        }
        for (k, v) in raw.labels.unwrap_or_default() {
            if k.get_ref().is_empty() {
                return Err(self.invalid(k.span(), "label names must not be empty"));
            }
            sel.labels.insert(k.into_inner(), v.into_inner());
        }
        Ok(Selector::Identity(sel))
    }
}

/// A selector once checked: the two kinds never mix.
enum Selector {
    Identity(IdentitySelector),
    Cidr(Vec<Ipv4Net>),
}

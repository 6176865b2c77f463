//! `tether-agent policy explain`: which rule allows a flow, or why none does. Uses the same
//! checks as `compile`, so the answer is what the kernel would do.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use tether_attestors::{SpiffeId, SpiffeIdError};
use thiserror::Error;

use super::compile::{refuse_node, refuse_side, Context};
use super::net::{Ipv4Net, PortRange, Proto};
use super::selector::Subject;
use super::{Peers, Policy};

/// The attributes of a workload identity that rules look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub spiffe_id: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub golden: bool,
}

impl Identity {
    fn subject(&self) -> Subject<'_> {
        Subject { spiffe_id: &self.spiffe_id, namespace: &self.namespace, labels: &self.labels, golden: self.golden }
    }
}

/// One end of a flow to explain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Identity(Identity),
    Addr([u8; 4]),
}

/// A command-line endpoint that is neither a SPIFFE ID nor an IPv4 address.
#[derive(Debug, Error)]
pub enum EndpointError {
    #[error(transparent)]
    SpiffeId(#[from] SpiffeIdError),
    #[error("{0:?} is IPv6; only IPv4 is enforced yet")]
    Ipv6(String),
    #[error("{0:?} is neither a SPIFFE ID nor an IPv4 address")]
    Unrecognized(String),
    #[error("{0:?}: the port must be 1-65535")]
    Port(String),
}

impl Endpoint {
    /// `spiffe://td/path` or `a.b.c.d`, either with an optional `:port`, returned apart. An
    /// identity parsed from its SPIFFE ID alone has namespace "default", no labels and is not
    /// golden; fill those in from the registration entry and the manifest where known.
    pub fn parse(s: &str) -> Result<(Endpoint, Option<u16>), EndpointError> {
        // SPIFFE IDs cannot contain ':' past the scheme, so a ':' after it starts a port.
        let scheme = if s.starts_with("spiffe://") { "spiffe://".len() } else { 0 };
        let rest = &s[scheme..];
        if scheme == 0 && (s.starts_with('[') || s.parse::<Ipv6Addr>().is_ok()) {
            return Err(EndpointError::Ipv6(s.into()));
        }
        let (body, port) = match rest.rsplit_once(':') {
            Some((body, port)) => {
                let port = port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| EndpointError::Port(s.into()))?;
                (&s[..scheme + body.len()], Some(port))
            }
            None => (s, None),
        };
        if body.starts_with("spiffe://") {
            SpiffeId::parse(body)?;
            let identity = Identity {
                spiffe_id: body.to_owned(),
                namespace: "default".into(),
                labels: BTreeMap::new(),
                golden: false,
            };
            return Ok((Endpoint::Identity(identity), port));
        }
        let addr: Ipv4Addr = body.parse().map_err(|_| EndpointError::Unrecognized(s.into()))?;
        Ok((Endpoint::Addr(addr.octets()), port))
    }

    fn kind(&self) -> &'static str {
        match self {
            Endpoint::Identity(_) => "identity",
            Endpoint::Addr(_) => "network",
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Identity(i) => f.write_str(&i.spiffe_id),
            Endpoint::Addr(a) => write!(f, "{}", Ipv4Addr::from(*a)),
        }
    }
}

/// The answer to "may `from` reach `to`?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub allowed: bool,
    /// The first rule (in file order) that allows the flow.
    pub rule: Option<String>,
    /// For each rule that does not allow it: `rule NAME: why not`.
    pub reasons: Vec<String>,
    /// The first line of the readable answer.
    pub summary: String,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.summary)?;
        if !self.allowed {
            for reason in &self.reasons {
                writeln!(f, "  {reason}")?;
            }
        }
        Ok(())
    }
}

/// `port: None` asks whether any port is allowed; the answer then lists the rule's ports.
pub fn explain(
    policy: &Policy,
    from: &Endpoint,
    to: &Endpoint,
    port: Option<u16>,
    proto: Proto,
    ctx: &Context,
) -> Explanation {
    let flow = match port {
        Some(p) => format!("{from} -> {to}:{p} over {proto}"),
        None => format!("{from} -> {to} over {proto}"),
    };
    if let (Endpoint::Addr(_), Endpoint::Addr(_)) = (from, to) {
        return Explanation {
            allowed: true,
            rule: None,
            reasons: Vec::new(),
            summary: format!("not enforced: {flow}: neither end is a protected workload"),
        };
    }
    let mut reasons = Vec::new();
    for rule in &policy.rules {
        let mut why: Vec<String> = Vec::new();
        match (&rule.peers, from, to) {
            (Peers::Identity { from: fs, to: ts }, Endpoint::Identity(a), Endpoint::Identity(b)) => {
                why.extend(refuse_side(rule, fs, "source", a.subject()));
                why.extend(refuse_side(rule, ts, "destination", b.subject()));
            }
            (Peers::Egress { from: fs, to: nets }, Endpoint::Identity(a), Endpoint::Addr(b)) => {
                why.extend(refuse_side(rule, fs, "source", a.subject()));
                why.extend(outside("destination", *b, nets));
            }
            (Peers::Ingress { from: nets, to: ts }, Endpoint::Addr(a), Endpoint::Identity(b)) => {
                why.extend(outside("source", *a, nets));
                why.extend(refuse_side(rule, ts, "destination", b.subject()));
            }
            (peers, _, _) => {
                let kind = match peers {
                    Peers::Identity { .. } => "identity to identity",
                    Peers::Egress { .. } => "identity to network",
                    Peers::Ingress { .. } => "network to identity",
                };
                reasons.push(format!(
                    "rule {}: it is {kind}, this flow is {} to {}",
                    rule.name,
                    from.kind(),
                    to.kind()
                ));
                continue;
            }
        }
        if !rule.protocol.protos().contains(&proto) {
            why.push(format!("protocol {proto} is not allowed (only {})", rule.protocol));
        }
        if let Some(p) = port {
            if !rule.ports.iter().any(|r| r.contains(p)) {
                why.push(format!("port {p} is not in {}", list(&rule.ports)));
            }
        }
        why.extend(refuse_node(rule, ctx));
        if why.is_empty() {
            let at = format!("{}:{}", policy.source.display(), rule.line);
            let summary = match port {
                Some(_) => format!("allowed: {flow}, by rule {:?} ({at})", rule.name),
                None => format!("allowed: {flow}, by rule {:?} ({at}) on {}", rule.name, list(&rule.ports)),
            };
            return Explanation { allowed: true, rule: Some(rule.name.clone()), reasons, summary };
        }
        reasons.push(format!("rule {}: {}", rule.name, why.join("; ")));
    }
    let summary = if policy.rules.is_empty() {
        format!("denied: {flow}: the policy has no rules, and protected workloads are denied by default")
    } else {
        format!("denied: {flow}: no rule allows it, and protected workloads are denied by default")
    };
    Explanation { allowed: false, rule: None, reasons, summary }
}

fn outside(role: &str, addr: [u8; 4], nets: &[Ipv4Net]) -> Option<String> {
    (!nets.iter().any(|n| n.contains(addr))).then(|| {
        let nets: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
        format!("{role} {} is not in {}", Ipv4Addr::from(addr), nets.join(", "))
    })
}

fn list(ports: &[PortRange]) -> String {
    match ports {
        [one] if *one == PortRange::ANY => "any port".into(),
        _ => {
            let ports: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
            format!("ports {}", ports.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::example;
    use super::*;

    const ATTESTED: Context = Context { node_attested: true };

    fn ep(s: &str) -> Endpoint {
        Endpoint::parse(s).unwrap().0
    }

    fn web() -> Endpoint {
        Endpoint::Identity(Identity {
            spiffe_id: "spiffe://example.org/web".into(),
            namespace: "prod".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            golden: true,
        })
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            Endpoint::parse("spiffe://example.org/db:5432").unwrap(),
            (
                Endpoint::Identity(Identity {
                    spiffe_id: "spiffe://example.org/db".into(),
                    namespace: "default".into(),
                    labels: BTreeMap::new(),
                    golden: false
                }),
                Some(5432)
            )
        );
        assert_eq!(Endpoint::parse("spiffe://example.org/db").unwrap().1, None);
        assert_eq!(Endpoint::parse("spiffe://example.org").unwrap().1, None);
        assert_eq!(Endpoint::parse("10.1.2.3:443").unwrap(), (Endpoint::Addr([10, 1, 2, 3]), Some(443)));
        assert_eq!(Endpoint::parse("10.1.2.3").unwrap(), (Endpoint::Addr([10, 1, 2, 3]), None));
        for (s, msg) in [
            ("10.1.2.3:0", "\"10.1.2.3:0\": the port must be 1-65535"),
            ("10.1.2.3:http", "\"10.1.2.3:http\": the port must be 1-65535"),
            ("spiffe://example.org/db:", "\"spiffe://example.org/db:\": the port must be 1-65535"),
            ("fd00::1", "\"fd00::1\" is IPv6; only IPv4 is enforced yet"),
            ("[fd00::1]:80", "\"[fd00::1]:80\" is IPv6; only IPv4 is enforced yet"),
            ("1:2:3", "\"1:2:3\" is neither a SPIFFE ID nor an IPv4 address"),
            ("db.example.org:80", "\"db.example.org:80\" is neither a SPIFFE ID nor an IPv4 address"),
            (
                "spiffe://Example.org/db",
                "trust domain \"Example.org\" may only contain lowercase letters, digits, '.', '-' and '_' \
                 (no port, userinfo or uppercase)",
            ),
        ] {
            assert_eq!(Endpoint::parse(s).unwrap_err().to_string(), msg, "{s}");
        }
    }

    #[test]
    fn allowed_names_the_rule() {
        let p = example();
        let e = explain(
            &p,
            &ep("spiffe://example.org/web"),
            &ep("spiffe://example.org/db:5432"),
            Some(5432),
            Proto::Tcp,
            &ATTESTED,
        );
        assert!(e.allowed);
        assert_eq!(e.rule.as_deref(), Some("web-to-db"));
        assert_eq!(
            e.to_string(),
            "allowed: spiffe://example.org/web -> spiffe://example.org/db:5432 over tcp, \
             by rule \"web-to-db\" (policy.toml:7)\n"
        );
        let e = explain(&p, &web(), &ep("10.9.9.9"), None, Proto::Tcp, &ATTESTED);
        assert_eq!(e.rule.as_deref(), Some("prod-web-egress"));
        assert_eq!(
            e.summary,
            "allowed: spiffe://example.org/web -> 10.9.9.9 over tcp, \
             by rule \"prod-web-egress\" (policy.toml:14) on ports 443, 8000-8080"
        );
        let e = explain(&p, &ep("192.168.3.4"), &ep("spiffe://example.org/web/eu"), Some(8080), Proto::Tcp, &ATTESTED);
        assert_eq!(e.rule.as_deref(), Some("lb-in"));
    }

    #[test]
    fn denied_says_why_for_every_rule() {
        let p = example();
        let e = explain(&p, &ep("spiffe://example.org/api"), &ep("10.1.1.1"), Some(22), Proto::Udp, &ATTESTED);
        assert!(!e.allowed);
        assert_eq!(e.rule, None);
        assert_eq!(
            e.to_string(),
            "denied: spiffe://example.org/api -> 10.1.1.1:22 over udp: \
             no rule allows it, and protected workloads are denied by default\n\
             \x20 rule web-to-db: it is identity to identity, this flow is identity to network\n\
             \x20 rule prod-web-egress: source namespace \"default\" is not \"prod\"; source has no label app=web; \
             source binary is not in the golden manifest (require_golden_binary); \
             protocol udp is not allowed (only tcp); port 22 is not in ports 443, 8000-8080\n\
             \x20 rule lb-in: it is network to identity, this flow is identity to network\n"
        );
        let e = explain(
            &p,
            &ep("spiffe://example.org/web"),
            &ep("spiffe://example.org/cache"),
            Some(5432),
            Proto::Tcp,
            &ATTESTED,
        );
        assert_eq!(
            e.reasons[0],
            "rule web-to-db: destination spiffe://example.org/cache is not spiffe://example.org/db"
        );
        let e = explain(&p, &web(), &ep("172.16.0.1"), Some(443), Proto::Tcp, &ATTESTED);
        assert_eq!(e.reasons[1], "rule prod-web-egress: destination 172.16.0.1 is not in 10.0.0.0/8, 192.168.1.7/32");
    }

    #[test]
    fn unattested_node_is_a_reason() {
        let e = explain(
            &example(),
            &ep("spiffe://example.org/web"),
            &ep("spiffe://example.org/db"),
            Some(5432),
            Proto::Tcp,
            &Context { node_attested: false },
        );
        assert!(!e.allowed);
        assert_eq!(e.reasons[0], "rule web-to-db: the node is not attested (require_node_attested)");
    }

    #[test]
    fn network_to_network_is_not_enforced() {
        let e = explain(&example(), &ep("1.2.3.4"), &ep("5.6.7.8:80"), Some(80), Proto::Tcp, &ATTESTED);
        assert!(e.allowed && e.rule.is_none());
        assert_eq!(e.summary, "not enforced: 1.2.3.4 -> 5.6.7.8:80 over tcp: neither end is a protected workload");
    }

    #[test]
    fn explain_agrees_with_compile() {
        use super::super::compile::{compile, IdentityInfo};
        let p = example();
        let ids: Vec<IdentityInfo> = [
            ("spiffe://example.org/web", "prod", true),
            ("spiffe://example.org/web/eu", "prod", false),
            ("spiffe://example.org/db", "default", true),
        ]
        .iter()
        .zip(1u32..)
        .map(|(&(s, ns, golden), id)| IdentityInfo {
            id,
            spiffe_id: s.into(),
            namespace: ns.into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            golden,
        })
        .collect();
        for attested in [true, false] {
            let ctx = Context { node_attested: attested };
            let c = compile(&p, &ids, &ctx);
            for a in &ids {
                for b in &ids {
                    for port in [5432, 443, 8080] {
                        let said = explain(&p, &ends_of(a), &ends_of(b), Some(port), Proto::Tcp, &ctx).allowed;
                        let rows =
                            c.identity_flows.iter().any(|r| r.src == a.id && r.dst == b.id && r.ports.contains(port));
                        assert_eq!(said, rows, "{} -> {}:{port}", a.spiffe_id, b.spiffe_id);
                    }
                }
                for (addr, port) in [([10, 0, 0, 1], 443), ([192, 168, 1, 7], 8001), ([192, 168, 1, 8], 443)] {
                    let said = explain(&p, &ends_of(a), &Endpoint::Addr(addr), Some(port), Proto::Tcp, &ctx).allowed;
                    let rows =
                        c.egress.iter().any(|r| r.identity == a.id && r.net.contains(addr) && r.ports.contains(port));
                    assert_eq!(said, rows, "{} -> {addr:?}:{port}", a.spiffe_id);
                    let said = explain(&p, &Endpoint::Addr(addr), &ends_of(a), Some(8080), Proto::Tcp, &ctx).allowed;
                    let rows =
                        c.ingress.iter().any(|r| r.identity == a.id && r.net.contains(addr) && r.ports.contains(8080));
                    assert_eq!(said, rows, "{addr:?} -> {}:8080", a.spiffe_id);
                }
            }
        }
    }

    fn ends_of(i: &super::super::compile::IdentityInfo) -> Endpoint {
        Endpoint::Identity(Identity {
            spiffe_id: i.spiffe_id.clone(),
            namespace: i.namespace.clone(),
            labels: i.labels.clone(),
            golden: i.golden,
        })
    }
}

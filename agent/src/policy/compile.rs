//! From a policy and the identities this node serves to the flat rows the loader writes into
//! kernel maps. Requirements (node attested, golden binary) are decided here, so the kernel
//! only ever sees rows that apply now: recompile when attestation or a golden flag changes.

use std::collections::BTreeMap;

use super::net::{Ipv4Net, PortRange, Proto};
use super::selector::{IdentitySelector, Subject};
use super::{Peers, Policy, Rule};

/// What the compiler needs to know about an identity the node serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityInfo {
    /// Nonzero and unique, assigned by the caller; the kernel knows identities by it.
    pub id: u32,
    pub spiffe_id: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// Its binary's sha256 is in the node's golden manifest.
    pub golden: bool,
}

impl IdentityInfo {
    pub(crate) fn subject(&self) -> Subject<'_> {
        Subject { spiffe_id: &self.spiffe_id, namespace: &self.namespace, labels: &self.labels, golden: self.golden }
    }
}

/// Facts about the node at compile time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub node_attested: bool,
}

/// Identity `src` may reach identity `dst` on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityFlow {
    /// Index into `Compiled::rule_names` (and `Policy::rules`).
    pub rule: u32,
    pub src: u32,
    pub dst: u32,
    pub proto: Proto,
    pub ports: PortRange,
}

/// Identity `identity` may reach (egress) or be reached from (ingress) `net`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrFlow {
    pub rule: u32,
    /// The protected end: the source of egress, the destination of ingress.
    pub identity: u32,
    /// The remote end: destinations of egress, sources of ingress.
    pub net: Ipv4Net,
    pub proto: Proto,
    pub ports: PortRange,
}

/// Everything allowed, one row per (rule, identities or network, protocol, port range).
/// Rows are sorted by their fields in declaration order, without duplicates; two rules that
/// allow the same thing give two rows, so that audit can name either.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub identity_flows: Vec<IdentityFlow>,
    pub egress: Vec<CidrFlow>,
    pub ingress: Vec<CidrFlow>,
    /// Rule index -> name; every rule of the policy, applying or not.
    pub rule_names: Vec<String>,
}

/// Why `rule` does not apply on this node at all, if it does not.
pub(crate) fn refuse_node(rule: &Rule, ctx: &Context) -> Option<String> {
    (rule.require_node_attested && !ctx.node_attested)
        .then(|| "the node is not attested (require_node_attested)".to_owned())
}

/// Why `s` cannot be `rule`'s protected end `sel`, if it cannot.
pub(crate) fn refuse_side(rule: &Rule, sel: &IdentitySelector, role: &str, s: Subject<'_>) -> Option<String> {
    let mut why: Vec<String> = sel.mismatch(role, s).into_iter().collect();
    if rule.require_golden_binary && !s.golden {
        why.push(format!("{role} binary is not in the golden manifest (require_golden_binary)"));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

pub fn compile(policy: &Policy, identities: &[IdentityInfo], ctx: &Context) -> Compiled {
    let mut out = Compiled { rule_names: policy.rules.iter().map(|r| r.name.clone()).collect(), ..Compiled::default() };
    // Counting in u32 rather than casting: the index is what the kernel stores.
    for (index, rule) in (0u32..).zip(&policy.rules) {
        if refuse_node(rule, ctx).is_some() {
            continue;
        }
        let eligible = |sel: &IdentitySelector, role: &str| -> Vec<u32> {
            identities.iter().filter(|i| refuse_side(rule, sel, role, i.subject()).is_none()).map(|i| i.id).collect()
        };
        let each = || rule.protocol.protos().iter().flat_map(|p| rule.ports.iter().map(move |r| (*p, *r)));
        match &rule.peers {
            Peers::Identity { from, to } => {
                let dsts = eligible(to, "destination");
                for src in eligible(from, "source") {
                    for &dst in &dsts {
                        out.identity_flows.extend(each().map(|(proto, ports)| IdentityFlow {
                            rule: index,
                            src,
                            dst,
                            proto,
                            ports,
                        }));
                    }
                }
            }
            Peers::Egress { from, to } => {
                for identity in eligible(from, "source") {
                    for &net in to {
                        out.egress.extend(each().map(|(proto, ports)| CidrFlow {
                            rule: index,
                            identity,
                            net,
                            proto,
                            ports,
                        }));
                    }
                }
            }
            Peers::Ingress { from, to } => {
                for identity in eligible(to, "destination") {
                    for &net in from {
                        out.ingress.extend(each().map(|(proto, ports)| CidrFlow {
                            rule: index,
                            identity,
                            net,
                            proto,
                            ports,
                        }));
                    }
                }
            }
        }
    }
    for rows in [&mut out.egress, &mut out.ingress] {
        rows.sort_unstable();
        rows.dedup();
    }
    out.identity_flows.sort_unstable();
    out.identity_flows.dedup();
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::tests::example;
    use super::*;

    fn identity(id: u32, spiffe_id: &str, namespace: &str, labels: &[(&str, &str)], golden: bool) -> IdentityInfo {
        IdentityInfo {
            id,
            spiffe_id: spiffe_id.into(),
            namespace: namespace.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            golden,
        }
    }

    fn node() -> Vec<IdentityInfo> {
        vec![
            identity(1, "spiffe://example.org/web", "prod", &[("app", "web")], true),
            identity(2, "spiffe://example.org/db", "default", &[], true),
            identity(3, "spiffe://example.org/web/eu", "prod", &[("app", "web"), ("zone", "eu")], false),
            identity(4, "spiffe://example.org/api", "prod", &[("app", "api")], true),
        ]
    }

    const ATTESTED: Context = Context { node_attested: true };

    fn net(a: [u8; 4], prefix: u8) -> Ipv4Net {
        Ipv4Net { addr: a, prefix }
    }

    fn ports(lo: u16, hi: u16) -> PortRange {
        PortRange { lo, hi }
    }

    fn egress(identity: u32, net: Ipv4Net, ports: PortRange) -> CidrFlow {
        CidrFlow { rule: 1, identity, net, proto: Proto::Tcp, ports }
    }

    #[test]
    fn the_example_compiles_to_exactly_these_rows() {
        let c = compile(&example(), &node(), &ATTESTED);
        assert_eq!(c.rule_names, ["web-to-db", "prod-web-egress", "lb-in"]);
        assert_eq!(
            c.identity_flows,
            [IdentityFlow { rule: 0, src: 1, dst: 2, proto: Proto::Tcp, ports: ports(5432, 5432) }]
        );
        // Identity 3 is prod/app=web too, but not golden, and this rule requires it.
        let (ten, host) = (net([10, 0, 0, 0], 8), net([192, 168, 1, 7], 32));
        assert_eq!(
            c.egress,
            [
                egress(1, ten, ports(443, 443)),
                egress(1, ten, ports(8000, 8080)),
                egress(1, host, ports(443, 443)),
                egress(1, host, ports(8000, 8080)),
            ]
        );
        // The prefix ends in '/': identity 1 (.../web itself) is not below it.
        assert_eq!(
            c.ingress,
            [CidrFlow {
                rule: 2,
                identity: 3,
                net: net([192, 168, 0, 0], 16),
                proto: Proto::Tcp,
                ports: ports(8080, 8080)
            }]
        );
    }

    #[test]
    fn golden_flag_changes_the_rows() {
        let mut ids = node();
        ids[2].golden = true;
        let c = compile(&example(), &ids, &ATTESTED);
        assert_eq!(c.egress.len(), 8);
        assert_eq!(c.egress.iter().filter(|r| r.identity == 3).count(), 4);
        // Rules that do not require golden ignore the flag.
        ids.iter_mut().for_each(|i| i.golden = false);
        let c = compile(&example(), &ids, &ATTESTED);
        assert_eq!((c.identity_flows.len(), c.egress.len(), c.ingress.len()), (1, 0, 1));
    }

    #[test]
    fn an_unattested_node_gets_nothing_unless_a_rule_opts_out() {
        let c = compile(&example(), &node(), &Context { node_attested: false });
        assert!(c.identity_flows.is_empty() && c.egress.is_empty() && c.ingress.is_empty());
        assert_eq!(c.rule_names.len(), 3, "names stay, so indices keep their meaning");

        let text = "[defaults]\nrequire_node_attested = false\n\n[[rule]]\nname = \"a\"\n\
                    from = { spiffe_id = \"spiffe://example.org/web\" }\nto = { cidr = [\"0.0.0.0/0\"] }\n\
                    [[rule]]\nname = \"b\"\nrequire_node_attested = true\n\
                    from = { spiffe_id = \"spiffe://example.org/web\" }\nto = { cidr = [\"10.0.0.0/8\"] }\n";
        let p = Policy::parse(text, Path::new("p.toml")).unwrap();
        let c = compile(&p, &node(), &Context { node_attested: false });
        assert_eq!(
            c.egress,
            [CidrFlow { rule: 0, identity: 1, net: net([0; 4], 0), proto: Proto::Tcp, ports: PortRange::ANY }]
        );
    }

    #[test]
    fn any_protocol_expands_and_identity_flows_need_both_ends_golden() {
        let text = "[defaults]\nrequire_golden_binary = true\n\n[[rule]]\nname = \"mesh\"\n\
                    from = { namespace = \"prod\" }\nto = { spiffe_id_pattern = \"spiffe://example.org/*\" }\n\
                    ports = [\"53\", 53, \"50-60\", 9000]\nprotocol = \"any\"\n";
        let p = Policy::parse(text, Path::new("p.toml")).unwrap();
        let c = compile(&p, &node(), &ATTESTED);
        // Sources: prod and golden = 1, 4. Destinations: one segment below example.org and
        // golden = 1, 2, 4 (3 is two segments down, and not golden).
        let mut want = Vec::new();
        for src in [1, 4] {
            for dst in [1, 2, 4] {
                for proto in [Proto::Tcp, Proto::Udp] {
                    for ports in [ports(50, 60), ports(9000, 9000)] {
                        want.push(IdentityFlow { rule: 0, src, dst, proto, ports });
                    }
                }
            }
        }
        assert_eq!(c.identity_flows, want);
    }

    #[test]
    fn output_does_not_depend_on_identity_order() {
        let mut ids = node();
        ids.reverse();
        assert_eq!(compile(&example(), &ids, &ATTESTED), compile(&example(), &node(), &ATTESTED));
        // A caller handing the same identity twice gets one row per thing allowed.
        let mut twice = node();
        twice.extend(node());
        assert_eq!(compile(&example(), &twice, &ATTESTED), compile(&example(), &node(), &ATTESTED));
    }

    #[test]
    fn selectors_by_labels_and_namespace() {
        let text = "[[rule]]\nname = \"eu\"\nfrom = { labels = { zone = \"eu\", app = \"web\" } }\n\
                    to = { cidr = [\"10.1.0.0/16\"] }\n\
                    [[rule]]\nname = \"default-ns\"\nfrom = { namespace = \"default\" }\n\
                    to = { cidr = [\"10.2.0.0/16\"] }\n";
        let p = Policy::parse(text, Path::new("p.toml")).unwrap();
        let c = compile(&p, &node(), &ATTESTED);
        let rows: Vec<(u32, u32)> = c.egress.iter().map(|r| (r.rule, r.identity)).collect();
        assert_eq!(rows, [(0, 3), (1, 2)]);
    }
}

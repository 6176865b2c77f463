//! The agent's enforcement policy file (`tether_agent::policy`): bytes in, a policy or an
//! error out, never a panic. A policy that parses is compiled for a few identities, and the
//! compiler and `explain` (which share the refusal functions) must agree both ways: every
//! compiled row is a flow `explain` allows, and every flow `explain` allows at a rule's ports
//! and addresses has a row.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use tether_agent::policy::{
    compile, explain, parse_bytes, Compiled, Context, Endpoint, Identity, IdentityInfo, Peers, Policy, Proto,
};

/// (spiffe_id, namespace, labels, golden)
type Workload = (&'static str, &'static str, &'static [(&'static str, &'static str)], bool);

/// The workloads the seeds name (example.org's, and the demo's shop).
const IDENTITIES: [Workload; 4] = [
    ("spiffe://example.org/web", "prod", &[("app", "web")], true),
    ("spiffe://example.org/db", "default", &[], false),
    ("spiffe://example.org/web/api", "prod", &[("app", "api"), ("tier", "front")], false),
    ("spiffe://demo.tether/shop", "default", &[], true),
];

fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
    l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn infos() -> Vec<IdentityInfo> {
    (1u32..)
        .zip(IDENTITIES)
        .map(|(id, (s, ns, l, golden))| IdentityInfo {
            id,
            spiffe_id: s.into(),
            namespace: ns.into(),
            labels: labels(l),
            golden,
        })
        .collect()
}

fn endpoint(id: u32) -> Endpoint {
    let (s, ns, l, golden) = IDENTITIES[id as usize - 1];
    Endpoint::Identity(Identity { spiffe_id: s.into(), namespace: ns.into(), labels: labels(l), golden })
}

fn allowed(policy: &Policy, from: &Endpoint, to: &Endpoint, port: u16, proto: Proto, ctx: &Context) -> bool {
    explain(policy, from, to, Some(port), proto, ctx).allowed
}

/// `explain` walks every rule per question: checking more than this many rows, rules or port
/// ranges would spend the fuzzer's time on repetition.
const CHECK: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Ok(policy) = parse_bytes(data) else { return };
    let identities = infos();
    for ctx in [Context { node_attested: true }, Context { node_attested: false }] {
        let compiled = compile(&policy, &identities, &ctx);
        check_rows(&policy, &compiled, &ctx);
        check_complete(&policy, &compiled, &ctx);
    }
});

/// Every row is sorted, unique, names a rule, and (the first few) is a flow `explain` allows.
fn check_rows(policy: &Policy, c: &Compiled, ctx: &Context) {
    let n = policy.rules.len();
    assert_eq!(c.rule_names.len(), n);
    assert!(c.identity_flows.iter().all(|f| (f.rule as usize) < n && f.ports.lo <= f.ports.hi));
    assert!(c.egress.iter().chain(&c.ingress).all(|f| (f.rule as usize) < n && f.ports.lo <= f.ports.hi));
    assert!(c.identity_flows.windows(2).all(|w| w[0] < w[1]));
    assert!(c.egress.windows(2).all(|w| w[0] < w[1]));
    assert!(c.ingress.windows(2).all(|w| w[0] < w[1]));
    for f in c.identity_flows.iter().take(CHECK) {
        assert!(
            allowed(policy, &endpoint(f.src), &endpoint(f.dst), f.ports.lo, f.proto, ctx),
            "compiled {f:?}, explain denies it"
        );
    }
    for f in c.egress.iter().take(CHECK) {
        let to = Endpoint::Addr(f.net.addr);
        assert!(allowed(policy, &endpoint(f.identity), &to, f.ports.hi, f.proto, ctx), "compiled egress {f:?}");
    }
    for f in c.ingress.iter().take(CHECK) {
        let from = Endpoint::Addr(f.net.addr);
        assert!(allowed(policy, &from, &endpoint(f.identity), f.ports.lo, f.proto, ctx), "compiled ingress {f:?}");
    }
}

/// What `explain` allows at each rule's own ports and networks, the compiler has a row for.
fn check_complete(policy: &Policy, c: &Compiled, ctx: &Context) {
    let ids = 1..=IDENTITIES.len() as u32;
    for rule in policy.rules.iter().take(CHECK / 8) {
        for &proto in rule.protocol.protos() {
            for port in rule.ports.iter().take(4).flat_map(|r| [r.lo, r.hi]) {
                match &rule.peers {
                    Peers::Identity { .. } => {
                        for (src, dst) in ids.clone().flat_map(|s| ids.clone().map(move |d| (s, d))) {
                            if allowed(policy, &endpoint(src), &endpoint(dst), port, proto, ctx) {
                                assert!(
                                    c.identity_flows.iter().any(|f| f.src == src
                                        && f.dst == dst
                                        && f.proto == proto
                                        && f.ports.contains(port)),
                                    "explain allows {src} -> {dst}:{port}/{proto}, no row"
                                );
                            }
                        }
                    }
                    Peers::Egress { to: nets, .. } | Peers::Ingress { from: nets, .. } => {
                        let egress = matches!(rule.peers, Peers::Egress { .. });
                        for (id, net) in ids.clone().flat_map(|i| nets.iter().map(move |n| (i, n))) {
                            let (me, there) = (endpoint(id), Endpoint::Addr(net.addr));
                            let (from, to) = if egress { (&me, &there) } else { (&there, &me) };
                            if allowed(policy, from, to, port, proto, ctx) {
                                let rows = if egress { &c.egress } else { &c.ingress };
                                assert!(
                                    rows.iter().any(|f| f.identity == id
                                        && f.net.contains(net.addr)
                                        && f.proto == proto
                                        && f.ports.contains(port)),
                                    "explain allows {from} <-> {to}:{port}/{proto}, no row"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

//! The node's identities at one moment: its entries (indexed by selector), the workload
//! SVIDs issued for them, the bundle and its JWT authorities, and whether the node is attested.

use std::{collections::HashMap, sync::Arc};

use tether_attestors::Selector;

use super::{jwt::JwtAuthorities, Bundle, LocalEntry};
use crate::svid::X509Svid;

/// Everything the Workload API serves from, replaced whole on every change.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub entries: Vec<LocalEntry>,
    /// By entry id; only unexpired SVIDs.
    pub svids: HashMap<String, X509Svid>,
    pub bundle: Bundle,
    /// The bundle's JWT authorities, parsed (once per bundle).
    pub jwt: Arc<JwtAuthorities>,
    /// Whether the node holds a valid node SVID (attested).
    pub node_attested: bool,
    /// For each selector, the entries (indices into `entries`) that require it: a workload
    /// is only checked against entries sharing at least one of its selectors.
    by_selector: HashMap<Selector, Vec<usize>>,
}

impl Snapshot {
    pub fn new(
        entries: Vec<LocalEntry>,
        svids: HashMap<String, X509Svid>,
        bundle: Bundle,
        node_attested: bool,
    ) -> Self {
        let mut by_selector: HashMap<Selector, Vec<usize>> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            for s in &e.selectors {
                by_selector.entry(s.clone()).or_default().push(i);
            }
        }
        let jwt = JwtAuthorities::for_bundle(&bundle.trust_domain, &bundle.jwks);
        Snapshot { entries, svids, bundle, jwt, node_attested, by_selector }
    }

    /// Entries whose selectors are all among the workload's, in a stable order.
    pub fn matching(&self, selectors: &[Selector]) -> Vec<&LocalEntry> {
        let mut candidates: Vec<usize> =
            selectors.iter().filter_map(|s| self.by_selector.get(s)).flatten().copied().collect();
        candidates.sort_unstable();
        candidates.dedup();
        let mut out: Vec<&LocalEntry> = candidates
            .into_iter()
            .map(|i| &self.entries[i])
            .filter(|e| tether_attestors::is_subset(&e.selectors, selectors))
            .collect();
        out.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id).then(a.id.cmp(&b.id)));
        out
    }
}

#[cfg(test)]
mod tests {
    use tether_attestors::SpiffeId;

    use super::*;

    fn entry(id: &str, sel: &[&str]) -> LocalEntry {
        LocalEntry {
            id: id.into(),
            spiffe_id: SpiffeId::parse(&format!("spiffe://td/{id}")).unwrap(),
            selectors: sel.iter().map(|s| Selector::parse(s).unwrap()).collect(),
            hint: String::new(),
            revision: 1,
            namespace: "default".into(),
            labels: Default::default(),
        }
    }

    #[test]
    fn matching_is_subset_of_the_workloads_selectors() {
        let snap = Snapshot::new(
            vec![
                entry("b", &["unix:uid:0", "cgroup:path:/a"]),
                entry("a", &["unix:uid:0"]),
                entry("c", &["unix:uid:1"]),
                entry("d", &["unix:uid:0", "unix:gid:5"]),
            ],
            HashMap::new(),
            Bundle::default(),
            true,
        );
        let wl: Vec<Selector> =
            ["unix:uid:0", "cgroup:path:/a", "unix:gid:0"].iter().map(|s| Selector::parse(s).unwrap()).collect();
        let ids: Vec<&str> = snap.matching(&wl).iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, vec!["a", "b"], "all of an entry's selectors must match; ordered by SPIFFE ID");
        assert!(snap.matching(&[]).is_empty());
    }
}

//! Registration entries as the node holds them.

use tether_attestors::{Selector, SpiffeId};
use tether_proto::node;

/// A registration entry as the agent uses it.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalEntry {
    pub id: String,
    pub spiffe_id: SpiffeId,
    pub selectors: Vec<Selector>,
    pub hint: String,
    pub revision: i64,
    /// For enforcement policy rules.
    pub namespace: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

impl LocalEntry {
    /// The entry the server sent; None when its SPIFFE ID or a selector does not parse.
    pub fn from_proto(e: &node::Entry) -> Option<Self> {
        Some(LocalEntry {
            id: e.id.clone(),
            spiffe_id: SpiffeId::parse(&e.spiffe_id).ok()?,
            selectors: e.selectors.iter().map(|s| Selector::parse(s)).collect::<Result<_, _>>().ok()?,
            hint: e.hint.clone(),
            revision: e.revision,
            namespace: if e.namespace.is_empty() { "default".into() } else { e.namespace.clone() },
            labels: e.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        })
    }
}

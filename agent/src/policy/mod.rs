//! The enforcement policy language: which flows protected workloads may make.
//!
//! Protected workloads are denied everything that no rule allows. A policy file (TOML) is
//! parsed and validated into a [`Policy`]; [`compile`] turns it, with the identities this node
//! serves, into flat tables for the kernel maps; [`explain`] answers "why is this flow allowed,
//! or not" from the same matching code. Pure Rust: the loader in `crate::ebpf` owns the maps.
//!
//! ```toml
//! [defaults]                       # optional; defaults shown
//! require_node_attested = true     # rules apply only while the node is attested
//! require_golden_binary = false    # ... only to identities whose binary is in the manifest
//!
//! [[rule]]
//! name = "web-to-db"
//! from = { spiffe_id = "spiffe://example.org/web" }
//! to = { spiffe_id = "spiffe://example.org/db" }
//! ports = [5432, "8000-8080"]      # omitted: any port
//! protocol = "tcp"                 # "tcp" (default) | "udp" | "any"
//! ```
//!
//! A selector is either an identity selector (`spiffe_id`, `spiffe_id_prefix`,
//! `spiffe_id_pattern`, `namespace`, `labels`; all given must hold) or `cidr` (IPv4 only).
//! Identity to identity is a local flow, identity to cidr egress, cidr to identity ingress.

mod compile;
mod error;
mod explain;
mod locate;
mod net;
mod parse;
mod selector;

use std::path::{Path, PathBuf};

pub use compile::{compile, CidrFlow, Compiled, Context, IdentityFlow, IdentityInfo};
pub use error::PolicyError;
pub use explain::{explain, Endpoint, EndpointError, Explanation, Identity};
pub use locate::{Location, RuleRef};
pub use net::{Ipv4Net, PortRange, Proto, Protocol};
pub use parse::MAX_RULES;
pub use selector::{IdentitySelector, SpiffePattern};

/// A parsed and validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub defaults: Defaults,
    /// In file order; a rule's index here is its number in compiled rows and audit events.
    pub rules: Vec<Rule>,
    pub source: PathBuf,
}

/// The `[defaults]` table; each rule may override either key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Defaults {
    pub require_node_attested: bool,
    pub require_golden_binary: bool,
}

impl Default for Defaults {
    fn default() -> Self {
        // Attestation is what makes identities on this node trustworthy at all, so it is on
        // unless the author opts out; the golden manifest is opt-in because not every node
        // has one.
        Defaults { require_node_attested: true, require_golden_binary: false }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub peers: Peers,
    pub protocol: Protocol,
    /// Sorted, merged, never empty: "any port" is `[PortRange::ANY]`.
    pub ports: Vec<PortRange>,
    /// Resolved against `[defaults]`.
    pub require_node_attested: bool,
    /// Resolved against `[defaults]`. Holds for every protected identity the rule involves:
    /// the source of egress, the destination of ingress, both ends of an identity flow.
    pub require_golden_binary: bool,
    /// Where the rule's name is, for messages.
    pub line: usize,
}

/// Who talks to whom. At least one side is always an identity: two networks would leave
/// nothing on this node to enforce on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peers {
    /// Identity to identity (both served here).
    Identity { from: IdentitySelector, to: IdentitySelector },
    /// A protected identity connecting out to networks.
    Egress { from: IdentitySelector, to: Vec<Ipv4Net> },
    /// Networks connecting in to a protected identity.
    Ingress { from: Vec<Ipv4Net>, to: IdentitySelector },
}

impl Policy {
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let bytes = std::fs::read(path).map_err(|source| PolicyError::Read { path: path.into(), source })?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| PolicyError::NotUtf8 { path: path.into(), offset: e.valid_up_to() })?;
        Self::parse(text, path)
    }

    /// `path` is only used in messages and kept as `source`.
    pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
        parse::parse(text, path)
    }
}

/// For fuzzing: any bytes in, a policy or an error out, never a panic.
pub fn parse_bytes(data: &[u8]) -> Result<Policy, PolicyError> {
    let path = Path::new("<fuzz>");
    let text =
        std::str::from_utf8(data).map_err(|e| PolicyError::NotUtf8 { path: path.into(), offset: e.valid_up_to() })?;
    Policy::parse(text, path)
}

/// One line for `tether-agent policy check FILE`.
pub fn check_summary(policy: &Policy) -> String {
    let count = |f: fn(&Peers) -> bool| policy.rules.iter().filter(|r| f(&r.peers)).count();
    let flows = count(|p| matches!(p, Peers::Identity { .. }));
    let egress = count(|p| matches!(p, Peers::Egress { .. }));
    let ingress = count(|p| matches!(p, Peers::Ingress { .. }));
    let n = policy.rules.len();
    format!(
        "{}: {n} rule{} OK ({flows} identity flow{}, {egress} egress, {ingress} ingress)",
        policy.source.display(),
        if n == 1 { "" } else { "s" },
        if flows == 1 { "" } else { "s" },
    )
}

#[cfg(test)]
mod tests;

//! What enforcement and the node tunnel tell each other, as whole views replaced on every
//! change (watch channels). A layer below both, so neither imports the other:
//!
//! - the tunnel learns from the server which other nodes serve which workloads
//!   ([`RemoteView`]); enforcement compiles those identities into the policy, writes the
//!   remote workloads into the kernel's capture table, and points capture at the tunnel;
//! - enforcement knows which policy rows the kernel holds, and which protected workloads
//!   listen where ([`LocalView`]); the tunnel authorises streams with exactly those rows, so
//!   it never admits what the kernel would drop (or the reverse).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use tether_common::FlowKey;

/// TCP, as the policy rows name it.
pub const TCP: u32 = 6;

/// An identity another node may serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteIdentity {
    pub spiffe_id: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// Another attested node with a tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its node SPIFFE ID.
    pub node_id: String,
    pub endpoint: SocketAddrV4,
    pub addresses: Vec<Ipv4Addr>,
    /// Every workload SPIFFE ID it may serve.
    pub identities: BTreeSet<String>,
    /// Its tunnel did not answer lately: new connections to it are refused at connect().
    pub down: bool,
}

/// A workload another node serves at `addr:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteService {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub spiffe_id: String,
    /// Index into [`RemoteView::peers`].
    pub peer: usize,
}

/// Where the kernel sends captured connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capture {
    /// The network namespace whose workloads are captured (`SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
    /// The capture listener, in that namespace.
    pub listener: SocketAddrV4,
}

/// The other nodes, as the tunnel last learned them from the server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoteView {
    pub peers: Vec<Peer>,
    pub services: Vec<RemoteService>,
    /// Every identity the peers may serve, once each.
    pub identities: Vec<RemoteIdentity>,
    /// None until the capture listener is up (nothing is captured then).
    pub capture: Option<Capture>,
}

impl RemoteView {
    pub fn peer(&self, node_id: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| p.node_id == node_id)
    }

    /// The remote workload at `addr:port`, with the node serving it.
    pub fn service(&self, addr: Ipv4Addr, port: u16) -> Option<(&RemoteService, &Peer)> {
        let s = self.services.iter().find(|s| s.addr == addr && s.port == port)?;
        Some((s, self.peers.get(s.peer)?))
    }
}

/// An identity number the kernel knows, and what it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityName {
    pub spiffe_id: String,
    pub golden: bool,
    /// Served by this node (else a remote identity the policy was compiled for).
    pub local: bool,
}

/// A protected workload of this node listening on a TCP port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocalService {
    /// The bound address (0.0.0.0: every address of its namespace).
    pub addr: Ipv4Addr,
    pub port: u16,
    /// Its identity number and SPIFFE ID.
    pub identity: u32,
    pub spiffe_id: String,
    /// Its network namespace (inode).
    pub netns: u64,
}

/// What enforcement has put in force.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalView {
    pub node_attested: bool,
    /// Identity numbers of the compiled policy.
    pub identities: HashMap<u32, IdentityName>,
    /// Identity-to-identity rows in the kernel's live policy generation.
    pub flows: HashSet<FlowKey>,
    pub services: Vec<LocalService>,
}

impl LocalView {
    /// A TCP flow from identity `src` to identity `dst` on `port` is in the live policy.
    pub fn allows(&self, src: u32, dst: u32, port: u16) -> bool {
        let key = FlowKey { src, dst, dport: port, _pad: 0, proto: TCP };
        self.flows.contains(&key) || self.flows.contains(&FlowKey { dport: 0, ..key })
    }

    /// The protected workload listening on `port` in namespace `netns` at `addr`.
    pub fn service(&self, netns: u64, addr: Ipv4Addr, port: u16) -> Option<&LocalService> {
        self.services.iter().find(|s| s.netns == netns && s.port == port && (s.addr == addr || s.addr.is_unspecified()))
    }
}

/// Enforcement's ends of the channels to the tunnel.
pub struct EnforcementEnds {
    pub remote: tokio::sync::watch::Receiver<std::sync::Arc<RemoteView>>,
    pub local: tokio::sync::watch::Sender<std::sync::Arc<LocalView>>,
}

/// The tunnel's ends.
pub struct TunnelEnds {
    pub remote: tokio::sync::watch::Sender<std::sync::Arc<RemoteView>>,
    pub local: tokio::sync::watch::Receiver<std::sync::Arc<LocalView>>,
}

/// Both views, empty until their owner publishes.
pub fn channels() -> (EnforcementEnds, TunnelEnds) {
    let (remote_tx, remote_rx) = tokio::sync::watch::channel(std::sync::Arc::new(RemoteView::default()));
    let (local_tx, local_rx) = tokio::sync::watch::channel(std::sync::Arc::new(LocalView::default()));
    (EnforcementEnds { remote: remote_rx, local: local_tx }, TunnelEnds { remote: remote_tx, local: local_rx })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_port_rows_allow_every_port_and_services_match_wildcards() {
        let mut v = LocalView::default();
        v.flows.insert(FlowKey { src: 1, dst: 2, dport: 0, _pad: 0, proto: TCP });
        v.flows.insert(FlowKey { src: 1, dst: 3, dport: 443, _pad: 0, proto: TCP });
        assert!(v.allows(1, 2, 9999));
        assert!(v.allows(1, 3, 443) && !v.allows(1, 3, 444) && !v.allows(3, 1, 443));
        v.services.push(LocalService {
            addr: Ipv4Addr::UNSPECIFIED,
            port: 8443,
            identity: 2,
            spiffe_id: "spiffe://td/api".into(),
            netns: 7,
        });
        assert!(v.service(7, Ipv4Addr::new(10, 0, 0, 1), 8443).is_some());
        assert!(v.service(8, Ipv4Addr::new(10, 0, 0, 1), 8443).is_none(), "another namespace");
        assert!(v.service(7, Ipv4Addr::new(10, 0, 0, 1), 8444).is_none());
    }
}

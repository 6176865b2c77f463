//! The tunnel's view of the other nodes, from the server (`SyncTunnels`): this node
//! registers its endpoint, addresses and the protected workloads listening in its tunnel
//! namespace, and learns every other attested node's. Peers the dialer found unreachable
//! are marked down until a probe reaches them again.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use tether_proto::node;

use super::Shared;
use crate::{
    manager::Manager,
    mesh::{Capture, Peer, RemoteIdentity, RemoteService, RemoteView},
};

/// What this node registers: its protected listeners in the tunnel namespace, a wildcard
/// one at each of the node's addresses (loopback-only listeners are not reachable).
fn request(shared: &Shared) -> node::TunnelSyncRequest {
    let local = shared.local.borrow().clone();
    let addresses = shared.addresses();
    let mut services = BTreeSet::new();
    for s in local.services.iter().filter(|s| s.netns == shared.netns) {
        let at: Vec<Ipv4Addr> = if s.addr.is_unspecified() {
            addresses.clone()
        } else if addresses.contains(&s.addr) {
            vec![s.addr]
        } else {
            vec![]
        };
        for a in at {
            services.insert((a, s.port, s.spiffe_id.clone()));
        }
    }
    node::TunnelSyncRequest {
        endpoint: shared.endpoint.to_string(),
        addresses: addresses.iter().map(ToString::to_string).collect(),
        services: services
            .into_iter()
            .map(|(a, port, spiffe_id)| node::TunnelService {
                address: a.to_string(),
                port: u32::from(port),
                spiffe_id,
            })
            .collect(),
    }
}

/// The view from the server's answer; malformed peers or services are skipped (logged).
pub fn view(resp: &node::TunnelSyncResponse, down: &BTreeSet<String>, capture: Option<Capture>) -> RemoteView {
    let mut v = RemoteView { capture, ..RemoteView::default() };
    let mut identities: BTreeMap<String, RemoteIdentity> = BTreeMap::new();
    for p in &resp.peers {
        let Ok(endpoint) = p.endpoint.parse::<SocketAddrV4>() else {
            tracing::warn!(node = %p.node_id, endpoint = %p.endpoint, "peer skipped: bad endpoint");
            continue;
        };
        let index = v.peers.len();
        for s in &p.services {
            let (Ok(addr), Ok(port)) = (s.address.parse::<Ipv4Addr>(), u16::try_from(s.port)) else { continue };
            v.services.push(RemoteService { addr, port, spiffe_id: s.spiffe_id.clone(), peer: index });
        }
        for i in &p.identities {
            identities.entry(i.spiffe_id.clone()).or_insert_with(|| RemoteIdentity {
                spiffe_id: i.spiffe_id.clone(),
                namespace: i.namespace.clone(),
                labels: i.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            });
        }
        v.peers.push(Peer {
            node_id: p.node_id.clone(),
            endpoint,
            addresses: p.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
            identities: p.identities.iter().map(|i| i.spiffe_id.clone()).collect(),
            down: down.contains(&p.node_id),
        });
    }
    v.services.sort_by_key(|s| (s.addr, s.port));
    v.services.dedup_by(|a, b| (a.addr, a.port) == (b.addr, b.port));
    v.identities = identities.into_values().collect();
    v
}

/// Syncs every `every` (and as soon as this node's listeners or a peer's reachability
/// change), publishing the view when it changed. A failed sync keeps the last view: the
/// server being away does not stop tunnels (a refused node stops them: its snapshot says
/// so, and every stream is re-checked against it).
pub async fn run(shared: Arc<Shared>, manager: Arc<Manager>, every: Duration, capture: Capture) {
    let mut local = shared.local.clone();
    let mut last: Option<node::TunnelSyncResponse> = None;
    let mut sent_services = None;
    loop {
        if let Some(svid) = manager.node_svid().await {
            shared.set_node_svid(svid);
        }
        let req = request(&shared);
        let services = req.services.clone();
        match manager.sync_tunnels(req).await {
            Ok(resp) => {
                if sent_services.as_ref() != Some(&services) {
                    tracing::info!(services = services.len(), "tunnel registered with the server");
                    sent_services = Some(services);
                }
                last = Some(resp);
            }
            Err(e) => tracing::warn!("tunnel sync with the server failed (keeping the last view): {e}"),
        }
        if let Some(resp) = &last {
            let v = view(resp, &shared.down_nodes(), Some(capture));
            shared.remote_tx.send_if_modified(|cur| {
                if **cur == v {
                    return false;
                }
                tracing::info!(
                    peers = v.peers.len(),
                    services = v.services.len(),
                    down = v.peers.iter().filter(|p| p.down).count(),
                    "tunnel peers"
                );
                *cur = Arc::new(v);
                true
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shared.reachability.notified() => {}
            changed = local.changed() => {
                if changed.is_err() { tokio::time::sleep(every).await; }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_indexes_services_by_peer_and_marks_down_nodes() {
        let resp = node::TunnelSyncResponse {
            peers: vec![
                node::TunnelPeer {
                    node_id: "spiffe://td/node/b".into(),
                    endpoint: "10.0.0.2:15008".into(),
                    addresses: vec!["10.0.0.2".into()],
                    services: vec![node::TunnelService {
                        address: "10.0.0.2".into(),
                        port: 8443,
                        spiffe_id: "spiffe://td/api".into(),
                    }],
                    identities: vec![node::TunnelIdentity {
                        spiffe_id: "spiffe://td/api".into(),
                        namespace: "prod".into(),
                        labels: Default::default(),
                    }],
                },
                node::TunnelPeer {
                    node_id: "spiffe://td/node/bad".into(),
                    endpoint: "nope".into(),
                    ..Default::default()
                },
            ],
        };
        let down: BTreeSet<String> = ["spiffe://td/node/b".to_owned()].into();
        let v = view(&resp, &down, None);
        assert_eq!(v.peers.len(), 1, "a peer with a bad endpoint is skipped");
        let (svc, peer) = v.service(Ipv4Addr::new(10, 0, 0, 2), 8443).unwrap();
        assert_eq!((svc.spiffe_id.as_str(), peer.down), ("spiffe://td/api", true));
        assert_eq!(v.identities[0].namespace, "prod");
    }
}

//! `SyncTunnels` of the node API: a node registers its tunnel endpoint, its addresses and
//! the protected workloads it serves there, and learns every other attested node's. What a
//! node may register is bounded by what it may serve: a service must name one of the
//! identities the server would sign for that node; an address belongs to one node.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use tether_attestors::SpiffeId;
use tether_proto::node;
use tonic::Status;

use crate::{
    api::{now, NodeService},
    store::{Agent, TunnelRecord, TunnelService},
};

/// More than any node needs; bounds what one request can make the server store.
const MAX_ADDRESSES: usize = 64;
const MAX_SERVICES: usize = 4096;

fn address(s: &str) -> Result<Ipv4Addr, Status> {
    let a: Ipv4Addr =
        s.parse().map_err(|_| Status::invalid_argument(format!("address {s:?} is not an IPv4 address")))?;
    if a.is_loopback() || a.is_unspecified() || a.is_multicast() || a.is_broadcast() {
        return Err(Status::invalid_argument(format!("address {a} cannot name a node")));
    }
    Ok(a)
}

/// The identities (SPIFFE ID, namespace, labels) `node` may serve, one per SPIFFE ID.
fn identities(service: &NodeService, node: &Agent) -> Result<BTreeMap<String, node::TunnelIdentity>, Status> {
    let mut out = BTreeMap::new();
    for parent in service.parents(node)? {
        for e in service.0.store.list_entries(None, Some(&parent.to_string()))? {
            out.entry(e.spiffe_id.to_string()).or_insert_with(|| node::TunnelIdentity {
                spiffe_id: e.spiffe_id.to_string(),
                namespace: e.namespace.clone(),
                labels: e.labels.clone().into_iter().collect(),
            });
        }
    }
    Ok(out)
}

fn record(
    req: &node::TunnelSyncRequest,
    served: &BTreeMap<String, node::TunnelIdentity>,
) -> Result<TunnelRecord, Status> {
    let endpoint: SocketAddrV4 = req
        .endpoint
        .parse()
        .map_err(|_| Status::invalid_argument(format!("endpoint {:?} is not IPv4:port", req.endpoint)))?;
    if req.addresses.len() > MAX_ADDRESSES || req.services.len() > MAX_SERVICES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_ADDRESSES} addresses and {MAX_SERVICES} services per node"
        )));
    }
    let mut addresses = req.addresses.iter().map(|a| address(a)).collect::<Result<Vec<_>, _>>()?;
    addresses.sort();
    addresses.dedup();
    let mut services = Vec::with_capacity(req.services.len());
    for s in &req.services {
        let port = u16::try_from(s.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| Status::invalid_argument(format!("service port {} is not a TCP port", s.port)))?;
        let spiffe_id =
            SpiffeId::parse(&s.spiffe_id).map_err(|e| Status::invalid_argument(format!("service spiffe_id: {e}")))?;
        if !served.contains_key(&s.spiffe_id) {
            return Err(Status::permission_denied(format!("this node may not serve {spiffe_id}")));
        }
        services.push(TunnelService { address: address(&s.address)?, port, spiffe_id });
    }
    Ok(TunnelRecord { endpoint, addresses, services })
}

fn to_proto(s: &TunnelService) -> node::TunnelService {
    node::TunnelService { address: s.address.to_string(), port: u32::from(s.port), spiffe_id: s.spiffe_id.to_string() }
}

pub(crate) fn sync(
    service: &NodeService,
    caller: &Agent,
    req: &node::TunnelSyncRequest,
) -> Result<node::TunnelSyncResponse, Status> {
    let store = &service.0.store;
    let rec = record(req, &identities(service, caller)?)?;
    store.register_tunnel(&caller.spiffe_id, &rec, now())?;
    let mut peers = Vec::new();
    for (id, theirs) in store.list_tunnels()? {
        if id == caller.spiffe_id {
            continue;
        }
        // Gone between the two reads: not attested, not listed.
        let Ok(agent) = store.get_agent(&id) else { continue };
        peers.push(node::TunnelPeer {
            node_id: id.to_string(),
            endpoint: theirs.endpoint.to_string(),
            addresses: theirs.addresses.iter().map(ToString::to_string).collect(),
            services: theirs.services.iter().map(to_proto).collect(),
            identities: identities(service, &agent)?.into_values().collect(),
        });
    }
    Ok(node::TunnelSyncResponse { peers })
}

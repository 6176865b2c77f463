//! Nodes' tunnel registrations: where each attested node's tunnel listens, its addresses,
//! and the protected workloads it serves there. Only attested nodes are ever listed (an
//! evicted or revoked node's row stays, but is joined away with its agent row).

use std::net::{Ipv4Addr, SocketAddrV4};

use serde::{Deserialize, Serialize};
use tether_attestors::SpiffeId;

use super::{Store, StoreError, Tx};

/// A workload a node serves at an address and TCP port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelService {
    pub address: Ipv4Addr,
    pub port: u16,
    pub spiffe_id: SpiffeId,
}

/// What a node registers for its tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelRecord {
    pub endpoint: SocketAddrV4,
    pub addresses: Vec<Ipv4Addr>,
    pub services: Vec<TunnelService>,
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn attested_tunnels(tx: &mut Tx<'_>) -> Result<Vec<(SpiffeId, TunnelRecord)>, StoreError> {
    let rows = tx.rows(
        "SELECT t.spiffe_id, t.endpoint, t.addresses, t.services FROM tunnel_nodes t \
         JOIN agents a ON a.spiffe_id = t.spiffe_id ORDER BY t.spiffe_id",
        &[],
    )?;
    rows.iter()
        .map(|r| {
            let id = SpiffeId::parse(&r[0].text()?).map_err(corrupt)?;
            let endpoint = r[1].text()?.parse().map_err(corrupt)?;
            let addresses = serde_json::from_str(&r[2].text()?).map_err(corrupt)?;
            let services = serde_json::from_str(&r[3].text()?).map_err(corrupt)?;
            Ok((id, TunnelRecord { endpoint, addresses, services }))
        })
        .collect()
}

impl Store {
    /// Registers (replaces) `node`'s tunnel. Refused if the node is not an attested agent,
    /// if its endpoint or a service is not at one of its addresses, or if another attested
    /// node already registered one of its addresses (an address names one node: the first
    /// to claim it keeps it while it stays attested).
    pub fn register_tunnel(&self, node: &SpiffeId, rec: &TunnelRecord, now: i64) -> Result<(), StoreError> {
        if !rec.addresses.contains(rec.endpoint.ip()) {
            return Err(StoreError::Invalid(format!(
                "tunnel endpoint {} is not one of the node's addresses",
                rec.endpoint
            )));
        }
        if let Some(s) = rec.services.iter().find(|s| !rec.addresses.contains(&s.address)) {
            return Err(StoreError::Invalid(format!(
                "service {}:{} is not at one of the node's addresses",
                s.address, s.port
            )));
        }
        let addresses = serde_json::to_string(&rec.addresses).map_err(corrupt)?;
        let services = serde_json::to_string(&rec.services).map_err(corrupt)?;
        self.with_tx(|tx| {
            if tx.rows("SELECT spiffe_id FROM agents WHERE spiffe_id = $1", &[node.to_string().into()])?.is_empty() {
                return Err(StoreError::NoAgent(node.to_string()));
            }
            for (other, theirs) in attested_tunnels(tx)? {
                if &other == node {
                    continue;
                }
                if let Some(a) = rec.addresses.iter().find(|a| theirs.addresses.contains(a)) {
                    return Err(StoreError::Refused(format!("address {a} is registered by node {other}")));
                }
            }
            tx.exec(
                "INSERT INTO tunnel_nodes (spiffe_id, endpoint, addresses, services, updated_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (spiffe_id) DO UPDATE SET endpoint = excluded.endpoint, addresses = excluded.addresses,
                 services = excluded.services, updated_at = excluded.updated_at",
                &[node.to_string().into(), rec.endpoint.to_string().into(), addresses.into(), services.into(), now.into()],
            )?;
            Ok(())
        })
    }

    /// Every attested node's tunnel registration.
    pub fn list_tunnels(&self) -> Result<Vec<(SpiffeId, TunnelRecord)>, StoreError> {
        self.with_tx(attested_tunnels)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn rec(endpoint: &str, addrs: &[&str], services: &[(&str, u16, &str)]) -> TunnelRecord {
        TunnelRecord {
            endpoint: endpoint.parse().unwrap(),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            services: services
                .iter()
                .map(|(a, p, id)| TunnelService {
                    address: a.parse().unwrap(),
                    port: *p,
                    spiffe_id: SpiffeId::parse(id).unwrap(),
                })
                .collect(),
        }
    }

    fn attest(s: &Store, name: &str, digest: &str) -> SpiffeId {
        let id = SpiffeId::parse(&format!("spiffe://td/node/{name}")).unwrap();
        s.create_join_token(digest, 1000, Some(&id)).unwrap();
        s.attest_with_token(digest, 1, id.clone(), |_| Ok(((), 999))).unwrap();
        id
    }

    pub(in crate::store) fn tunnels_are_listed_only_for_attested_nodes_and_addresses_are_unique(s: &Store) {
        let (a, b) = (attest(s, "a", "ta"), attest(s, "b", "tb"));
        let ra = rec("10.0.0.1:15008", &["10.0.0.1"], &[("10.0.0.1", 8443, "spiffe://td/api")]);
        s.register_tunnel(&a, &ra, 5).unwrap();
        // Replacing is fine; listing returns what was registered.
        s.register_tunnel(&a, &ra, 6).unwrap();
        assert_eq!(s.list_tunnels().unwrap(), vec![(a.clone(), ra.clone())]);
        // Another node cannot claim A's address.
        let e = s.register_tunnel(&b, &rec("10.0.0.1:15008", &["10.0.0.1", "10.0.0.2"], &[]), 7).unwrap_err();
        assert!(e.to_string().contains("address 10.0.0.1 is registered by node spiffe://td/node/a"), "{e}");
        // Endpoints and services must be at the node's addresses.
        let e = s.register_tunnel(&b, &rec("10.0.0.9:15008", &["10.0.0.2"], &[]), 7).unwrap_err();
        assert!(matches!(e, StoreError::Invalid(_)), "{e}");
        let e = s.register_tunnel(&b, &rec("10.0.0.2:15008", &["10.0.0.2"], &[("10.0.0.3", 1, "spiffe://td/x")]), 7);
        assert!(matches!(e, Err(StoreError::Invalid(_))), "{e:?}");
        let rb = rec("10.0.0.2:15008", &["10.0.0.2"], &[]);
        s.register_tunnel(&b, &rb, 8).unwrap();
        assert_eq!(s.list_tunnels().unwrap().len(), 2);
        // An evicted node disappears from the list, and frees its addresses.
        s.evict_agent(&a, false).unwrap();
        assert_eq!(s.list_tunnels().unwrap(), vec![(b.clone(), rb)]);
        assert!(matches!(s.register_tunnel(&a, &ra, 9), Err(StoreError::NoAgent(_))));
        s.register_tunnel(&b, &rec("10.0.0.2:15008", &["10.0.0.1", "10.0.0.2"], &[]), 10).unwrap();
    }
}

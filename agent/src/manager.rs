//! Keeps the node attested and its workload SVIDs fresh: syncs entries, signs a new key for
//! each entry as its SVID nears half life (with jitter), renews the node SVID, and
//! publishes every change to the Workload API's streams. When the server is unreachable it
//! keeps what it has until expiry and tries again.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tether_attestors::{Selector, SpiffeId};
use tether_proto::node;
use tokio::sync::{watch, Mutex};

use crate::{
    config::AgentConfig,
    node_client::{Bundle, NodeError, NodeSession},
    svid::{new_key, now, X509Svid},
};

/// Whether the server refused the node itself (its evidence failed, it was revoked or
/// evicted, or its evidence is too old) — not one request, e.g. a CSR for an entry deleted
/// between sync and signing, which is also PermissionDenied.
fn node_refused(s: &tonic::Status) -> bool {
    let m = s.message();
    s.code() == tonic::Code::PermissionDenied
        && (m.starts_with("node revoked:") || m.contains("is not an attested agent") || m.contains("last TPM quote"))
}

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
    fn from_proto(e: &node::Entry) -> Option<Self> {
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

/// Everything the Workload API serves from, replaced whole on every change.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub entries: Vec<LocalEntry>,
    /// By entry id; only unexpired SVIDs.
    pub svids: HashMap<String, X509Svid>,
    pub bundle: Bundle,
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
        Snapshot { entries, svids, bundle, node_attested, by_selector }
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

pub struct Manager {
    config: AgentConfig,
    session: Mutex<NodeSession>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    jwt_cache: Mutex<HashMap<JwtKey, CachedJwt>>,
    /// Unix time of the next re-attestation (TPM nodes).
    next_reattest: Mutex<i64>,
}

/// (entry id, sorted audience)
type JwtKey = (String, Vec<String>);

/// (token, issued at, expires at)
type CachedJwt = (String, i64, i64);

impl Manager {
    pub async fn start(config: AgentConfig) -> Result<Arc<Self>, NodeError> {
        let session = NodeSession::establish(&config).await?;
        let snapshot = Snapshot::new(Vec::new(), HashMap::new(), session.bundle.clone(), true);
        let (tx, _) = watch::channel(Arc::new(snapshot));
        let manager = Arc::new(Manager {
            config,
            session: Mutex::new(session),
            snapshot: tx,
            jwt_cache: Mutex::default(),
            next_reattest: Mutex::new(0),
        });
        manager.schedule_reattest().await;
        manager.set_node_status(true, "");
        if let Err(e) = manager.tick().await {
            tracing::warn!("first sync failed: {e}");
        }
        let m = manager.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(m.config.sync_interval_seconds)).await;
                if let Err(e) = m.tick().await {
                    tracing::warn!("sync with the server failed (serving cached SVIDs until they expire): {e}");
                    m.drop_expired();
                }
            }
        });
        Ok(manager)
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    fn drop_expired(&self) {
        let now = now();
        let cur = self.current();
        if cur.svids.values().any(|s| s.not_after <= now) {
            let mut next = (*cur).clone();
            next.svids.retain(|_, s| s.not_after > now);
            self.snapshot.send_replace(Arc::new(next));
        }
    }

    /// One round. A node the server refused (its evidence failed, it was evicted or banned,
    /// or its evidence is too old) is unattested: it stops serving SVIDs at once (not when
    /// they expire), the kernel's lease ends, and it attests from scratch each interval until
    /// the server accepts it again (a TPM node whose evidence passes again; a join-token node
    /// only with a new token).
    pub async fn tick(&self) -> Result<(), NodeError> {
        let mut session = self.session.lock().await;
        if !self.current().node_attested {
            if now() < *self.next_reattest.lock().await {
                return Ok(());
            }
            self.schedule_reattest().await;
            session.reestablish(&self.config).await?;
            tracing::info!(node = %session.node_svid.spiffe_id, "node attested again");
            self.set_node_status(true, "");
        }
        match self.tick_attested(&mut session).await {
            Err(NodeError::Status(s)) if node_refused(&s) => {
                self.withdraw(s.message()).await;
                Err(NodeError::Status(s))
            }
            // The server is away: cached SVIDs serve until they expire, but a node whose own
            // SVID has expired holds no attestation any more.
            Err(e) if session.node_svid.not_after <= now() => {
                self.withdraw(&format!("node SVID expired while the server was unreachable ({e})")).await;
                Err(e)
            }
            other => other,
        }
    }

    /// The node is not attested: workload SVIDs are withdrawn at once (and, through the
    /// snapshot, the kernel's lease ends).
    async fn withdraw(&self, reason: &str) {
        tracing::error!(reason, "NODE NOT ATTESTED: the server refused this node; workload SVIDs withdrawn");
        self.set_node_status(false, reason);
        let cur = self.current();
        let mut next = (*cur).clone();
        next.svids.clear();
        next.node_attested = false;
        self.snapshot.send_replace(Arc::new(next));
        self.jwt_cache.lock().await.clear();
    }

    async fn schedule_reattest(&self) {
        // Join-token nodes try again at the sync interval (a refused token stays refused;
        // a stored node SVID the server accepts again resumes).
        let every =
            self.config.tpm.as_ref().map(|t| t.reattest_interval_seconds).unwrap_or(self.config.sync_interval_seconds)
                as i64;
        *self.next_reattest.lock().await = now() + every;
    }

    /// `<data_dir>/node-status.json`: whether the node is attested, and why not; what the
    /// enforcement side reads.
    fn set_node_status(&self, attested: bool, reason: &str) {
        let status = serde_json::json!({ "attested": attested, "reason": reason, "at": now() });
        let path = self.config.data_dir.join("node-status.json");
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, status.to_string()).and_then(|_| std::fs::rename(&tmp, &path)) {
            tracing::warn!("writing {}: {e}", path.display());
        }
    }

    async fn tick_attested(&self, session: &mut NodeSession) -> Result<(), NodeError> {
        if now() >= session.node_svid.renew_after {
            session.renew(&self.config).await?;
            self.schedule_reattest().await;
        } else if session.uses_tpm() && now() >= *self.next_reattest.lock().await {
            session.reattest().await?;
            self.schedule_reattest().await;
        }
        let entries: Vec<LocalEntry> = session.sync().await?.iter().filter_map(LocalEntry::from_proto).collect();
        let cur = self.current();
        let now = now();
        let mut svids: HashMap<String, X509Svid> = cur
            .svids
            .iter()
            .filter(|(id, s)| s.not_after > now && entries.iter().any(|e| &e.id == *id && e.spiffe_id == s.spiffe_id))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let due: Vec<&LocalEntry> =
            entries.iter().filter(|e| svids.get(&e.id).is_none_or(|s| now >= s.renew_after)).collect();
        // In batches, so a node with thousands of entries keeps every request and answer
        // bounded.
        for batch in due.chunks(crate::node_client::SIGN_BATCH) {
            let mut keys = HashMap::new();
            let mut csrs = Vec::new();
            for e in batch {
                let pending = new_key()?;
                csrs.push((e.id.clone(), pending.csr_der));
                keys.insert(e.id.clone(), pending.key);
            }
            for (entry_id, chain) in session.sign(csrs).await? {
                if let Some(key) = keys.get(&entry_id) {
                    let svid = X509Svid::new(key, &chain)?;
                    tracing::info!(spiffe_id = %svid.spiffe_id, not_after = svid.not_after, "X.509-SVID issued");
                    svids.insert(entry_id, svid);
                }
            }
        }
        let next = Snapshot::new(entries, svids, session.bundle.clone(), true);
        let changed = next.bundle != cur.bundle
            || next.entries != cur.entries
            || next.svids.len() != cur.svids.len()
            || next.svids.iter().any(|(k, v)| cur.svids.get(k).is_none_or(|c| c.chain != v.chain));
        if changed {
            self.snapshot.send_replace(Arc::new(next));
        }
        Ok(())
    }

    /// A JWT-SVID for an entry and audience, minted by the server (the signing keys stay
    /// there), reused until half its life.
    pub async fn jwt(&self, entry_id: &str, audience: &[String]) -> Result<String, NodeError> {
        let mut aud = audience.to_vec();
        aud.sort();
        let key = (entry_id.to_owned(), aud);
        let now = now();
        if let Some((token, iat, exp)) = self.jwt_cache.lock().await.get(&key) {
            if now < iat + (exp - iat) / 2 {
                return Ok(token.clone());
            }
        }
        let token = self.session.lock().await.mint_jwt(entry_id, audience).await?;
        let exp = crate::workload_api::jwt_claims(&token).and_then(|c| c["exp"].as_i64()).unwrap_or(now);
        let mut cache = self.jwt_cache.lock().await;
        // Audiences are chosen by workloads: drop expired tokens so the cache cannot grow
        // without bound.
        cache.retain(|_, (_, _, e)| *e > now);
        cache.insert(key, (token.clone(), now, exp));
        Ok(token)
    }
}

// ---- For the node tunnel (agent/src/tunnel): the node's credential and its registry call.
impl Manager {
    /// The node SVID and key the node holds now: the tunnel proves with it which node a
    /// workload's tunnel comes from.
    pub async fn node_svid(&self) -> X509Svid {
        self.session.lock().await.node_svid.clone()
    }

    /// Registers the node's tunnel with the server and learns the other nodes' tunnels.
    pub async fn sync_tunnels(&self, req: node::TunnelSyncRequest) -> Result<node::TunnelSyncResponse, NodeError> {
        self.session.lock().await.sync_tunnels(req).await
    }
}

#[cfg(test)]
mod tests {
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
    fn only_refusals_of_the_node_withdraw_its_identities() {
        let denied = |m: &str| tonic::Status::permission_denied(m.to_owned());
        assert!(node_refused(&denied("node revoked: quote: nonce mismatch")));
        assert!(node_refused(&denied("spiffe://td/n is not an attested agent (evicted or revoked?)")));
        assert!(node_refused(&denied("spiffe://td/n: last TPM quote is 4000 s old (limit 3600 s): re-attest")));
        assert!(!node_refused(&denied("spiffe://td/n may not request spiffe://td/x (entry e1)")));
        assert!(!node_refused(&tonic::Status::unavailable("node revoked: server down")));
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

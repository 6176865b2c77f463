//! Keeps the node attested and its workload SVIDs fresh: syncs entries, signs a new key for
//! each entry as its SVID nears half life (with jitter), renews the node SVID, and
//! publishes every change to the Workload API's streams. When the server is unreachable it
//! keeps what it has until expiry and tries again.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tether_proto::node;
use tokio::sync::{watch, Mutex};

use crate::{
    config::AgentConfig,
    identity::{jwt::jwt_claims, Bundle, IdentitySource, JwtFuture, LocalEntry, Snapshot},
    node_client::{NodeError, NodeSession},
    svid::{new_key, now, X509Svid},
};

/// Whether the server refused the node itself (its evidence failed, it was revoked or
/// evicted, or its evidence is too old) — not one request, e.g. a CSR for an entry deleted
/// between sync and signing, which is also PermissionDenied. Read from the refusal code the
/// server attaches, never from the message.
fn node_refused(s: &tonic::Status) -> bool {
    tether_proto::refusal::NodeRefusal::of(s).is_some()
}

/// Whether the server answered and refused the node's credentials (its node SVID, join
/// token or TPM evidence; typed refusals included, which are PermissionDenied), as opposed to
/// being unreachable or not proving its own identity.
fn server_refused(e: &NodeError) -> bool {
    matches!(e, NodeError::Status(s) if matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated))
}

pub struct Manager {
    config: AgentConfig,
    /// None until the server has been reached (a start while it was away).
    session: Mutex<Option<NodeSession>>,
    /// The node's TPM, opened once (the session is made again with it).
    tpm: Option<crate::tpm::NodeTpm>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    jwt_cache: Mutex<HashMap<JwtKey, CachedJwt>>,
    /// Unix time of the next re-attestation (TPM nodes).
    next_reattest: Mutex<i64>,
    /// Until the server is reached: when the node SVID held from before runs out (unix time;
    /// 0 when none is held), and how long to wait before the next attempt.
    held_node_until: std::sync::atomic::AtomicI64,
    retry_in: std::sync::Mutex<Duration>,
    /// The bundle last written to the data directory.
    saved_bundle: std::sync::Mutex<Option<Bundle>>,
}

/// How long start-up waits for the server before serving what the node held.
const FIRST_CONTACT: Duration = Duration::from_secs(5);
/// The longest wait between attempts to reach an absent server.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// (entry id, sorted audience)
type JwtKey = (String, Vec<String>);

/// (token, issued at, expires at)
type CachedJwt = (String, i64, i64);

impl Manager {
    /// Starts the identity plane of this node. The server is given [`FIRST_CONTACT`]; if it
    /// cannot be reached, the agent serves the SVIDs it held before (until they expire) and
    /// keeps trying with backoff — it never exits for an absent server. It fails when the server
    /// answers and refuses the node (a banned node, a used join token): what the node held is
    /// forgotten, and the caller ends the kernel's lease.
    pub async fn start(config: AgentConfig) -> Result<Arc<Self>, NodeError> {
        let tpm = match &config.tpm {
            Some(t) => Some(crate::tpm::NodeTpm::open(t, &config.data_dir.join("tpm")).await?),
            None => None,
        };
        // What this node held before: its node SVID, and (within the same boot, for a TPM
        // node, whose state must be proved again after a reboot) its workload identities.
        let held_node = crate::node_client::load_node_svid(&config.data_dir);
        let held = held_node.as_ref().and_then(|_| crate::persist::load_identities(&config.data_dir, tpm.is_some()));
        let saved_bundle = crate::persist::load_bundle(&config.data_dir, &config.trust_domain);
        let bundle = saved_bundle.clone().unwrap_or_default();
        let attempt = tokio::time::timeout(FIRST_CONTACT, NodeSession::establish_with(&config, tpm.clone())).await;
        let (session, snapshot) = match attempt {
            Ok(Ok(session)) => {
                let (entries, svids) = held.unwrap_or_default();
                let snapshot = Snapshot::new(entries, svids, session.bundle.clone(), true);
                (Some(session), snapshot)
            }
            // The server answered and refused this node (a banned node, a used token): what
            // it held before is not served, now or after another restart.
            Ok(Err(e)) if server_refused(&e) => {
                if held.is_some() {
                    crate::persist::forget_identities(&config.data_dir);
                }
                return Err(e);
            }
            Ok(Err(e)) if !crate::node_client::unreachable(&e) && held.is_none() => return Err(e),
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {FIRST_CONTACT:?}"),
                };
                let attested = held.is_some();
                let (entries, svids) = held.unwrap_or_default();
                if attested {
                    tracing::warn!(
                        svids = svids.len(),
                        "server unreachable at start ({why}): serving the SVIDs held before until they expire; \
                         retrying"
                    );
                } else {
                    tracing::warn!("server unreachable at start ({why}): nothing held to serve; retrying");
                }
                (None, Snapshot::new(entries, svids, bundle, attested))
            }
        };
        let connected = session.is_some();
        let (tx, _) = watch::channel(Arc::new(snapshot));
        let manager = Arc::new(Manager {
            config,
            session: Mutex::new(session),
            tpm,
            snapshot: tx,
            jwt_cache: Mutex::default(),
            next_reattest: Mutex::new(0),
            held_node_until: std::sync::atomic::AtomicI64::new(held_node.map_or(0, |s| s.not_after)),
            retry_in: std::sync::Mutex::new(Duration::from_secs(1)),
            saved_bundle: std::sync::Mutex::new(saved_bundle),
        });
        manager.schedule_reattest().await;
        manager.set_node_status(manager.current().node_attested, if connected { "" } else { "server unreachable" });
        if connected {
            if let Err(e) = manager.tick().await {
                tracing::warn!("first sync failed: {e}");
            }
        }
        let m = manager.clone();
        tokio::spawn(async move {
            loop {
                let wait = if m.session.lock().await.is_some() {
                    Duration::from_secs(m.config.sync_interval_seconds)
                } else {
                    *m.retry_in.lock().unwrap_or_else(|p| p.into_inner())
                };
                tokio::time::sleep(wait).await;
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
        let mut guard = self.session.lock().await;
        if guard.is_none() {
            match NodeSession::establish_with(&self.config, self.tpm.clone()).await {
                Ok(session) => {
                    tracing::info!(node = %session.node_svid.spiffe_id, "server reached: node attested");
                    *guard = Some(session);
                    *self.retry_in.lock().unwrap_or_else(|p| p.into_inner()) = Duration::from_secs(1);
                    self.held_node_until.store(0, std::sync::atomic::Ordering::Relaxed);
                    self.mark_attested();
                }
                Err(e) if crate::node_client::unreachable(&e) => {
                    let retry = {
                        let mut r = self.retry_in.lock().unwrap_or_else(|p| p.into_inner());
                        *r = (*r * 2).min(MAX_RETRY);
                        *r
                    };
                    let held = self.held_node_until.load(std::sync::atomic::Ordering::Relaxed);
                    if self.current().node_attested && held <= now() {
                        self.withdraw(&format!("node SVID expired while the server was unreachable ({e})")).await;
                    }
                    tracing::warn!(
                        svids = self.current().svids.len(),
                        "server still unreachable; next attempt in {retry:?}"
                    );
                    return Err(e);
                }
                Err(e) => {
                    self.withdraw(&e.to_string()).await;
                    return Err(e);
                }
            }
        }
        let Some(session) = guard.as_mut() else { return Ok(()) };
        if !self.current().node_attested {
            if now() < *self.next_reattest.lock().await {
                return Ok(());
            }
            self.schedule_reattest().await;
            session.reestablish(&self.config).await?;
            tracing::info!(node = %session.node_svid.spiffe_id, "node attested again");
            self.mark_attested();
        }
        match self.tick_attested(session).await {
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

    fn mark_attested(&self) {
        self.set_node_status(true, "");
        if !self.current().node_attested {
            let mut next = (*self.current()).clone();
            next.node_attested = true;
            self.snapshot.send_replace(Arc::new(next));
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
        // A restart must not serve them again.
        crate::persist::forget_identities(&self.config.data_dir);
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
        {
            let mut saved = self.saved_bundle.lock().unwrap_or_else(|p| p.into_inner());
            if saved.as_ref() != Some(&next.bundle) && !next.bundle.x509_authorities.is_empty() {
                match crate::persist::save_bundle(&self.config.data_dir, &next.bundle) {
                    Ok(()) => *saved = Some(next.bundle.clone()),
                    Err(e) => tracing::warn!("the new bundle was not persisted (a restart trusts an older one): {e}"),
                }
            }
        }
        if changed {
            if let Err(e) = crate::persist::save_identities(&self.config.data_dir, &next.entries, &next.svids) {
                tracing::warn!("identities not persisted (a restart while the server is away serves older ones): {e}");
            }
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
            // Saturating: the server is trusted, but an extreme exp must not overflow.
            if now < iat.saturating_add(exp.saturating_sub(*iat) / 2) {
                return Ok(token.clone());
            }
        }
        let token = match self.session.lock().await.as_mut() {
            Some(session) => session.mint_jwt(entry_id, audience).await?,
            None => return Err(NodeError::Away),
        };
        let exp = jwt_claims(&token).and_then(|c| c["exp"].as_i64()).unwrap_or(now);
        let mut cache = self.jwt_cache.lock().await;
        // Audiences are chosen by workloads: drop expired tokens so the cache cannot grow
        // without bound.
        cache.retain(|_, (_, _, e)| *e > now);
        cache.insert(key, (token.clone(), now, exp));
        Ok(token)
    }
}

/// What the Workload API serves from.
impl IdentitySource for Manager {
    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        Manager::subscribe(self)
    }

    fn current(&self) -> Arc<Snapshot> {
        Manager::current(self)
    }

    fn jwt<'a>(&'a self, entry_id: &'a str, audience: &'a [String]) -> JwtFuture<'a> {
        Box::pin(async move { Manager::jwt(self, entry_id, audience).await.map_err(Into::into) })
    }
}

// ---- For the node tunnel (agent/src/tunnel): the node's credential and its registry call.
impl Manager {
    /// The node SVID and key the node holds now (None before the server was first
    /// reached): the tunnel proves with it which node a workload's tunnel comes from.
    pub async fn node_svid(&self) -> Option<X509Svid> {
        self.session.lock().await.as_ref().map(|s| s.node_svid.clone())
    }

    /// Registers the node's tunnel with the server and learns the other nodes' tunnels.
    pub async fn sync_tunnels(&self, req: node::TunnelSyncRequest) -> Result<node::TunnelSyncResponse, NodeError> {
        match self.session.lock().await.as_mut() {
            Some(session) => session.sync_tunnels(req).await,
            None => Err(NodeError::Away),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_of_the_node_withdraw_its_identities() {
        use tether_proto::refusal::NodeRefusal;
        assert!(node_refused(&NodeRefusal::Revoked.status("node revoked: quote: nonce mismatch")));
        assert!(node_refused(&NodeRefusal::NotAnAgent.status("spiffe://td/n is not an attested agent")));
        assert!(node_refused(&NodeRefusal::EvidenceTooOld.status("last TPM quote is 4000 s old")));
        // The same words without the code are one request refused, not the node.
        assert!(!node_refused(&tonic::Status::permission_denied("node revoked: spiffe://td/n may not request x")));
        assert!(!node_refused(&tonic::Status::unavailable("node revoked: server down")));
    }
}

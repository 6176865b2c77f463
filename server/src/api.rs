//! The node API (agents, TLS) and the admin API (operators, local socket).

use std::{collections::BTreeMap, sync::Arc};

use tether_attestors::{is_subset, join_token, tpm::binding::BoundKey, Selector, SpiffeId};
use tether_proto::{admin, node, refusal::NodeRefusal};
use tokio::sync::RwLock;
use tonic::{Request, Response, Status};
use x509_parser::prelude::*;

use crate::{
    ca::{CaError, CaState, SvidRequest},
    config::ServerConfig,
    store::{self, Agent, Entry, Store, StoreError, TpmRegistration},
    tpm::{challenges::Source, TpmAttestor, TpmError, ATTESTOR as TPM},
};

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Shared by both APIs.
pub struct State {
    pub config: ServerConfig,
    pub store: Store,
    pub ca: RwLock<CaState>,
    /// Fault injection for tests (TETHER_FAULT_ATTEST_DELAY_MS): a pause inside the attestation
    /// transaction, so a test can kill the server mid-request and check nothing was written.
    pub fault_attest_delay: Option<std::time::Duration>,
    /// TPM node attestation, when `[tpm]` is configured.
    pub tpm: Option<TpmAttestor>,
}

impl From<TpmError> for Status {
    fn from(e: TpmError) -> Self {
        match e {
            TpmError::Malformed { .. } | TpmError::Binding(_) => Status::invalid_argument(e.to_string()),
            TpmError::TooManyChallenges { .. } => Status::resource_exhausted(e.to_string()),
            TpmError::Policy(_) | TpmError::CaStore(_) | TpmError::Credential(_) => Status::internal(e.to_string()),
            _ => Status::permission_denied(e.to_string()),
        }
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(_) => Status::invalid_argument(e.to_string()),
            StoreError::Duplicate(_) => Status::already_exists(e.to_string()),
            StoreError::NoEntry(_) | StoreError::NoAgent(_) => Status::not_found(e.to_string()),
            StoreError::BadToken => Status::permission_denied(e.to_string()),
            StoreError::Banned(_) | StoreError::Refused(_) | StoreError::Reserved(_) => {
                Status::permission_denied(e.to_string())
            }
            StoreError::Db(_) | StoreError::Corrupt(_) => Status::internal(e.to_string()),
        }
    }
}

impl From<CaError> for Status {
    fn from(e: CaError) -> Self {
        match e {
            CaError::BadCsr(_) => Status::invalid_argument(e.to_string()),
            _ => Status::internal(e.to_string()),
        }
    }
}

impl State {
    pub async fn bundle(&self) -> Result<node::Bundle, Status> {
        let ca = self.ca.read().await;
        let refresh = self.config.ca_ttl_seconds / 12;
        Ok(node::Bundle {
            trust_domain: self.config.trust_domain.clone(),
            x509_authorities: ca.x509_authorities(),
            jwks: ca.bundle_jwks(refresh)?.to_string().into_bytes(),
            sequence: ca.sequence,
            refresh_hint_seconds: refresh,
        })
    }
}

pub fn entry_to_proto(e: &Entry) -> node::Entry {
    node::Entry {
        id: e.id.clone(),
        spiffe_id: e.spiffe_id.to_string(),
        parent_id: e.parent_id.to_string(),
        selectors: e.selectors.iter().map(ToString::to_string).collect(),
        x509_ttl_seconds: e.x509_ttl,
        jwt_ttl_seconds: e.jwt_ttl,
        dns_names: e.dns_names.clone(),
        hint: e.hint.clone(),
        admin: e.admin,
        namespace: e.namespace.clone(),
        labels: e.labels.clone().into_iter().collect(),
        revision: e.revision,
    }
}

pub fn entry_from_proto(p: node::Entry) -> Result<Entry, Status> {
    let bad = |what: &str, e: &dyn std::fmt::Display| Status::invalid_argument(format!("{what}: {e}"));
    Ok(Entry {
        id: p.id,
        spiffe_id: SpiffeId::parse(&p.spiffe_id).map_err(|e| bad("spiffe_id", &e))?,
        parent_id: SpiffeId::parse(&p.parent_id).map_err(|e| bad("parent_id", &e))?,
        selectors: p
            .selectors
            .iter()
            .map(|s| Selector::parse(s))
            .collect::<Result<_, _>>()
            .map_err(|e| bad("selector", &e))?,
        x509_ttl: p.x509_ttl_seconds,
        jwt_ttl: p.jwt_ttl_seconds,
        dns_names: p.dns_names,
        hint: p.hint,
        admin: p.admin,
        namespace: if p.namespace.is_empty() { "default".into() } else { p.namespace },
        labels: p.labels.into_iter().collect::<BTreeMap<_, _>>(),
        revision: 0,
    })
}

/// The SPIFFE ID in the URI SAN of a DER certificate.
pub fn cert_spiffe_id(der: &[u8]) -> Option<SpiffeId> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => SpiffeId::parse(u).ok(),
        _ => None,
    })
}

fn not_after(der: &[u8]) -> i64 {
    X509Certificate::from_der(der).map(|(_, c)| c.validity().not_after.timestamp()).unwrap_or(0)
}

pub struct NodeService(pub Arc<State>);

/// The caller's TLS client certificate (its node SVID), DER.
fn client_leaf<T>(req: &Request<T>) -> Result<Vec<u8>, Status> {
    let certs =
        req.peer_certs().ok_or_else(|| Status::unauthenticated("a node SVID (TLS client certificate) is required"))?;
    certs.first().map(|c| c.to_vec()).ok_or_else(|| Status::unauthenticated("no client certificate"))
}

impl NodeService {
    /// The calling node, from its TLS client certificate (verified against the bundle during
    /// the handshake); it must still be a registered agent.
    fn caller<T>(&self, req: &Request<T>) -> Result<Agent, Status> {
        let leaf = client_leaf(req)?;
        let id = cert_spiffe_id(&leaf).ok_or_else(|| Status::unauthenticated("client certificate has no SPIFFE ID"))?;
        let agent = self.0.store.get_agent(&id).map_err(|_| {
            NodeRefusal::NotAnAgent.status(format!("{id} is not an attested agent (evicted or revoked?)"))
        })?;
        if agent.attestor == TPM {
            self.check_evidence_age(&agent)?;
        }
        Ok(agent)
    }

    /// A TPM node that stopped re-attesting is not served on old evidence.
    fn check_evidence_age(&self, agent: &Agent) -> Result<(), Status> {
        let s = &self.0;
        let max_age = match s.config.tpm.as_ref().map(|t| t.max_evidence_age_seconds) {
            Some(a) if a > 0 => a,
            _ => s.config.node_svid_ttl_seconds,
        };
        let node = s
            .store
            .tpm_node(&agent.spiffe_id)?
            .ok_or_else(|| NodeRefusal::NoTpmRecord.status(format!("{} has no TPM record", agent.spiffe_id)))?;
        if node.quoted_at + max_age < now() {
            return Err(NodeRefusal::EvidenceTooOld.status(format!(
                "{}: last TPM quote is {} s old (limit {max_age} s): re-attest",
                agent.spiffe_id,
                now() - node.quoted_at
            )));
        }
        Ok(())
    }

    /// The IDs entries for this node may have as parent: the node's own, and every node
    /// alias (an entry parented by the server whose selectors the node's attestation
    /// produced, e.g. `tpm:policy:image-2026-11`) it matches.
    pub(crate) fn parents(&self, node: &Agent) -> Result<Vec<SpiffeId>, Status> {
        let server = SpiffeId::from_parts(&self.0.config.trust_domain, &["tether", "server"])
            .map_err(|e| Status::internal(e.to_string()))?;
        let node_selectors: Vec<Selector> = node.selectors.iter().filter_map(|s| Selector::parse(s).ok()).collect();
        let mut parents = vec![node.spiffe_id.clone()];
        for alias in self.0.store.list_entries(None, Some(&server.to_string()))? {
            if is_subset(&alias.selectors, &node_selectors) && !parents.contains(&alias.spiffe_id) {
                parents.push(alias.spiffe_id);
            }
        }
        Ok(parents)
    }

    fn entry_for(&self, node: &Agent, parents: &[SpiffeId], entry_id: &str) -> Result<Entry, Status> {
        let entry = self
            .0
            .store
            .get_entry(entry_id)
            .map_err(|_| Status::permission_denied(format!("entry {entry_id:?} is not one this node may serve")))?;
        if !parents.contains(&entry.parent_id) {
            return Err(Status::permission_denied(format!(
                "{} may not request {} (entry {entry_id})",
                node.spiffe_id, entry.spiffe_id
            )));
        }
        Ok(entry)
    }

    async fn attest_tpm(&self, req: node::AttestRequest) -> Result<Response<node::AttestResponse>, Status> {
        let s = &self.0;
        let store = &s.store;
        let attested = self
            .tpm()?
            .finish(&s.config.trust_domain, &req.challenge_id, &req.payload, &req.csr, |ek_hash| {
                store.tpm_by_ek(ek_hash).ok().flatten().map(|n| n.clock)
            })
            .inspect_err(|e| tracing::warn!(reason = %e, "TPM attestation refused"))?;
        let selectors: Vec<String> = attested.selectors.iter().map(ToString::to_string).collect();
        let ca = s.ca.read().await;
        let now = now();
        let ttl = s.config.node_svid_ttl_seconds;
        let chain = store
            .attest_with_tpm(
                &TpmRegistration {
                    id: &attested.node_id,
                    ek_hash: &attested.ek_hash,
                    ak: &attested.ak,
                    quote: &attested.quote,
                    selectors: &selectors,
                },
                now,
                || {
                    let chain = ca
                        .sign_x509_svid(
                            &req.csr,
                            &SvidRequest { spiffe_id: &attested.node_id, ttl, dns_names: &[] },
                            now,
                        )
                        .map_err(|e| StoreError::Invalid(e.to_string()))?;
                    let exp = not_after(&chain[0]);
                    Ok((chain, exp))
                },
            )
            .inspect_err(|e| tracing::warn!(node = %attested.node_id, reason = %e, "TPM attestation refused"))?;
        drop(ca);
        tracing::info!(node = %attested.node_id, selectors = ?selectors, "node attested with its TPM");
        Ok(Response::new(node::AttestResponse {
            node_id: attested.node_id.to_string(),
            svid_chain: chain.concat(),
            bundle: Some(s.bundle().await?),
            node_selectors: selectors,
        }))
    }

    fn tpm(&self) -> Result<&TpmAttestor, Status> {
        self.0.tpm.as_ref().ok_or_else(|| Status::failed_precondition("this server has no [tpm] configuration"))
    }

    /// Verifies a re-attestation whose quote covers `bound`; failing evidence revokes the
    /// node (logged with the reason).
    fn reattest_node(
        &self,
        agent: &Agent,
        challenge_id: &str,
        evidence: &[u8],
        bound: BoundKey<'_>,
    ) -> Result<Vec<String>, Status> {
        let s = &self.0;
        let id = &agent.spiffe_id;
        let node = s.store.tpm_node(id)?.ok_or_else(|| Status::permission_denied(format!("{id} has no TPM record")))?;
        let outcome = self
            .tpm()?
            .finish_again(id, challenge_id, evidence, bound, &node.ak, node.clock)
            .map_err(Status::from)
            .and_then(|(matched, quote)| {
                let mut selectors: Vec<String> =
                    agent.selectors.iter().filter(|sel| !sel.starts_with("tpm:policy:")).cloned().collect();
                selectors.extend(matched.iter().map(|m| format!("tpm:policy:{m}")));
                s.store.record_quote(id, &quote, &selectors, now())?;
                Ok(selectors)
            });
        match outcome {
            Ok(selectors) => {
                tracing::info!(node = %id, "TPM re-attestation passed");
                Ok(selectors)
            }
            Err(status) if status.code() == tonic::Code::PermissionDenied => {
                tracing::error!(node = %id, reason = status.message(), "TPM re-attestation failed: node revoked");
                s.store.revoke_tpm(id, status.message())?;
                Err(NodeRefusal::Revoked.status(format!("node revoked: {}", status.message())))
            }
            Err(status) => Err(status),
        }
    }
}

#[tonic::async_trait]
impl node::node_server::Node for NodeService {
    async fn begin_attestation(
        &self,
        req: Request<node::BeginAttestationRequest>,
    ) -> Result<Response<node::Challenge>, Status> {
        // Challenges are limited per source address (see tpm::challenges).
        let source = Source::from(req.remote_addr());
        let req = req.into_inner();
        if req.attestor != TPM {
            return Err(Status::invalid_argument(format!("attestor {:?} takes no challenge", req.attestor)));
        }
        let store = &self.0.store;
        let td = &self.0.config.trust_domain;
        let (challenge_id, payload) =
            self.tpm()?.begin(td, &req.payload, source, now(), |id| store.is_banned(id)).inspect_err(|e| {
                tracing::warn!(source = %source, reason = %e, "TPM attestation refused");
            })?;
        Ok(Response::new(node::Challenge { challenge_id, payload }))
    }

    async fn begin_reattestation(
        &self,
        req: Request<node::BeginReattestationRequest>,
    ) -> Result<Response<node::Challenge>, Status> {
        let agent = self.caller(&req)?;
        if agent.attestor != TPM {
            return Err(Status::failed_precondition(format!("{} was not attested with evidence", agent.spiffe_id)));
        }
        let (challenge_id, payload) = self.tpm()?.begin_again(&agent.spiffe_id)?;
        Ok(Response::new(node::Challenge { challenge_id, payload }))
    }

    async fn reattest(&self, req: Request<node::ReattestRequest>) -> Result<Response<node::ReattestResponse>, Status> {
        let agent = self.caller(&req)?;
        // Nothing is issued: the quote covers the node SVID this channel authenticated with.
        let leaf = client_leaf(&req)?;
        let req = req.into_inner();
        let node_selectors =
            self.reattest_node(&agent, &req.challenge_id, &req.evidence, BoundKey::Certificate(&leaf))?;
        Ok(Response::new(node::ReattestResponse { node_selectors }))
    }

    async fn attest(&self, req: Request<node::AttestRequest>) -> Result<Response<node::AttestResponse>, Status> {
        let req = req.into_inner();
        if req.attestor == TPM {
            return self.attest_tpm(req).await;
        }
        if req.attestor != join_token::ATTESTOR {
            return Err(Status::invalid_argument(format!("unknown attestor {:?}", req.attestor)));
        }
        let token = String::from_utf8(req.payload).map_err(|_| Status::invalid_argument("join token is not UTF-8"))?;
        let s = &self.0;
        let default_id =
            join_token::default_node_id(&s.config.trust_domain, &token).map_err(|e| Status::internal(e.to_string()))?;
        let ca = s.ca.read().await;
        let now = now();
        let ttl = s.config.node_svid_ttl_seconds;
        let (node_id, chain) = s.store.attest_with_token(&join_token::digest(&token), now, default_id, |id| {
            if let Some(delay) = s.fault_attest_delay {
                std::thread::sleep(delay);
            }
            let chain = ca
                .sign_x509_svid(&req.csr, &SvidRequest { spiffe_id: id, ttl, dns_names: &[] }, now)
                .map_err(|e| StoreError::Invalid(e.to_string()))?;
            let exp = not_after(&chain[0]);
            Ok((chain, exp))
        })?;
        drop(ca);
        tracing::info!(node = %node_id, "node attested with a join token");
        let agent = s.store.get_agent(&node_id)?;
        Ok(Response::new(node::AttestResponse {
            node_id: node_id.to_string(),
            svid_chain: chain.concat(),
            bundle: Some(s.bundle().await?),
            node_selectors: agent.selectors,
        }))
    }

    async fn renew_node_svid(&self, req: Request<node::RenewRequest>) -> Result<Response<node::RenewResponse>, Status> {
        let agent = self.caller(&req)?;
        let req = req.into_inner();
        if agent.attestor == TPM {
            if req.challenge_id.is_empty() {
                return Err(Status::failed_precondition("TPM nodes renew with fresh evidence (BeginReattestation)"));
            }
            self.reattest_node(&agent, &req.challenge_id, &req.evidence, BoundKey::Csr(&req.csr))?;
        }
        let id = agent.spiffe_id;
        let s = &self.0;
        let now = now();
        let chain = s.ca.read().await.sign_x509_svid(
            &req.csr,
            &SvidRequest { spiffe_id: &id, ttl: s.config.node_svid_ttl_seconds, dns_names: &[] },
            now,
        )?;
        s.store.renew_agent(&id, not_after(&chain[0]))?;
        Ok(Response::new(node::RenewResponse { svid_chain: chain.concat(), bundle: Some(s.bundle().await?) }))
    }

    async fn sync_entries(&self, req: Request<node::SyncRequest>) -> Result<Response<node::SyncResponse>, Status> {
        let agent = self.caller(&req)?;
        let mut entries = Vec::new();
        for parent in self.parents(&agent)? {
            entries.extend(self.0.store.list_entries(None, Some(&parent.to_string()))?);
        }
        Ok(Response::new(node::SyncResponse {
            entries: entries.iter().map(entry_to_proto).collect(),
            bundle: Some(self.0.bundle().await?),
        }))
    }

    async fn sign_x509_svids(&self, req: Request<node::SignRequest>) -> Result<Response<node::SignResponse>, Status> {
        let agent = self.caller(&req)?;
        let parents = self.parents(&agent)?;
        let s = &self.0;
        let now = now();
        let csrs = req.into_inner().csrs;
        // Authorise every request before signing any: all or nothing.
        let entries =
            csrs.iter().map(|c| self.entry_for(&agent, &parents, &c.entry_id)).collect::<Result<Vec<_>, _>>()?;
        let ca = s.ca.read().await;
        let mut svids = Vec::with_capacity(csrs.len());
        for (csr, entry) in csrs.iter().zip(&entries) {
            let ttl = if entry.x509_ttl > 0 { entry.x509_ttl } else { s.config.default_x509_svid_ttl_seconds };
            let chain = ca
                .sign_x509_svid(
                    &csr.csr,
                    &SvidRequest { spiffe_id: &entry.spiffe_id, ttl, dns_names: &entry.dns_names },
                    now,
                )
                .map_err(|e| Status::invalid_argument(format!("entry {}: {e}", entry.id)))?;
            svids.push(node::sign_response::Svid { entry_id: entry.id.clone(), svid_chain: chain.concat() });
        }
        Ok(Response::new(node::SignResponse { svids }))
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<node::MintJwtRequest>,
    ) -> Result<Response<node::MintJwtResponse>, Status> {
        let agent = self.caller(&req)?;
        let req = req.into_inner();
        if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("at least one non-empty audience is required"));
        }
        let parents = self.parents(&agent)?;
        let entry = self.entry_for(&agent, &parents, &req.entry_id)?;
        let ttl = if entry.jwt_ttl > 0 { entry.jwt_ttl } else { self.0.config.default_jwt_svid_ttl_seconds };
        let token = self.0.ca.read().await.mint_jwt(&entry.spiffe_id, &req.audience, ttl, now())?;
        Ok(Response::new(node::MintJwtResponse { token }))
    }

    async fn sync_tunnels(
        &self,
        req: Request<node::TunnelSyncRequest>,
    ) -> Result<Response<node::TunnelSyncResponse>, Status> {
        let agent = self.caller(&req)?;
        Ok(Response::new(crate::tunnel::sync(self, &agent, req.get_ref())?))
    }
}

pub struct AdminService(pub Arc<State>);

/// `spiffe://<td>/tether/...` is the server's and its agents' (see `store::reserved`): the
/// admin API refuses it before the store does, and says so in the audit log.
fn refuse_reserved(id: &SpiffeId, what: &'static str) -> Result<(), Status> {
    if store::reserved(id) {
        tracing::warn!(spiffe_id = %id, what, "refused: reserved SPIFFE ID");
        return Err(StoreError::Reserved(id.to_string()).into());
    }
    Ok(())
}

#[tonic::async_trait]
impl admin::admin_server::Admin for AdminService {
    async fn create_entry(&self, req: Request<node::Entry>) -> Result<Response<node::Entry>, Status> {
        let e = entry_from_proto(req.into_inner())?;
        refuse_reserved(&e.spiffe_id, "entry")?;
        let e = self.0.store.create_entry(e, &self.0.config.trust_domain)?;
        tracing::info!(entry = %e.id, spiffe_id = %e.spiffe_id, "entry created");
        Ok(Response::new(entry_to_proto(&e)))
    }

    async fn update_entry(&self, req: Request<node::Entry>) -> Result<Response<node::Entry>, Status> {
        let e = entry_from_proto(req.into_inner())?;
        refuse_reserved(&e.spiffe_id, "entry")?;
        let e = self.0.store.update_entry(e, &self.0.config.trust_domain)?;
        Ok(Response::new(entry_to_proto(&e)))
    }

    async fn delete_entry(&self, req: Request<admin::EntryId>) -> Result<Response<admin::Empty>, Status> {
        self.0.store.delete_entry(&req.into_inner().id)?;
        Ok(Response::new(admin::Empty {}))
    }

    async fn list_entries(
        &self,
        req: Request<admin::ListEntriesRequest>,
    ) -> Result<Response<admin::ListEntriesResponse>, Status> {
        let r = req.into_inner();
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let entries = self.0.store.list_entries(opt(&r.spiffe_id).as_deref(), opt(&r.parent_id).as_deref())?;
        Ok(Response::new(admin::ListEntriesResponse { entries: entries.iter().map(entry_to_proto).collect() }))
    }

    async fn create_join_token(
        &self,
        req: Request<admin::CreateJoinTokenRequest>,
    ) -> Result<Response<admin::JoinToken>, Status> {
        let r = req.into_inner();
        if r.ttl_seconds <= 0 {
            return Err(Status::invalid_argument("ttl_seconds must be positive"));
        }
        let node_id = if r.node_id.is_empty() {
            None
        } else {
            let id = SpiffeId::parse(&r.node_id).map_err(|e| Status::invalid_argument(format!("node_id: {e}")))?;
            if id.trust_domain() != self.0.config.trust_domain || id.is_trust_domain_id() {
                return Err(Status::invalid_argument(format!(
                    "node_id {id} must be a path in trust domain {}",
                    self.0.config.trust_domain
                )));
            }
            // A node named /tether/server could pose as the server to other agents.
            refuse_reserved(&id, "join token")?;
            Some(id)
        };
        let token = join_token::generate().map_err(|e| Status::internal(e.to_string()))?;
        let expires_at = now() + r.ttl_seconds;
        self.0.store.create_join_token(&join_token::digest(&token), expires_at, node_id.as_ref())?;
        Ok(Response::new(admin::JoinToken { token, expires_at_unix: expires_at }))
    }

    async fn get_bundle(&self, _: Request<admin::Empty>) -> Result<Response<node::Bundle>, Status> {
        Ok(Response::new(self.0.bundle().await?))
    }

    async fn list_agents(&self, _: Request<admin::Empty>) -> Result<Response<admin::ListAgentsResponse>, Status> {
        let agents = self.0.store.list_agents()?;
        Ok(Response::new(admin::ListAgentsResponse {
            agents: agents
                .into_iter()
                .map(|a| admin::Agent {
                    spiffe_id: a.spiffe_id.to_string(),
                    attestor: a.attestor,
                    attested_at_unix: a.attested_at,
                    svid_expires_at_unix: a.svid_expires_at,
                    selectors: a.selectors,
                })
                .collect(),
        }))
    }

    async fn evict_agent(&self, req: Request<admin::AgentId>) -> Result<Response<admin::Empty>, Status> {
        let r = req.into_inner();
        // A TPM node can be named by its EK hash (the selector form): its ID derives from it.
        let id = match r.spiffe_id.strip_prefix("tpm:ek-hash:") {
            Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                crate::tpm::node_id(&self.0.config.trust_domain, &h.to_ascii_lowercase())
                    .ok_or_else(|| Status::invalid_argument("bad EK hash"))?
            }
            Some(_) => return Err(Status::invalid_argument("tpm:ek-hash: takes 64 hex digits (SHA-256)")),
            None => SpiffeId::parse(&r.spiffe_id).map_err(|e| Status::invalid_argument(e.to_string()))?,
        };
        self.0.store.evict_agent(&id, r.ban)?;
        tracing::warn!(node = %id, ban = r.ban, "agent evicted");
        Ok(Response::new(admin::Empty {}))
    }
}

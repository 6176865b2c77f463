//! The agent's side of the node API: attestation, node SVID renewal, entry sync, signing.

use std::path::Path;

use tether_attestors::{join_token, tpm::binding::BoundKey};
use tether_proto::node::{self, node_client::NodeClient};
use tonic::transport::{Channel, Endpoint};

use crate::{
    config::AgentConfig,
    identity::Bundle,
    svid::{new_key, now, SvidError, X509Svid},
    tpm::NodeTpm,
};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("connecting to the server at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("node API TLS: {0}")]
    Tls(String),
    #[error("server refused: {0}")]
    Status(#[from] tonic::Status),
    #[error("{0}")]
    Svid(#[from] SvidError),
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no node SVID on disk and no join_token or [tpm] in the config: cannot attest")]
    NoCredential,
    #[error("TPM: {0}")]
    Tpm(#[from] crate::tpm::TpmError),
    #[error("the server answered without a bundle")]
    NoBundle,
    #[error("the server has not been reached since the agent started (JWT-SVIDs are minted there)")]
    Away,
}

/// The bundle the server sent with an answer (every answer that changes the node's state
/// carries one).
fn bundle_of(b: Option<node::Bundle>) -> Result<Bundle, NodeError> {
    b.map(Bundle::from).ok_or(NodeError::NoBundle)
}

/// How long a TCP connection and TLS handshake to the node API may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// An mTLS channel to the node API: the server must present `spiffe://<td>/tether/server`
/// (or `server_spiffe_id`) under `roots` ([`crate::server_tls`]).
async fn channel(config: &AgentConfig, roots: &[Vec<u8>], identity: Option<&X509Svid>) -> Result<Channel, NodeError> {
    let addr = config.server_address.clone();
    let expected = config.server_id().map_err(|e| NodeError::Tls(e.to_string()))?;
    let tls = crate::server_tls::client_config(
        roots,
        &expected,
        identity.map(|svid| (svid.chain.as_slice(), svid.key_pkcs8.as_slice())),
    )
    .map_err(|e| NodeError::Tls(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let sni = rustls::pki_types::ServerName::try_from(config.server_name.clone())
        .map_err(|e| NodeError::Tls(format!("server_name {:?}: {e}", config.server_name)))?;
    let target = addr.clone();
    let connect = tower::service_fn(move |_: http::Uri| {
        let (connector, sni, target) = (connector.clone(), sni.clone(), target.clone());
        async move {
            // A server that never answers must not hold the agent (its Workload API serves
            // meanwhile, but start-up and retries wait on this).
            let handshake = async {
                let tcp = tokio::net::TcpStream::connect(&target).await?;
                tcp.set_nodelay(true)?;
                connector.connect(sni, tcp).await
            };
            let tls = tokio::time::timeout(CONNECT_TIMEOUT, handshake).await.map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no TLS session within {CONNECT_TIMEOUT:?}"))
            })??;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    // The scheme is http: TLS is the connector's, with the verifier above.
    let uri = format!("http://{addr}");
    let err = |source: tonic::transport::Error| NodeError::Connect { addr: addr.clone(), reason: chain(&source) };
    Endpoint::from_shared(uri).map_err(err)?.connect_with_connector(connect).await.map_err(err)
}

/// An error and its sources, one line (a refused server certificate sits three deep).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        next = cause.source();
    }
    s
}

/// A node attested to the server, holding its node SVID.
pub struct NodeSession {
    pub node_svid: X509Svid,
    pub bundle: Bundle,
    pub node_selectors: Vec<String>,
    client: NodeClient<Channel>,
    /// Present when the node attests with its TPM: every renewal carries a fresh quote.
    tpm: Option<NodeTpm>,
}

/// The largest node API answer the agent accepts. An entry sync carries the node's whole
/// entry set in one message, about 200 bytes an entry with a sha256 selector: tonic's default
/// of 4 MiB would stop a node at some 20,000 entries, 64 MiB at some 300,000. Signing goes in
/// batches of [`SIGN_BATCH`], so its answers stay far below either.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// CSRs per signing request. One request for every due SVID made a 5 MB answer at 9,000
/// entries (a signed chain is about 550 bytes), past tonic's 4 MiB limit: the node then never
/// got an SVID for any of them.
pub const SIGN_BATCH: usize = 1000;

fn node_client(channel: Channel) -> NodeClient<Channel> {
    NodeClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// Whether an error means the server could not be reached (retry later), rather than that
/// it answered and refused.
pub fn unreachable(e: &NodeError) -> bool {
    match e {
        NodeError::Connect { .. } | NodeError::Away => true,
        NodeError::Status(s) => {
            matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled)
        }
        _ => false,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, NodeError> {
    std::fs::read(path).map_err(|source| NodeError::Io { path: path.display().to_string(), source })
}

/// The DER certificates of a PEM bundle file.
fn pem_roots(path: &Path) -> Result<Vec<Vec<u8>>, NodeError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let text = read(path)?;
    let roots = CertificateDer::pem_slice_iter(&text)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NodeError::Tls(format!("{}: {e}", path.display())))?;
    if roots.is_empty() {
        return Err(NodeError::Tls(format!("{}: no CERTIFICATE in it", path.display())));
    }
    Ok(roots)
}

fn save_node_svid(dir: &Path, svid: &X509Svid) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for (name, data) in [("node-svid.der", svid.chain.concat()), ("node-key.der", svid.key_pkcs8.clone())] {
        let tmp = dir.join(format!("{name}.tmp"));
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        std::io::Write::write_all(&mut f, &data)?;
        std::fs::rename(&tmp, dir.join(name))?;
    }
    Ok(())
}

/// The stored node SVID, if it is still valid for 30 s.
pub fn load_node_svid(dir: &Path) -> Option<X509Svid> {
    let path = dir.join("node-svid.der");
    let chain = std::fs::read(&path).ok()?;
    let key = std::fs::read(dir.join("node-key.der")).ok()?;
    let pair = rcgen::KeyPair::try_from(key.as_slice()).ok()?;
    // Received when it was written.
    let saved = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(now(), |d| d.as_secs() as i64);
    let svid = X509Svid::received_at(&pair, &chain, saved).ok()?;
    (svid.not_after > now() + 30).then_some(svid)
}

impl NodeSession {
    /// Reuses a valid node SVID from `data_dir`, else attests with the join token.
    pub async fn establish(config: &AgentConfig) -> Result<Self, NodeError> {
        let tpm = match &config.tpm {
            Some(t) => Some(NodeTpm::open(t, &config.data_dir.join("tpm")).await?),
            None => None,
        };
        Self::establish_with(config, tpm).await
    }

    /// As [`NodeSession::establish`], with the node's TPM already open. The server is
    /// trusted with the latest bundle it sent (kept in `data_dir`), else with the bootstrap
    /// bundle file.
    pub async fn establish_with(config: &AgentConfig, tpm: Option<NodeTpm>) -> Result<Self, NodeError> {
        let roots = match crate::persist::load_bundle(&config.data_dir, &config.trust_domain) {
            Some(b) => b.x509_authorities,
            None => pem_roots(&config.trust_bundle_path)?,
        };
        // A TPM node proves its state on every start: a stored node SVID is not enough.
        if let Some(svid) = load_node_svid(&config.data_dir).filter(|_| tpm.is_none()) {
            let mut session = NodeSession {
                client: node_client(channel(config, &roots, Some(&svid)).await?),
                node_svid: svid,
                bundle: Bundle::default(),
                node_selectors: vec![],
                tpm: None,
            };
            match session.sync().await {
                Ok(_) => {
                    tracing::info!(node = %session.node_svid.spiffe_id, "resumed with the stored node SVID");
                    return Ok(session);
                }
                Err(e) => tracing::warn!("stored node SVID not accepted ({e}); attesting again"),
            }
        }
        let pending = new_key()?;
        let mut client = node_client(channel(config, &roots, None).await?);
        let request = match &tpm {
            Some(t) => {
                let challenge = client
                    .begin_attestation(node::BeginAttestationRequest {
                        attestor: "tpm".into(),
                        payload: t.hello().await?,
                    })
                    .await?
                    .into_inner();
                node::AttestRequest {
                    attestor: "tpm".into(),
                    payload: t.answer(&challenge.payload, BoundKey::Csr(&pending.csr_der)).await?,
                    csr: pending.csr_der,
                    challenge_id: challenge.challenge_id,
                }
            }
            None => {
                let token = config.join_token.as_deref().ok_or(NodeError::NoCredential)?;
                node::AttestRequest {
                    attestor: join_token::ATTESTOR.into(),
                    payload: token.as_bytes().to_vec(),
                    csr: pending.csr_der,
                    challenge_id: String::new(),
                }
            }
        };
        let resp = client.attest(request).await?.into_inner();
        let node_svid = X509Svid::new(&pending.key, &resp.svid_chain)?;
        let bundle = bundle_of(resp.bundle)?;
        if let Err(e) = save_node_svid(&config.data_dir, &node_svid) {
            tracing::warn!("node SVID not persisted: {e}");
        }
        tracing::info!(node = %node_svid.spiffe_id, selectors = ?resp.node_selectors, "node attested");
        let client = node_client(channel(config, &bundle.x509_authorities, Some(&node_svid)).await?);
        Ok(NodeSession { node_svid, bundle, node_selectors: resp.node_selectors, client, tpm })
    }

    /// The node's TPM, when it attests with one.
    pub fn tpm(&self) -> Option<&NodeTpm> {
        self.tpm.as_ref()
    }

    /// Attests from scratch with the same TPM (after the server revoked the node).
    pub async fn reestablish(&mut self, config: &AgentConfig) -> Result<(), NodeError> {
        *self = Self::establish_with(config, self.tpm.clone()).await?;
        Ok(())
    }

    pub fn uses_tpm(&self) -> bool {
        self.tpm.is_some()
    }

    /// A fresh challenge answered with fresh evidence covering the CSR `csr`, or without one
    /// the node SVID this channel authenticates with: (challenge id, evidence).
    async fn evidence(&mut self, csr: Option<&[u8]>) -> Result<Option<(String, Vec<u8>)>, NodeError> {
        let Some(t) = &self.tpm else { return Ok(None) };
        let c = self.client.begin_reattestation(node::BeginReattestationRequest {}).await?.into_inner();
        let bound = match csr {
            Some(csr) => BoundKey::Csr(csr),
            None => BoundKey::Certificate(self.node_svid.chain.first().map_or(&[][..], Vec::as_slice)),
        };
        Ok(Some((c.challenge_id, t.answer(&c.payload, bound).await?)))
    }

    /// Re-attests (a fresh quote) without renewing; the server revokes the node if it fails.
    pub async fn reattest(&mut self) -> Result<(), NodeError> {
        let Some((challenge_id, evidence)) = self.evidence(None).await? else { return Ok(()) };
        let resp = self.client.reattest(node::ReattestRequest { challenge_id, evidence }).await?.into_inner();
        self.node_selectors = resp.node_selectors;
        Ok(())
    }

    /// A fresh node SVID (new key), then a new mTLS channel with it. TPM nodes send fresh
    /// evidence with the request.
    pub async fn renew(&mut self, config: &AgentConfig) -> Result<(), NodeError> {
        let pending = new_key()?;
        let (challenge_id, evidence) = self.evidence(Some(&pending.csr_der)).await?.unwrap_or_default();
        let resp = self
            .client
            .renew_node_svid(node::RenewRequest { csr: pending.csr_der, challenge_id, evidence })
            .await?
            .into_inner();
        self.node_svid = X509Svid::new(&pending.key, &resp.svid_chain)?;
        self.bundle = bundle_of(resp.bundle)?;
        if let Err(e) = save_node_svid(&config.data_dir, &self.node_svid) {
            tracing::warn!("node SVID not persisted: {e}");
        }
        self.client = node_client(channel(config, &self.bundle.x509_authorities, Some(&self.node_svid)).await?);
        tracing::info!(not_after = self.node_svid.not_after, "node SVID renewed");
        Ok(())
    }

    pub async fn sync(&mut self) -> Result<Vec<node::Entry>, NodeError> {
        let resp = self.client.sync_entries(node::SyncRequest {}).await?.into_inner();
        self.bundle = bundle_of(resp.bundle)?;
        Ok(resp.entries)
    }

    /// Has the server sign `csrs` (at most [`SIGN_BATCH`] per call; each call is all or
    /// nothing on the server).
    pub async fn sign(&mut self, csrs: Vec<(String, Vec<u8>)>) -> Result<Vec<(String, Vec<u8>)>, NodeError> {
        let req = node::SignRequest {
            csrs: csrs.into_iter().map(|(entry_id, csr)| node::sign_request::Csr { entry_id, csr }).collect(),
        };
        let resp = self.client.sign_x509_svids(req).await?.into_inner();
        Ok(resp.svids.into_iter().map(|s| (s.entry_id, s.svid_chain)).collect())
    }

    pub async fn mint_jwt(&mut self, entry_id: &str, audience: &[String]) -> Result<String, NodeError> {
        let resp = self
            .client
            .mint_jwt_svid(node::MintJwtRequest { entry_id: entry_id.into(), audience: audience.to_vec() })
            .await?
            .into_inner();
        Ok(resp.token)
    }
}

// ---- The node tunnel's registry call (agent/src/tunnel).
impl NodeSession {
    /// Registers this node's tunnel and learns every other attested node's (`SyncTunnels`).
    pub async fn sync_tunnels(&mut self, req: node::TunnelSyncRequest) -> Result<node::TunnelSyncResponse, NodeError> {
        Ok(self.client.sync_tunnels(req).await?.into_inner())
    }
}

//! Starting the server: store, authorities (with their rotation schedule), node API over
//! TLS, admin API on a root-only Unix socket.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration};

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use tether_attestors::{pem, SpiffeId};
use tether_proto::{admin::admin_server::AdminServer, node::node_server::NodeServer};
use tokio::sync::RwLock;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::{
    api::{now, AdminService, NodeService, State},
    ca::{CaState, SvidRequest},
    config::ServerConfig,
    store::Store,
};

/// Opens the store and loads (or creates, on first start) the authorities.
pub fn open_state(config: ServerConfig) -> anyhow::Result<Arc<State>> {
    std::fs::create_dir_all(&config.data_dir)?;
    std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))?;
    let store = match &config.postgres {
        Some(conninfo) => Store::connect_postgres(conninfo)?,
        None => Store::open(&config.data_dir.join("tether.db"))?,
    };
    // Entries under /tether/ are refused on the way in; rows written before that (or behind
    // the server's back) are ignored, and named here.
    for e in store.reserved_entries()? {
        tracing::warn!(
            entry = %e.id,
            spiffe_id = %e.spiffe_id,
            parent_id = %e.parent_id,
            "entry ignored: its SPIFFE ID is reserved for the server and its agents (delete it: tether-server entry delete --id {})",
            e.id
        );
    }
    let upstream = config.upstream(Path::new("(server config)"))?;
    let mut ca = match store.load_ca()? {
        Some(ca) if ca.trust_domain == config.trust_domain => ca,
        Some(ca) => anyhow::bail!(
            "the store belongs to trust domain {} but the config says {}",
            ca.trust_domain,
            config.trust_domain
        ),
        None => {
            let ca = CaState::with_upstream(&config.trust_domain, now(), config.ca_ttl_seconds, upstream.clone())?;
            tracing::info!(trust_domain = %config.trust_domain, upstream = upstream.is_some(), "created the trust domain's first authorities");
            ca
        }
    };
    ca.set_upstream(upstream, now())?;
    ca.rotate(now())?;
    store.save_ca(&ca)?;
    let fault_attest_delay = fault_attest_delay();
    let tpm = match &config.tpm {
        Some(t) => {
            Some(crate::tpm::TpmAttestor::new(t.clone()).map_err(|e| anyhow::anyhow!("[tpm] configuration: {e}"))?)
        }
        None => None,
    };
    Ok(Arc::new(State { config, store, ca: RwLock::new(ca), fault_attest_delay, tpm }))
}

/// Fault injection for the crash tests: a pause inside the attestation transaction, set by
/// TETHER_FAULT_ATTEST_DELAY_MS. Compiled only with the `fault-injection` feature, which only
/// the test crate enables: a server built on its own (`cargo build --release -p
/// tether-server`) cannot be made to stall by its environment.
#[cfg(feature = "fault-injection")]
fn fault_attest_delay() -> Option<Duration> {
    let delay =
        std::env::var("TETHER_FAULT_ATTEST_DELAY_MS").ok().and_then(|v| v.parse().ok()).map(Duration::from_millis);
    if delay.is_some() {
        tracing::warn!(
            "fault injection active: attestation pauses inside its transaction (TETHER_FAULT_ATTEST_DELAY_MS)"
        );
    }
    delay
}

#[cfg(not(feature = "fault-injection"))]
fn fault_attest_delay() -> Option<Duration> {
    None
}

/// The server's own TLS certificate: an SVID for spiffe://<td>/tether/server with the
/// configured DNS names, from the active CA, with a fresh key.
async fn server_identity(state: &State) -> anyhow::Result<(Identity, String)> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    let id = SpiffeId::from_parts(&state.config.trust_domain, &["tether", "server"])?;
    let ca = state.ca.read().await;
    let chain = ca.sign_x509_svid(
        csr.der(),
        &SvidRequest { spiffe_id: &id, ttl: state.config.ca_ttl_seconds, dns_names: &state.config.server_names },
        now(),
    )?;
    let cert_pem = pem::certificates(chain.iter().map(Vec::as_slice));
    let bundle_pem = pem::certificates(ca.x509_authorities().iter().map(Vec::as_slice));
    Ok((Identity::from_pem(cert_pem, key.serialize_pem()), bundle_pem))
}

/// Writes the current bundle as PEM, where agents bootstrap trust from.
pub async fn write_bundle(state: &State) -> anyhow::Result<()> {
    let pem = pem::certificates(state.ca.read().await.x509_authorities().iter().map(Vec::as_slice));
    let path = state.config.data_dir.join("bundle.pem");
    std::fs::write(&path, pem)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}

async fn rotation_loop(state: Arc<State>, changed: tokio::sync::watch::Sender<i64>) {
    let period = Duration::from_secs((state.config.ca_ttl_seconds / 12).clamp(1, 60) as u64);
    loop {
        tokio::time::sleep(period).await;
        let mut ca = state.ca.write().await;
        match ca.rotate(now()) {
            Ok(true) => {
                if let Err(e) = state.store.save_ca(&ca) {
                    tracing::error!("saving rotated authorities: {e}");
                }
                let seq = ca.sequence;
                drop(ca);
                tracing::info!(sequence = seq, "authorities rotated; bundle updated");
                if let Err(e) = write_bundle(&state).await {
                    tracing::error!("writing bundle.pem: {e}");
                }
                let _ = changed.send(seq);
            }
            Ok(false) => {}
            Err(e) => tracing::error!("rotation failed: {e}"),
        }
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    state: Arc<State>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    write_bundle(&state).await?;
    let (changed_tx, mut changed_rx) = tokio::sync::watch::channel(state.ca.read().await.sequence);
    tokio::spawn(rotation_loop(state.clone(), changed_tx));

    // Admin API: a Unix socket only root can open.
    let admin_path = state.config.admin_socket();
    let _ = std::fs::remove_file(&admin_path);
    if let Some(dir) = admin_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let admin_listener = tokio::net::UnixListener::bind(&admin_path)?;
    std::fs::set_permissions(&admin_path, std::fs::Permissions::from_mode(0o600))?;
    let admin = Server::builder()
        .add_service(AdminServer::new(AdminService(state.clone())))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(admin_listener));
    let admin_task = tokio::spawn(admin);
    tracing::info!(socket = %admin_path.display(), "admin API listening");

    // Node API over TLS. The TLS identity and the client CA roots follow the bundle: when
    // the authorities rotate, the listener restarts with the new ones.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let node_state = state.clone();
    let node_task = tokio::spawn(async move {
        loop {
            let (identity, roots) = server_identity(&node_state).await?;
            let tls = ServerTlsConfig::new()
                .identity(identity)
                .client_ca_root(Certificate::from_pem(roots))
                .client_auth_optional(true);
            let mut stop = stop_rx.clone();
            let rotated = {
                let mut rx = changed_rx.clone();
                async move {
                    let _ = rx.changed().await;
                }
            };
            tracing::info!(address = %node_state.config.bind_address, "node API listening (TLS)");
            let stopping = async move {
                tokio::select! {
                    _ = rotated => {},
                    _ = stop.changed() => {},
                }
            };
            Server::builder()
                .tls_config(tls)?
                .add_service(NodeServer::new(NodeService(node_state.clone())))
                .serve_with_shutdown(node_state.config.bind_address, stopping)
                .await?;
            if *stop_rx.borrow() {
                return Ok::<(), anyhow::Error>(());
            }
            changed_rx.borrow_and_update();
        }
    });
    shutdown.await;
    let _ = stop_tx.send(true);
    admin_task.abort();
    let _ = std::fs::remove_file(&admin_path);
    node_task.await??;
    Ok(())
}

/// Convenience for tests and the demo: config from parts, plus extra TOML lines.
pub fn config_for(
    trust_domain: &str,
    data_dir: &Path,
    bind: std::net::SocketAddr,
    extra: &str,
) -> Result<ServerConfig, crate::config::ConfigError> {
    let text = format!(
        "trust_domain = \"{trust_domain}\"\ndata_dir = \"{}\"\nbind_address = \"{bind}\"\n{extra}",
        data_dir.display()
    );
    ServerConfig::parse(&text, Path::new("(generated)"))
}

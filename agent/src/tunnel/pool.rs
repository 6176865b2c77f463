//! Outbound TLS connections to other nodes' tunnels, pooled per (source workload SVID,
//! destination workload, destination node): HTTP/2 connections multiplex the streams
//! between them. The server presents the destination *workload's* SVID, so connections are
//! per destination identity too (as ztunnel's pool is). A source SVID that rotated gets a
//! new connection for new streams; the old one keeps its streams until they end.
//!
//! One connection's TLS and framing run on one core. A key holds up to
//! `connections_per_peer` connections: a stream takes the connection carrying the fewest
//! streams, and a new one is dialled only while every open one carries at least one, so
//! a single stream (or a quiet key) costs one handshake, and concurrent busy streams spread
//! over cores.

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use bytes::Bytes;
use h2::client::SendRequest;
use rustls::pki_types::ServerName;
use tether_proto::hbone;

use super::{tls, Shared};
use crate::svid::X509Svid;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    src: String,
    dst: String,
    endpoint: SocketAddrV4,
}

/// A pooled connection.
pub struct Conn {
    send: SendRequest<Bytes>,
    /// The source SVID's leaf it was made with.
    leaf: Vec<u8>,
    /// The node proof headers for its streams.
    pub proof: (http::HeaderValue, http::HeaderValue),
    pub node: String,
    dead: Arc<AtomicBool>,
    /// Streams using it now (held by [`Slot`]s).
    active: AtomicUsize,
}

/// A stream's claim on a pooled connection, released when dropped.
pub struct Slot(Arc<Conn>);

impl std::ops::Deref for Slot {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Conn {
    fn claim(self: &Arc<Self>) -> Slot {
        self.active.fetch_add(1, Ordering::Relaxed);
        Slot(self.clone())
    }

    pub fn sender(&self) -> SendRequest<Bytes> {
        self.send.clone()
    }

    pub fn mark_dead(&self) {
        self.dead.store(true, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connecting to {0}: timed out")]
    Timeout(SocketAddrV4),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddrV4,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {addr}: {source}")]
    Tls {
        addr: SocketAddrV4,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(#[from] tls::TlsError),
    #[error("HTTP/2 with {addr}: {source}")]
    H2 {
        addr: SocketAddrV4,
        #[source]
        source: h2::Error,
    },
    #[error("the node holds no node SVID to prove itself with")]
    NoNodeSvid,
}

impl DialError {
    /// Nothing answered (as opposed to a refusal): the node counts as down.
    pub fn unreachable(&self) -> bool {
        matches!(self, DialError::Timeout(_) | DialError::Connect { .. })
    }
}

pub struct Pool {
    conns: Mutex<HashMap<Key, Vec<Arc<Conn>>>>,
    /// One dial at a time per key: a burst of streams makes one connection at a time.
    dialing: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    /// Connections per key at most.
    per_key: usize,
}

/// HTTP/2 windows: large enough for a stream to fill a fast link (the default 64 KiB caps
/// a stream near 64 KiB per round trip).
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
pub const MAX_FRAME: u32 = 64 << 10;
/// Streams one connection carries at once.
pub const MAX_STREAMS: u32 = 1000;

impl Pool {
    pub fn new(per_key: usize) -> Pool {
        Pool { conns: Mutex::default(), dialing: Mutex::default(), per_key: per_key.max(1) }
    }

    /// A live connection for (`svid`, `dst`) to `endpoint` of `node`, made if needed (see
    /// the module's text for which), claimed for one stream.
    pub async fn get(
        &self,
        shared: &Shared,
        svid: &X509Svid,
        dst: &str,
        node: &str,
        endpoint: SocketAddrV4,
    ) -> Result<Slot, DialError> {
        let key = Key { src: svid.spiffe_id.to_string(), dst: dst.to_owned(), endpoint };
        let leaf = svid.chain.first().cloned().unwrap_or_default();
        let usable = |c: &Conn| c.leaf == leaf && c.node == node && !c.dead.load(Ordering::Relaxed);
        // The least busy usable connection, claimed, unless it is busy and another may be made.
        let pick = |may_dial: bool| {
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            let list = conns.get_mut(&key)?;
            list.retain(|c| !c.dead.load(Ordering::Relaxed));
            let count = list.iter().filter(|c| usable(c)).count();
            let best = list.iter().filter(|c| usable(c)).min_by_key(|c| c.active.load(Ordering::Relaxed))?;
            if may_dial && best.active.load(Ordering::Relaxed) > 0 && count < self.per_key {
                return None;
            }
            Some(best.claim())
        };
        if let Some(slot) = pick(true) {
            return Ok(slot);
        }
        let gate = self.dialing.lock().unwrap_or_else(|p| p.into_inner()).entry(key.clone()).or_default().clone();
        let _one = gate.lock().await;
        if let Some(slot) = pick(true) {
            return Ok(slot);
        }
        let conn = match dial(shared, svid, dst, node, endpoint).await {
            Ok(c) => Arc::new(c),
            // A busy connection is better than none when another could not be made.
            Err(e) => return pick(false).ok_or(e),
        };
        let slot = conn.claim();
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default().push(conn);
        Ok(slot)
    }

    /// Forgets connections `keep` refuses (their streams go on; no new ones use them).
    pub fn retain(&self, keep: impl Fn(&str, &str, &Conn) -> bool) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for (k, list) in conns.iter_mut() {
            list.retain(|c| keep(&k.src, &k.dst, c));
        }
        conns.retain(|_, list| !list.is_empty());
    }
}

async fn dial(
    shared: &Shared,
    svid: &X509Svid,
    dst: &str,
    node: &str,
    endpoint: SocketAddrV4,
) -> Result<Conn, DialError> {
    let node_svid = shared.node_svid().ok_or(DialError::NoNodeSvid)?;
    let config = tls::client_config(shared.trust.clone(), svid, dst)?;
    let timeout = shared.config.connect_timeout();
    let tcp = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(endpoint)).await {
        Err(_) => return Err(DialError::Timeout(endpoint)),
        Ok(Err(source)) => return Err(DialError::Connect { addr: endpoint, source }),
        Ok(Ok(t)) => t,
    };
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(hbone::server_name(dst)).map_err(|e| DialError::Tls {
        addr: endpoint,
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })?;
    let tls = tokio::time::timeout(timeout, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| DialError::Timeout(endpoint))?
        .map_err(|source| DialError::Tls { addr: endpoint, source })?;
    let mut exporter = [0u8; hbone::EXPORTER_LEN];
    tls.get_ref()
        .1
        .export_keying_material(&mut exporter, hbone::EXPORTER_LABEL, None)
        .map_err(|e| DialError::Tls { addr: endpoint, source: std::io::Error::other(e) })?;
    let (svid_header, proof_header) = tls::node_proof(&node_svid, &exporter)?.encode();
    let header = |v: String| {
        http::HeaderValue::from_str(&v).map_err(|e| DialError::Tls { addr: endpoint, source: std::io::Error::other(e) })
    };
    let proof = (header(svid_header)?, header(proof_header)?);
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|source| DialError::H2 { addr: endpoint, source })?;
    let dead = Arc::new(AtomicBool::new(false));
    let flag = dead.clone();
    let peer = endpoint;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%peer, "tunnel connection ended: {e}");
        }
        flag.store(true, Ordering::Relaxed);
    });
    shared.streams.connection("outbound");
    tracing::info!(%endpoint, src = %svid.spiffe_id, dst, node, "tunnel connection established");
    Ok(Conn {
        send,
        leaf: svid.chain.first().cloned().unwrap_or_default(),
        proof,
        node: node.to_owned(),
        dead,
        active: AtomicUsize::new(0),
    })
}

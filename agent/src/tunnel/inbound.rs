//! The tunnel listener (HBONE, port 15008): mutual TLS with the destination workload's SVID
//! (chosen by SNI) against a source workload's SVID, the sending node's proof, then each
//! CONNECT stream authorised (the node attested and allowed to serve the source, the
//! destination a workload of this node listening there, the policy in force) and connected
//! to the workload from a socket stamped with the *source's* identity, so the workload's
//! own ingress hook judges it by identity.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{Arc, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use h2::server::SendResponse;
use rustls::pki_types::UnixTime;
use tether_proto::hbone::{self, NodeProof};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::{
    pool,
    streams::{Direction, Parties},
    Shared,
};

/// A TLS handshake must finish within this.
const HANDSHAKE: Duration = Duration::from_secs(5);

pub async fn serve(shared: Arc<Shared>, listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let (shared, acceptor) = (shared.clone(), acceptor.clone());
                tokio::spawn(async move { connection(shared, tcp, peer, acceptor).await });
            }
            Err(e) => {
                tracing::warn!("tunnel listener: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What one TLS connection established.
struct Conn {
    /// The source workload (client certificate).
    src: String,
    /// Its certificate's notAfter (unix seconds): no new stream after it.
    src_not_after: i64,
    /// The destination workload this connection serves (the certificate we presented).
    dst: String,
    exporter: [u8; hbone::EXPORTER_LEN],
    /// The sending node, once proved.
    node: OnceLock<String>,
    peer: SocketAddr,
}

async fn connection(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, acceptor: tokio_rustls::TlsAcceptor) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            shared.streams.connection("inbound_refused");
            return shared.streams.refuse(
                Direction::Inbound,
                &format!("TLS: {e}"),
                serde_json::json!({ "peer": peer.to_string() }),
            );
        }
        Err(_) => return shared.streams.connection("inbound_timeout"),
    };
    let (_, server) = tls.get_ref();
    let td = shared.trust.trust_domain().to_owned();
    let leaf = server.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref().to_vec());
    let src = leaf.as_deref().and_then(|l| super::tls::spiffe_id_of(l, &td).ok()).map(|id| id.to_string());
    let dst = server.server_name().and_then(|n| shared.resolver.identity_for(n));
    let mut exporter = [0u8; hbone::EXPORTER_LEN];
    let exported = server.export_keying_material(&mut exporter, hbone::EXPORTER_LABEL, None).is_ok();
    let (Some(src), Some(dst), Some(leaf), true) = (src, dst, leaf, exported) else {
        shared.streams.connection("inbound_refused");
        return;
    };
    let src_not_after = super::tls::not_after(&leaf).unwrap_or(0);
    let conn = Arc::new(Conn { src, src_not_after, dst, exporter, node: OnceLock::new(), peer });
    let mut h2 = match h2::server::Builder::new()
        .initial_window_size(pool::STREAM_WINDOW)
        .initial_connection_window_size(pool::CONNECTION_WINDOW)
        .max_frame_size(pool::MAX_FRAME)
        .max_concurrent_streams(pool::MAX_STREAMS)
        .handshake::<_, Bytes>(tls)
        .await
    {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(%peer, "tunnel HTTP/2 handshake: {e}");
            return;
        }
    };
    shared.streams.connection("inbound");
    while let Some(next) = h2.accept().await {
        match next {
            Ok((request, respond)) => {
                let (shared, conn) = (shared.clone(), conn.clone());
                tokio::spawn(async move { stream(shared, conn, request, respond).await });
            }
            Err(e) => {
                tracing::debug!(%peer, "tunnel connection: {e}");
                break;
            }
        }
    }
}

fn refuse(shared: &Shared, conn: &Conn, mut respond: SendResponse<Bytes>, status: u16, reason: &str) {
    shared.streams.refuse(
        Direction::Inbound,
        reason,
        serde_json::json!({
            "src_spiffe_id": conn.src,
            "dst_spiffe_id": conn.dst,
            "src_node": conn.node.get(),
            "peer": conn.peer.to_string(),
        }),
    );
    let response = http::Response::builder()
        .status(status)
        .header(hbone::REFUSAL_HEADER, reason.chars().filter(|c| c.is_ascii() && !c.is_control()).collect::<String>())
        .body(());
    if let Ok(r) = response {
        let _ = respond.send_response(r, true);
    }
}

/// The sending node, proved on the connection's first stream (headers) and kept.
fn prove_node(shared: &Shared, conn: &Conn, headers: &http::HeaderMap) -> Result<String, String> {
    if let Some(n) = conn.node.get() {
        return Ok(n.clone());
    }
    let get = |name| headers.get(name).map(|v| v.as_bytes()).unwrap_or_default();
    let proof = NodeProof::decode(get(hbone::NODE_SVID_HEADER), get(hbone::NODE_PROOF_HEADER))
        .map_err(|e| format!("node proof: {e}"))?;
    let node = shared
        .trust
        .verify_node_proof(&proof, &conn.exporter, UnixTime::now())
        .map_err(|e| format!("node proof: {e}"))?
        .to_string();
    Ok(conn.node.get_or_init(|| node).clone())
}

async fn stream(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    request: http::Request<h2::RecvStream>,
    respond: SendResponse<Bytes>,
) {
    let uri = request.uri();
    let orig = match hbone::check_connect(
        request.method().as_str(),
        uri.scheme_str(),
        uri.path_and_query().map(|p| p.as_str()),
        uri.authority().map(|a| a.as_str()),
    ) {
        Ok(a) => a,
        Err(e) => return refuse(&shared, &conn, respond, 400, &format!("bad request: {e}")),
    };
    let node = match prove_node(&shared, &conn, request.headers()) {
        Ok(n) => n,
        Err(e) => return refuse(&shared, &conn, respond, 403, &e),
    };
    let parties = match authorise(&shared, &conn, &node, orig) {
        Ok(p) => p,
        Err(e) => return refuse(&shared, &conn, respond, 403, &e),
    };
    // The socket to the workload carries the source's identity in the kernel: stamped
    // before it connects, so the workload's ingress hook finds it on the SYN. It is bound
    // first, so the stream is known by its tuple (to peer queries) before the workload can
    // accept it.
    let socket = TcpSocket::new_v4().and_then(|socket| {
        shared
            .maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stamp_peer(&socket, parties.src_number)
            .map_err(std::io::Error::other)?;
        socket.set_nodelay(true)?;
        socket.bind(SocketAddr::V4(SocketAddrV4::new(*orig.ip(), 0)))?;
        Ok(socket)
    });
    let (socket, mine) = match socket.and_then(|s| s.local_addr().map(|a| (s, a))) {
        Ok((s, SocketAddr::V4(a))) => (s, a),
        Ok(_) => return refuse(&shared, &conn, respond, 500, "socket: not IPv4"),
        Err(e) => return refuse(&shared, &conn, respond, 500, &format!("socket: {e}")),
    };
    let mut parties = parties;
    parties.local_tuple = Some((mine, orig));
    let (s, close) = shared.streams.open(parties);
    let tcp = match tokio::time::timeout(shared.config.connect_timeout(), socket.connect(SocketAddr::V4(orig))).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            shared.streams.discard(&s);
            return refuse(&shared, &conn, respond, 502, &format!("workload unreachable: {e}"));
        }
        Err(_) => {
            shared.streams.discard(&s);
            return refuse(&shared, &conn, respond, 504, "workload unreachable: timed out");
        }
    };
    let mut respond = respond;
    let send = match http::Response::builder().status(200).body(()).map(|r| respond.send_response(r, false)) {
        Ok(Ok(send)) => send,
        _ => return shared.streams.finish(&s, "reset by peer: the stream ended before it was answered"),
    };
    let reason = super::splice::splice(tcp, send, request.into_body(), &s, close, false).await;
    shared.streams.finish(&s, &reason);
}

/// Everything a new stream must satisfy, checked against the views in force now.
fn authorise(shared: &Shared, conn: &Conn, node: &str, orig: SocketAddrV4) -> Result<Parties, String> {
    if crate::svid::now() >= conn.src_not_after {
        return Err(format!("the source certificate of {} has expired: no new streams on it", conn.src));
    }
    let local = shared.local.borrow().clone();
    let remote = shared.remote.borrow().clone();
    if !local.node_attested {
        return Err("this node is not attested".into());
    }
    let peer = remote.peer(node).ok_or_else(|| format!("node {node} is not an attested Tether node"))?;
    if !peer.identities.contains(&conn.src) {
        return Err(format!("node {node} may not serve {}", conn.src));
    }
    if !shared.addresses().contains(orig.ip()) {
        return Err(format!("{} is not an address of this node", orig.ip()));
    }
    let svc = local
        .service(shared.netns, *orig.ip(), orig.port())
        .ok_or_else(|| format!("no protected workload listens on {orig}"))?;
    if svc.spiffe_id != conn.dst {
        return Err(format!("{orig} is {}, not {}", svc.spiffe_id, conn.dst));
    }
    let src_number = crate::identity::identity_number(&conn.src, false);
    if !local.allows(src_number, svc.identity, orig.port()) {
        return Err(format!("policy: no rule allows {} to {} on port {}", conn.src, svc.spiffe_id, orig.port()));
    }
    Ok(Parties {
        direction: Direction::Inbound,
        src_id: conn.src.clone(),
        dst_id: svc.spiffe_id.clone(),
        src_node: node.to_owned(),
        dst_node: shared.node_id(),
        orig_dst: orig,
        src_number,
        dst_number: svc.identity,
        local_tuple: None,
    })
}

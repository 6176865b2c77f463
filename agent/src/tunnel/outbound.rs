//! The capture listener: connections the kernel redirected from protected workloads. For
//! each, what the kernel recorded when the SYN left (original destination, the source's and
//! destination's identities), the policy in force, then a stream on a pooled connection to
//! the destination node, presenting the *source workload's* SVID.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
};

use tether_common::TupleKey;
use tether_proto::hbone;
use tokio::net::{TcpListener, TcpStream};

use super::{
    streams::{Direction, Parties},
    Shared,
};
use crate::mesh::TCP;

pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((tcp, SocketAddr::V4(peer))) => {
                let shared = shared.clone();
                tokio::spawn(async move { handle(shared, tcp, peer).await });
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("capture listener: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Ends the application's connection with a reset (it must not read an orderly end).
fn reset(tcp: TcpStream) {
    let _ = tcp.set_zero_linger();
    drop(tcp);
}

fn ne(a: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

async fn handle(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddrV4) {
    let _ = tcp.set_nodelay(true);
    let Ok(SocketAddr::V4(local)) = tcp.local_addr() else { return reset(tcp) };
    // What the kernel recorded when this connection's SYN left its socket.
    let key = TupleKey {
        saddr: ne(*peer.ip()),
        daddr: ne(*local.ip()),
        sport: peer.port().to_be(),
        dport: local.port().to_be(),
        proto: TCP,
    };
    let conn = match shared.maps.lock().unwrap_or_else(|p| p.into_inner()).take_conn(&key) {
        Ok(Some(c)) => c,
        Ok(None) => {
            shared.streams.refuse(
                Direction::Outbound,
                "not captured: the kernel recorded no connection from this client",
                serde_json::json!({ "client": peer.to_string() }),
            );
            return reset(tcp);
        }
        Err(e) => {
            tracing::error!("reading captured connections: {e}");
            return reset(tcp);
        }
    };
    let orig = SocketAddrV4::new(std::net::Ipv4Addr::from(conn.daddr.to_ne_bytes()), u16::from_be(conn.dport));
    let local_view = shared.local.borrow().clone();
    let remote = shared.remote.borrow().clone();
    let snapshot = shared.snapshot.borrow().clone();
    let refuse = |reason: &str, tcp: TcpStream| {
        shared.streams.refuse(
            Direction::Outbound,
            reason,
            serde_json::json!({
                "client": peer.to_string(),
                "original_dst": orig.to_string(),
                "tgid": conn.tgid,
                "socket_cookie": conn.cookie,
            }),
        );
        reset(tcp)
    };
    let Some(src) = local_view.identities.get(&conn.src_identity).filter(|n| n.local) else {
        return refuse("no identity: the source's identity is not one of this node's", tcp);
    };
    let Some((svc, peer_node)) = remote.service(*orig.ip(), orig.port()) else {
        return refuse("no destination: no Tether node serves it any more", tcp);
    };
    let dst_number = crate::identity::identity_number(&svc.spiffe_id, false);
    if dst_number != conn.dst_identity {
        return refuse("destination changed since connect", tcp);
    }
    if !snapshot.node_attested {
        return refuse("node not attested", tcp);
    }
    if !local_view.allows(conn.src_identity, dst_number, orig.port()) {
        return refuse("policy: no rule allows it", tcp);
    }
    let Some(svid) = snapshot
        .svids
        .values()
        .filter(|s| s.spiffe_id.to_string() == src.spiffe_id)
        .max_by_key(|s| s.not_after)
        .cloned()
    else {
        return refuse("no SVID for the source", tcp);
    };
    let parties = Parties {
        direction: Direction::Outbound,
        src_id: src.spiffe_id.clone(),
        dst_id: svc.spiffe_id.clone(),
        src_node: shared.node_id(),
        dst_node: peer_node.node_id.clone(),
        orig_dst: orig,
        src_number: conn.src_identity,
        dst_number,
        local_tuple: None,
    };
    let timeout = shared.config.connect_timeout();
    // Two tries: a pooled connection may have died since it was last used.
    let mut last_err = String::new();
    for attempt in 0..2 {
        let pooled = match shared.pool.get(&shared, &svid, &svc.spiffe_id, &peer_node.node_id, peer_node.endpoint).await
        {
            Ok(c) => c,
            Err(e) => {
                shared.streams.connection("outbound_failed");
                if e.unreachable() {
                    shared.mark_down(&peer_node.node_id, &e.to_string());
                }
                return refuse(&format!("tunnel unreachable: {e}"), tcp);
            }
        };
        let request = match http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(orig.to_string())
            .header(hbone::NODE_SVID_HEADER, pooled.proof.0.clone())
            .header(hbone::NODE_PROOF_HEADER, pooled.proof.1.clone())
            .body(())
        {
            Ok(r) => r,
            Err(e) => return refuse(&format!("request: {e}"), tcp),
        };
        let sent = async {
            let mut sender = pooled.sender().ready().await?;
            let (response, send) = sender.send_request(request, false)?;
            Ok::<_, h2::Error>((response, send))
        };
        let (response, send) = match sent.await {
            Ok(x) => x,
            Err(e) => {
                pooled.mark_dead();
                last_err = e.to_string();
                if attempt == 0 {
                    continue;
                }
                return refuse(&format!("tunnel lost: {last_err}"), tcp);
            }
        };
        let response = match tokio::time::timeout(timeout, response).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return refuse(&format!("refused by the peer: {e}"), tcp),
            Err(_) => {
                // A connection that does not answer is not used again: the next stream dials
                // afresh (and finds out whether the node is reachable at all).
                pooled.mark_dead();
                return refuse("tunnel lost: the peer did not answer in time", tcp);
            }
        };
        if response.status() != http::StatusCode::OK {
            let why = response
                .headers()
                .get(hbone::REFUSAL_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("no reason given")
                .to_owned();
            return refuse(&format!("refused by the peer: {} {why}", response.status().as_u16()), tcp);
        }
        let (stream, close) = shared.streams.open(parties);
        let reason = super::splice::splice(tcp, send, response.into_body(), &stream, close, true).await;
        shared.streams.finish(&stream, &reason);
        return;
    }
    refuse(&format!("tunnel lost: {last_err}"), tcp)
}

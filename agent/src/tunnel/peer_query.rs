//! How a destination workload learns who is on the other end of a tunnelled connection: it
//! asks the agent, over a Unix socket, with its connection's two addresses as it sees them
//! (`getpeername`, `getsockname`), one line `PEER LOCAL`; the answer is one JSON line, the
//! source's SPIFFE ID and node, or an error. Application bytes are never touched to carry
//! this. The answer names only what the agent authenticated (the client certificate and
//! the node proof); any local process may ask (SPIFFE IDs are not secrets).

use std::{net::SocketAddrV4, path::Path, sync::Arc};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
};

use super::Shared;

/// The answer for one query line.
pub fn answer(shared: &Shared, line: &str) -> serde_json::Value {
    let mut parts = line.split_whitespace();
    let (Some(peer), Some(local), None) = (parts.next(), parts.next(), parts.next()) else {
        return serde_json::json!({ "error": "expected: PEER_ADDR:PORT LOCAL_ADDR:PORT" });
    };
    let (Ok(peer), Ok(local)) = (peer.parse::<SocketAddrV4>(), local.parse::<SocketAddrV4>()) else {
        return serde_json::json!({ "error": "addresses are IPv4:port" });
    };
    match shared.streams.by_tuple(peer, local) {
        Some(s) => serde_json::json!({
            "spiffe_id": s.parties.src_id,
            "node_id": s.parties.src_node,
            "stream": s.id,
        }),
        None => serde_json::json!({ "error": "no tunnel stream is that connection" }),
    }
}

pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}

pub async fn serve(shared: Arc<Shared>, listener: UnixListener) {
    loop {
        let Ok((conn, _)) = listener.accept().await else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = conn.into_split();
            let mut lines = BufReader::new(rd).take(4096).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut out = answer(&shared, &line).to_string();
                out.push('\n');
                if wr.write_all(out.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

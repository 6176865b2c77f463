//! Mutually authenticated tunnels between attested workloads on different nodes.
//!
//! A protected workload's connect() to a workload another Tether node serves is judged by
//! identity in the kernel and redirected to this node's capture listener (127.0.0.1:15001 in
//! the tunnel's network namespace); the kernel keeps the original destination on the socket
//! (`getpeername()` still shows it) and tells the agent, by the client socket's tuple, what
//! the connection is. The agent opens an HBONE stream (HTTP/2 CONNECT over mutual TLS 1.3,
//! ALPN h2, `:authority` the original destination) to the destination node's tunnel port
//! (15008), presenting the *source workload's* SVID and expecting the destination
//! workload's; a pooled connection carries every stream of that pair. The receiving agent
//! verifies the chain against the bundle, the sending node's proof, and the policy, then
//! connects to the workload from a socket the kernel attributes to the source identity.
//!
//! Live streams are checked again whenever the node's snapshot (entries, SVIDs, bundle,
//! attestation), the policy in force, or the server's view of the other nodes changes,
//! and every `recheck_interval_ms`; a stream no longer allowed is reset.
//!
//! Everything runs on a runtime of its own whose threads live in the tunnel's network
//! namespace, so every socket it makes is there; the server is reached from the agent's.

mod inbound;
mod outbound;
mod peer_query;
mod pool;
mod registry;
mod splice;
mod streams;
pub mod tls;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use tokio::sync::{watch, Notify};

use crate::{
    config::{AgentConfig, TunnelConfig},
    ebpf::TunnelMaps,
    identity::Snapshot,
    manager::Manager,
    mesh::{Capture, LocalView, RemoteView, TunnelEnds},
    svid::X509Svid,
};
use streams::{Direction, Parties, Streams};

pub use peer_query::answer as peer_answer;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Kernel(#[from] crate::ebpf::EbpfError),
    #[error("no IPv4 address to advertise in {0} (set tunnel.address)")]
    NoAddress(String),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("the tunnel runtime failed to start: {0}")]
    Runtime(String),
}

/// What every part of the tunnel shares.
pub struct Shared {
    config: TunnelConfig,
    /// The tunnel namespace (inode).
    netns: u64,
    netns_path: PathBuf,
    endpoint: SocketAddrV4,
    addresses: RwLock<Vec<Ipv4Addr>>,
    maps: Mutex<TunnelMaps>,
    trust: Arc<tls::Trust>,
    resolver: Arc<tls::Resolver>,
    streams: Streams,
    pool: pool::Pool,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    local: watch::Receiver<Arc<LocalView>>,
    remote: watch::Receiver<Arc<RemoteView>>,
    remote_tx: watch::Sender<Arc<RemoteView>>,
    node: RwLock<Option<X509Svid>>,
    /// Peers whose tunnel did not answer: node id -> (endpoint, since).
    down: Mutex<std::collections::BTreeMap<String, (SocketAddrV4, Instant)>>,
    reachability: Notify,
}

impl Shared {
    fn addresses(&self) -> Vec<Ipv4Addr> {
        self.addresses.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn node_svid(&self) -> Option<X509Svid> {
        self.node.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_node_svid(&self, svid: X509Svid) {
        *self.node.write().unwrap_or_else(|p| p.into_inner()) = Some(svid);
    }

    fn node_id(&self) -> String {
        self.node_svid().map(|s| s.spiffe_id.to_string()).unwrap_or_default()
    }

    fn down_nodes(&self) -> BTreeSet<String> {
        self.down.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// A peer's tunnel did not answer: new connections to it are refused at connect()
    /// until a probe reaches it again.
    fn mark_down(&self, node: &str, why: &str) {
        let Some(peer) = self.remote.borrow().peer(node).cloned() else { return };
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        if down.contains_key(node) {
            return;
        }
        tracing::warn!(node, endpoint = %peer.endpoint, "tunnel peer unreachable, connections to it refused until it answers: {why}");
        down.insert(node.to_owned(), (peer.endpoint, Instant::now()));
        drop(down);
        self.reachability.notify_one();
    }

    /// Whether `p` may go on now; the reason if not.
    fn verdict(&self, snapshot: &Snapshot, local: &LocalView, remote: &RemoteView, p: &Parties) -> Option<String> {
        if !snapshot.node_attested || !local.node_attested {
            return Some("this node is not attested".into());
        }
        let served = |id: &str| snapshot.entries.iter().any(|e| e.spiffe_id.to_string() == id);
        // Who the parties are first (a withdrawn identity also changes the policy rows: the
        // reason given is the cause), then what the policy allows.
        let who = match p.direction {
            Direction::Outbound => {
                if !served(&p.src_id) {
                    return Some(format!("source identity {} withdrawn", p.src_id));
                }
                if remote.peer(&p.dst_node).is_none() {
                    return Some(format!("node {} is no longer an attested Tether node", p.dst_node));
                }
                match remote.service(*p.orig_dst.ip(), p.orig_dst.port()) {
                    Some((s, peer)) if s.spiffe_id == p.dst_id && peer.node_id == p.dst_node => None,
                    _ => Some(format!("{} is no longer {} on {}", p.orig_dst, p.dst_id, p.dst_node)),
                }
            }
            Direction::Inbound => {
                let Some(peer) = remote.peer(&p.src_node) else {
                    return Some(format!("node {} is no longer an attested Tether node", p.src_node));
                };
                if !peer.identities.contains(&p.src_id) {
                    return Some(format!("node {} may no longer serve {}", p.src_node, p.src_id));
                }
                if !served(&p.dst_id) {
                    return Some(format!("destination identity {} withdrawn", p.dst_id));
                }
                None
            }
        };
        if who.is_some() {
            return who;
        }
        if !local.allows(p.src_number, p.dst_number, p.orig_dst.port()) {
            return Some(format!("policy no longer allows {} to {} on port {}", p.src_id, p.dst_id, p.orig_dst.port()));
        }
        None
    }
}

/// The running tunnel: its runtime (threads in the tunnel namespace) lives as long as this.
pub struct Tunnel {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn netns_inode(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.ino())
}

/// A runtime whose every thread joins the namespace at `path` before it runs anything.
fn runtime(path: &Path, threads: usize) -> Result<tokio::runtime::Runtime, TunnelError> {
    let ns = Arc::new(std::fs::File::open(path).map_err(|source| TunnelError::Netns { path: path.into(), source })?);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("tunnel")
        .enable_all()
        .on_thread_start(move || {
            // SAFETY: setns on a valid namespace fd; it affects only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                // A tunnel thread outside its namespace would open sockets in the wrong
                // place: stop loudly rather than run.
                tracing::error!(
                    "tunnel thread could not join its network namespace: {}",
                    std::io::Error::last_os_error()
                );
                std::process::abort();
            }
        })
        .build()
        .map_err(|e| TunnelError::Runtime(e.to_string()))
}

/// `SO_NETNS_COOKIE` (Linux 5.14): the namespace's cookie, as the kernel programs see it.
fn netns_cookie(socket: &impl AsFd) -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut v: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd and a u64-sized buffer.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

fn listen(addr: SocketAddrV4) -> std::io::Result<tokio::net::TcpListener> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(addr.into())?;
    // Connection bursts (a hundred streams at once) must not overflow the backlog.
    s.listen(4096)
}

/// Addresses of the tunnel namespace other nodes can reach (not loopback).
fn reachable_addresses(path: &Path) -> Vec<Ipv4Addr> {
    let ns = crate::netns::Netns { inode: netns_inode(path).unwrap_or(0), path: path.to_owned() };
    crate::netns::addresses(&ns).unwrap_or_default().into_iter().filter(|a| !a.is_loopback()).collect()
}

/// Starts the tunnel: listeners in the tunnel namespace, the registry with the server, the
/// stream checks. Needs enforcement running on `pin_dir` (the kernel captures for it).
pub async fn start(
    config: TunnelConfig,
    agent: &AgentConfig,
    manager: Arc<Manager>,
    ends: TunnelEnds,
    pin_dir: &Path,
) -> Result<Tunnel, TunnelError> {
    let path = config.netns_path();
    let netns = netns_inode(&path).map_err(|source| TunnelError::Netns { path: path.clone(), source })?;
    let addresses = reachable_addresses(&path);
    let advertised = match config.address {
        Some(a) => a,
        None => *addresses.first().ok_or_else(|| TunnelError::NoAddress(path.display().to_string()))?,
    };
    let endpoint = SocketAddrV4::new(advertised, config.port);
    let mut maps = TunnelMaps::open(pin_dir)?;
    let stale = maps.clear_conns()?;
    if stale > 0 {
        tracing::info!(stale, "captured connections of a previous agent forgotten");
    }
    let threads = config.worker_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let runtime = runtime(&path, threads)?;
    let capture_addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, config.capture_port);
    let listen_addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, config.port);
    let bound = runtime
        .spawn(async move {
            let here = netns_inode(Path::new("/proc/thread-self/ns/net"))?;
            if here != netns {
                return Err(std::io::Error::other("a tunnel thread is not in the tunnel namespace"));
            }
            let capture = listen(capture_addr)?;
            let inbound = listen(listen_addr)?;
            let cookie = netns_cookie(&capture)?;
            Ok((capture, inbound, cookie))
        })
        .await
        .map_err(|e| TunnelError::Runtime(e.to_string()))?;
    let (capture_listener, inbound_listener, cookie) =
        bound.map_err(|source| TunnelError::Io { op: "binding the tunnel listeners", source })?;
    // The kernel captures into this listener only once it carries the agent's stamp.
    maps.stamp_listener(&capture_listener)?;

    let snapshot = manager.subscribe();
    let trust = Arc::new(tls::Trust::new(&agent.trust_domain));
    let resolver = Arc::new(tls::Resolver::default());
    {
        let snap = snapshot.borrow().clone();
        trust.set_bundle(&snap.bundle);
        resolver.set(&snap.svids.values().collect::<Vec<_>>());
    }
    let server_config = tls::server_config(trust.clone(), resolver.clone())?;
    let data = &agent.data_dir;
    let shared = Arc::new(Shared {
        netns,
        netns_path: path.clone(),
        endpoint,
        addresses: RwLock::new(addresses),
        maps: Mutex::new(maps),
        trust,
        resolver,
        streams: Streams::new(
            config.stream_log.clone().unwrap_or_else(|| data.join("tunnel-streams.jsonl")),
            data.join("tunnel-metrics.prom"),
        ),
        pool: pool::Pool::new(config.connections_per_peer()),
        snapshot,
        local: ends.local,
        remote: ends.remote.subscribe(),
        remote_tx: ends.remote,
        node: RwLock::new(manager.node_svid().await),
        down: Mutex::default(),
        reachability: Notify::new(),
        config,
    });
    let capture = Capture { netns_cookie: cookie, listener: capture_addr };
    runtime.spawn(outbound::serve(shared.clone(), capture_listener));
    runtime.spawn(inbound::serve(shared.clone(), inbound_listener, tokio_rustls::TlsAcceptor::from(server_config)));
    runtime.spawn(recheck(shared.clone()));
    runtime.spawn(probe(shared.clone()));
    let every = Duration::from_secs(agent.sync_interval_seconds);
    tokio::spawn(registry::run(shared.clone(), manager, every, capture));
    let peer_socket = shared.config.peer_socket.clone().unwrap_or_else(|| data.join("tunnel-peers.sock"));
    match peer_query::bind(&peer_socket) {
        Ok(l) => {
            tokio::spawn(peer_query::serve(shared.clone(), l));
        }
        Err(e) => tracing::error!(path = %peer_socket.display(), "peer query socket unavailable: {e}"),
    }
    tracing::info!(
        %endpoint,
        capture = %capture_addr,
        netns = %shared.netns_path.display(),
        peer_socket = %peer_socket.display(),
        "tunnel listening (HBONE: HTTP/2 CONNECT over mutual TLS 1.3)"
    );
    Ok(Tunnel { runtime: Some(runtime) })
}

/// Checks every live stream against what is in force now: at once on every change of the
/// snapshot, the policy or the peers, and every `recheck_interval_ms` (certificate expiry,
/// and a bound if a change went unnoticed). Also keeps TLS material and metrics current.
async fn recheck(shared: Arc<Shared>) {
    let (mut snap, mut local, mut remote) = (shared.snapshot.clone(), shared.local.clone(), shared.remote.clone());
    let mut tick = tokio::time::interval(Duration::from_millis(shared.config.recheck_interval_ms.max(10)));
    let mut seen: Option<Arc<Snapshot>> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = snap.changed() => if r.is_err() { return },
            r = local.changed() => if r.is_err() { return },
            r = remote.changed() => if r.is_err() { return },
        }
        let s = snap.borrow_and_update().clone();
        let l = local.borrow_and_update().clone();
        let r = remote.borrow_and_update().clone();
        if seen.as_ref().is_none_or(|old| !Arc::ptr_eq(old, &s)) {
            shared.trust.set_bundle(&s.bundle);
            shared.resolver.set(&s.svids.values().collect::<Vec<_>>());
            seen = Some(s.clone());
        }
        let closed = shared.streams.recheck(|p| shared.verdict(&s, &l, &r, p));
        if closed > 0 {
            tracing::warn!(closed, "tunnel streams no longer allowed were closed");
        }
        // Pooled connections of a source whose SVID changed, or to a node that left, take
        // no new streams.
        shared.pool.retain(|src, _dst, c| {
            r.peer(&c.node).is_some() && s.svids.values().any(|v| v.spiffe_id.to_string() == src)
        });
        shared.streams.write_metrics();
    }
}

/// Every second, tries the tunnels of peers marked down; one that answers is up again.
async fn probe(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let down: Vec<(String, SocketAddrV4)> =
            shared.down.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(n, (e, _))| (n.clone(), *e)).collect();
        for (node, endpoint) in down {
            let reached = tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(endpoint))
                .await
                .is_ok_and(|r| r.is_ok());
            let gone = shared.remote.borrow().peer(&node).is_none();
            if reached || gone {
                shared.down.lock().unwrap_or_else(|p| p.into_inner()).remove(&node);
                tracing::info!(node, %endpoint, reached, "tunnel peer no longer marked down");
                shared.reachability.notify_one();
            }
        }
        // The namespace's addresses may change (interfaces come and go).
        let fresh = reachable_addresses(&shared.netns_path);
        *shared.addresses.write().unwrap_or_else(|p| p.into_inner()) = fresh;
    }
}

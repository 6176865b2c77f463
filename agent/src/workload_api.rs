//! The SPIFFE Workload API on a Unix socket. The caller is identified out of band: the
//! connection's identity is fixed when it is accepted — the pidfd of the process that
//! connected (SO_PEERPIDFD) and the kernel's record of that process then. Every call checks
//! that the process is still the one that connected (same exec, executable, ids and cgroup):
//! one that has since exec'd, changed credentials, moved or exited is refused
//! (PermissionDenied), and its open streams end. A fresh connection is identified afresh.
//! A PID reused after the caller exits is never mistaken for it (the pidfd cannot be).

use std::{
    collections::HashMap,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tether_attestors::{Selector, SpiffeId};
use tether_proto::workload::{self, spiffe_workload_api_server::SpiffeWorkloadApi};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_stream::Stream;
use tonic::{transport::server::Connected, Request, Response, Status};

use crate::{
    h2_authority::FixAuthority,
    identity::{IdentitySource, LocalEntry, Snapshot},
    process::{caller::IdentityError, pidfd::PidFd, Record},
};

/// Resolves a caller from its pidfd. The real one is `process::caller::Resolver`; unit
/// tests use a fake.
pub trait SelectorSource: Send + Sync + 'static {
    /// The kernel's record of the process now (cheap: one map lookup).
    fn record(&self, pidfd: &PidFd) -> Option<Record>;
    /// The process's identity: its record and its selectors (blocking work: /proc, maybe a
    /// hash).
    fn identify(&self, pidfd: &PidFd) -> Result<(Record, Vec<Selector>), IdentityError>;
    /// A cheap answer when one is at hand (no blocking work); None sends the caller to
    /// [`SelectorSource::identify`] on a blocking thread.
    fn identify_fast(&self, _pidfd: &PidFd) -> Option<(Record, Vec<Selector>)> {
        None
    }
    /// Whether the process at the other end of `socket` (accepted here) still holds the
    /// credentials it connected with: one of [`tether_common::peer_creds`] (UNKNOWN when
    /// that cannot be told).
    fn peer_creds(&self, socket: std::os::fd::BorrowedFd<'_>) -> u32;
}

impl SelectorSource for crate::process::caller::Resolver {
    fn record(&self, pidfd: &PidFd) -> Option<Record> {
        self.record(pidfd).ok().flatten()
    }
    fn identify(&self, pidfd: &PidFd) -> Result<(Record, Vec<Selector>), IdentityError> {
        self.identify(pidfd).map(|id| (id.record, id.selectors))
    }
    fn identify_fast(&self, pidfd: &PidFd) -> Option<(Record, Vec<Selector>)> {
        self.identify_cached(pidfd).map(|id| (id.record, id.selectors))
    }
    fn peer_creds(&self, socket: std::os::fd::BorrowedFd<'_>) -> u32 {
        self.peer_creds(socket).unwrap_or_else(|e| {
            tracing::warn!("checking a Workload API caller's credentials since its connect: {e}");
            tether_common::peer_creds::UNKNOWN
        })
    }
}

/// The facts of a record that make an identity: a process whose record differs in any of
/// them is not the one that connected.
fn same_process(a: &Record, b: &Record) -> bool {
    (a.tgid, a.exec_ktime_ns, a.exe, a.uid, a.euid, a.gid, a.egid, a.cgroup_id)
        == (b.tgid, b.exec_ktime_ns, b.exe, b.uid, b.euid, b.gid, b.egid, b.cgroup_id)
}

/// What the agent fixed about a connection's peer when it accepted it.
pub struct ConnPeer {
    pub pidfd: PidFd,
    /// The kernel's record of the peer at accept.
    pub accepted: Record,
    /// The connection's slot in its uid's connection count, given back when it closes.
    _slot: UidSlot,
}

impl ConnPeer {
    /// The peer is still the process that connected: same exec, executable, ids and
    /// cgroup, and alive.
    fn check(&self, now: Option<&Record>) -> Result<(), Status> {
        match now {
            Some(r) if same_process(r, &self.accepted) => Ok(()),
            Some(_) => Err(Status::permission_denied(
                "the process that opened this connection has since exec'd, changed its credentials or moved \
                 cgroup: it is not who connected; reconnect to be identified afresh",
            )),
            None => Err(Status::permission_denied("the process that opened this connection has exited")),
        }
    }
}

/// The peer of one accepted connection, or what every call on it is answered (it could not
/// be identified at accept, or its uid has too many connections open).
#[derive(Clone)]
pub struct Peer(pub Result<Arc<ConnPeer>, Status>);

/// Open Workload API connections per uid, bounded: past the limit, a uid's new connections
/// are answered `ResourceExhausted` (saying which limit) and closed after
/// [`REFUSED_LINGER`]; at most [`MAX_REFUSED_OPEN`] such connections are open at once, beyond
/// which they are closed at accept.
pub struct ConnLimits {
    max_per_uid: usize,
    open: std::sync::Mutex<HashMap<u32, usize>>,
    refused_open: std::sync::atomic::AtomicUsize,
}

/// How long a connection refused for its uid's limit stays open to carry the refusal.
pub const REFUSED_LINGER: std::time::Duration = std::time::Duration::from_secs(2);
/// Refused connections open at once, in all.
pub const MAX_REFUSED_OPEN: usize = 256;

impl ConnLimits {
    pub fn new(max_per_uid: usize) -> Arc<Self> {
        Arc::new(ConnLimits { max_per_uid, open: Default::default(), refused_open: Default::default() })
    }

    /// A place for one more refused connection (None: too many already).
    fn refused_slot(self: &Arc<Self>) -> Option<RefusedSlot> {
        use std::sync::atomic::Ordering;
        let n = self.refused_open.fetch_add(1, Ordering::Relaxed);
        if n >= MAX_REFUSED_OPEN {
            self.refused_open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(RefusedSlot(self.clone()))
    }

    fn take(self: &Arc<Self>, uid: u32) -> Option<UidSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(uid).or_default();
        if *n >= self.max_per_uid {
            return None;
        }
        *n += 1;
        Some(UidSlot { limits: self.clone(), uid })
    }
}

/// One counted connection of a uid.
struct UidSlot {
    limits: Arc<ConnLimits>,
    uid: u32,
}

/// One refused connection still open.
struct RefusedSlot(Arc<ConnLimits>);

impl Drop for RefusedSlot {
    fn drop(&mut self) {
        self.0.refused_open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// The effective uid and gid of the peer when it connected (SO_PEERCRED).
fn peer_cred(socket: std::os::fd::BorrowedFd<'_>) -> std::io::Result<(u32, u32)> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len point to valid storage of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((cred.uid, cred.gid))
}

/// An accepted Workload API connection, carrying its peer. Reads go through
/// [`FixAuthority`] so grpc-core clients (Python, Java) are understood.
pub struct Conn {
    stream: FixAuthority<tokio::net::UnixStream>,
    peer: Peer,
    /// For a connection refused for its uid's limit: reads end (the connection closes) when
    /// this fires, and its place among refused connections is given back with it.
    close_at: Option<(Pin<Box<tokio::time::Sleep>>, RefusedSlot)>,
}

impl Conn {
    /// Fixes the connection's identity: the peer's pidfd and its kernel record now, which
    /// must still show the credentials it connected with (a setuid exec between its connect
    /// and this accept is caught). None when it is closed at once (too many refused
    /// connections open).
    pub fn accept<S: SelectorSource>(
        stream: tokio::net::UnixStream,
        source: &S,
        limits: &Arc<ConnLimits>,
    ) -> Option<Self> {
        use std::os::fd::AsFd;
        let mut close_at = None;
        let peer = match (PidFd::from_peer(stream.as_fd()), peer_cred(stream.as_fd())) {
            (Ok(pidfd), Ok((uid, gid))) => {
                tracing::debug!(pid = ?pidfd.pid(), uid, "workload API connection accepted");
                match limits.take(uid) {
                    None => {
                        tracing::warn!(
                            uid,
                            limit = limits.max_per_uid,
                            "workload API connection refused: this uid has too many open"
                        );
                        close_at = Some((Box::pin(tokio::time::sleep(REFUSED_LINGER)), limits.refused_slot()?));
                        Err(Status::resource_exhausted(format!(
                            "uid {uid} already has {} Workload API connections open, the most allowed \
                             (max_connections_per_uid): close some",
                            limits.max_per_uid
                        )))
                    }
                    Some(slot) => match source.record(&pidfd) {
                        // The record is the process now; the kernel's reference to the
                        // credentials it connected with tells whether it is still what
                        // connected (an exec keeping uid and gid changes no id, but always
                        // the credentials object). Read the record again after that check:
                        // an exec completing in between is seen there.
                        Some(accepted) if accepted.euid == uid && accepted.egid == gid => {
                            match source.peer_creds(stream.as_fd()) {
                                tether_common::peer_creds::HELD
                                    if source.record(&pidfd).is_some_and(|now| same_process(&now, &accepted)) =>
                                {
                                    Ok(Arc::new(ConnPeer { pidfd, accepted, _slot: slot }))
                                }
                                verdict => {
                                    let why = match verdict {
                                        tether_common::peer_creds::EXITED => "it has exited",
                                        tether_common::peer_creds::HELD | tether_common::peer_creds::CHANGED => {
                                            "its credentials changed between its connect and the accept (it \
                                             exec'd or changed ids since it connected)"
                                        }
                                        _ => "whether it still runs what connected cannot be told",
                                    };
                                    tracing::warn!(pid = accepted.tgid, verdict, "caller not identified: {why}");
                                    Err(Status::permission_denied(format!(
                                        "caller could not be identified when it connected: {why}"
                                    )))
                                }
                            }
                        }
                        Some(r) => {
                            tracing::warn!(
                                pid = r.tgid,
                                "caller not identified: its credentials changed between its connect and the accept"
                            );
                            Err(Status::permission_denied(
                                "caller could not be identified when it connected: its credentials changed \
                                 between its connect and the accept",
                            ))
                        }
                        None => {
                            tracing::warn!("caller not identified: the kernel has no record of it");
                            Err(Status::permission_denied(
                                "caller could not be identified when it connected: the kernel has no record of it",
                            ))
                        }
                    },
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!("workload API connection accepted");
                tracing::warn!("caller not identifiable: SO_PEERPIDFD/SO_PEERCRED failed: {e}");
                Err(Status::permission_denied(format!("caller could not be identified when it connected: {e}")))
            }
        };
        Some(Conn { stream: FixAuthority::new(stream), peer: Peer(peer), close_at })
    }
}

impl Connected for Conn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if let Some((deadline, _)) = &mut self.close_at {
            if std::future::Future::poll(deadline.as_mut(), cx).is_ready() {
                return Poll::Ready(Ok(())); // end of stream: the server closes the connection
            }
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepted connections of a Unix listener, each wrapped with its peer as of the accept;
/// connections over their uid's limit are closed at once.
pub fn incoming<S: SelectorSource>(
    listener: tokio::net::UnixListener,
    source: Arc<S>,
    limits: Arc<ConnLimits>,
) -> impl Stream<Item = std::io::Result<Conn>> {
    let accepted = tokio_stream::StreamExt::then(tokio_stream::wrappers::UnixListenerStream::new(listener), move |r| {
        let (source, limits) = (source.clone(), limits.clone());
        async move {
            match r {
                // Fixing the peer reads kernel state (records, a BPF iterator run): on a
                // blocking thread, not the runtime's.
                Ok(stream) => tokio::task::spawn_blocking(move || Conn::accept(stream, &*source, &limits))
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!("identifying a Workload API caller failed: {e}");
                        None
                    })
                    .map(Ok),
                Err(e) => Some(Err(e)),
            }
        }
    });
    tokio_stream::StreamExt::filter_map(accepted, |c| c)
}

pub struct WorkloadApi<S> {
    selectors: Arc<S>,
    /// The node's identities (the manager, in the agent).
    identities: Arc<dyn IdentitySource>,
}

impl<S: SelectorSource> WorkloadApi<S> {
    pub fn new(selectors: Arc<S>, identities: Arc<dyn IdentitySource>) -> Self {
        WorkloadApi { selectors, identities }
    }
}

const HEADER: &str = "workload.spiffe.io";

fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get(HEADER).and_then(|v| v.to_str().ok()) {
        Some("true") => Ok(()),
        _ => Err(Status::invalid_argument("security header missing from request: workload.spiffe.io: true")),
    }
}

/// The connection's peer, as fixed at accept.
fn conn_peer<T>(req: &Request<T>) -> Result<Arc<ConnPeer>, Status> {
    match req.extensions().get::<Peer>() {
        Some(Peer(peer)) => peer.clone(),
        None => Err(Status::permission_denied("caller could not be identified when it connected")),
    }
}

/// The selectors of the process that opened the connection, provided it still is that
/// process (cheap when its identity was derived moments ago; else blocking work on a
/// blocking thread).
async fn peer_selectors<S: SelectorSource>(source: &Arc<S>, peer: &Arc<ConnPeer>) -> Result<Vec<Selector>, Status> {
    // One map lookup first: a peer that is no longer who connected is refused before any
    // work is done for it (measuring a binary it exec'd since, say).
    peer.check(source.record(&peer.pidfd).as_ref())?;
    let (record, selectors) = match source.identify_fast(&peer.pidfd) {
        Some(id) => id,
        None => {
            let (source, p) = (source.clone(), peer.clone());
            tokio::task::spawn_blocking(move || source.identify(&p.pidfd))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| match e {
                    IdentityError::Exited => {
                        Status::permission_denied("the process that opened this connection has exited")
                    }
                    e => Status::permission_denied(format!("caller could not be identified: {e}")),
                })?
        }
    };
    peer.check(Some(&record))?;
    Ok(selectors)
}

/// The caller's selectors, as fixed for its connection.
async fn caller_selectors<S: SelectorSource, T>(source: &Arc<S>, req: &Request<T>) -> Result<Vec<Selector>, Status> {
    peer_selectors(source, &conn_peer(req)?).await
}

fn td_key(snapshot: &Snapshot) -> String {
    format!("spiffe://{}", snapshot.bundle.trust_domain)
}

/// The X.509 response for a caller's selectors: Ok(None) when it has entries but no SVID
/// is ready yet.
fn x509_response(snapshot: &Snapshot, selectors: &[Selector]) -> Result<Option<workload::X509svidResponse>, Status> {
    let entries = require_identity(snapshot, selectors)?;
    let bundle = snapshot.bundle.x509_authorities.concat();
    let mut hints = std::collections::HashSet::new();
    let svids: Vec<workload::X509svid> = entries
        .iter()
        .filter_map(|e| snapshot.svids.get(&e.id).map(|s| (e, s)))
        .filter(|(e, _)| e.hint.is_empty() || hints.insert(e.hint.clone()))
        .map(|(e, s)| workload::X509svid {
            spiffe_id: s.spiffe_id.to_string(),
            x509_svid: s.chain.concat(),
            x509_svid_key: s.key_pkcs8.clone(),
            bundle: bundle.clone(),
            hint: e.hint.clone(),
        })
        .collect();
    if svids.is_empty() {
        return Ok(None);
    }
    Ok(Some(workload::X509svidResponse { svids, crl: vec![], federated_bundles: HashMap::new() }))
}

/// JWKS with JWT authorities only, as a plain (standard) JWKS.
fn jwt_jwks(snapshot: &Snapshot) -> Vec<u8> {
    let doc: serde_json::Value = serde_json::from_slice(&snapshot.bundle.jwks).unwrap_or_default();
    let keys: Vec<serde_json::Value> = doc["keys"]
        .as_array()
        .map(|k| k.iter().filter(|k| k["use"] == "jwt-svid").cloned().collect())
        .unwrap_or_default();
    serde_json::json!({ "keys": keys }).to_string().into_bytes()
}

type Stream2<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Calls (and streams) one Workload API connection may have in flight at once.
pub const MAX_CALLS_PER_CONNECTION: usize = 32;

/// How often an open stream checks that its peer is still the process that connected.
const STREAM_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

type Make<T> = fn(&Snapshot, &[Selector]) -> Result<Option<T>, Status>;

/// Opens a stream: the handler computes the first message from the snapshot it borrowed from
/// `rx` (so errors such as PermissionDenied are returned as the call's status), then each
/// later change re-identifies the caller (an exec changes what it may have) and sends
/// `make(snapshot, selectors)` again.
async fn open_stream<S: SelectorSource, T: Send + 'static, R>(
    api: &WorkloadApi<S>,
    req: &Request<R>,
    make: Make<T>,
) -> Result<Stream2<T>, Status> {
    check_header(req)?;
    let peer = conn_peer(req)?;
    let selectors = peer_selectors(&api.selectors, &peer).await?;
    let mut rx = api.identities.subscribe();
    let snapshot = rx.borrow_and_update().clone();
    let first = make(&snapshot, &selectors)?
        .ok_or_else(|| Status::unavailable("SVIDs for this caller are not issued yet; retry"))?;
    let source = api.selectors.clone();
    let (tx, out) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut next = Some(first);
        // The peer is checked again at least this often: a stream whose peer exec'd or exited
        // ends even when nothing else changes.
        let mut recheck = tokio::time::interval(STREAM_RECHECK);
        recheck.tick().await;
        loop {
            if let Some(msg) = next.take() {
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
            let changed = tokio::select! {
                changed = rx.changed() => if changed.is_err() { break } else { true },
                _ = recheck.tick() => false,
                _ = tx.closed() => break,
            };
            if !changed {
                // One map lookup: is the peer still the process that connected?
                if let Err(status) = peer.check(source.record(&peer.pidfd).as_ref()) {
                    let _ = tx.send(Err(status)).await;
                    break;
                }
                continue;
            }
            let snapshot = rx.borrow_and_update().clone();
            let selectors = match peer_selectors(&source, &peer).await {
                Ok(s) => s,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    break;
                }
            };
            match make(&snapshot, &selectors) {
                Ok(msg) => next = msg,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    break;
                }
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out)))
}

fn no_identity() -> Status {
    Status::permission_denied("no identity issued: no registration entry matches the caller")
}

/// The caller's entries; PermissionDenied when it has none.
fn require_identity<'a>(snapshot: &'a Snapshot, selectors: &[Selector]) -> Result<Vec<&'a LocalEntry>, Status> {
    if !snapshot.node_attested {
        return Err(Status::permission_denied(
            "this node is not attested (its evidence was refused): no identities are issued",
        ));
    }
    let entries = snapshot.matching(selectors);
    if entries.is_empty() {
        return Err(no_identity());
    }
    Ok(entries)
}

fn x509_bundles(s: &Snapshot, sel: &[Selector]) -> Result<Option<workload::X509BundlesResponse>, Status> {
    require_identity(s, sel)?;
    Ok(Some(workload::X509BundlesResponse {
        crl: vec![],
        bundles: HashMap::from([(td_key(s), s.bundle.x509_authorities.concat())]),
    }))
}

fn jwt_bundles(s: &Snapshot, sel: &[Selector]) -> Result<Option<workload::JwtBundlesResponse>, Status> {
    require_identity(s, sel)?;
    Ok(Some(workload::JwtBundlesResponse { bundles: HashMap::from([(td_key(s), jwt_jwks(s))]) }))
}

fn json_to_prost(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => {
            Kind::ListValue(prost_types::ListValue { values: a.iter().map(json_to_prost).collect() })
        }
        serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o.iter().map(|(k, v)| (k.clone(), json_to_prost(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Verifies a JWT-SVID against the snapshot's JWT authorities
/// ([`crate::identity::jwt::JwtAuthorities::validate`]).
pub fn validate_jwt(snapshot: &Snapshot, token: &str, audience: &str) -> Result<(SpiffeId, serde_json::Value), String> {
    snapshot.jwt.validate(token, audience)
}

#[tonic::async_trait]
impl<S: SelectorSource> SpiffeWorkloadApi for WorkloadApi<S> {
    type FetchX509SVIDStream = Stream2<workload::X509svidResponse>;
    type FetchX509BundlesStream = Stream2<workload::X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream2<workload::JwtBundlesResponse>;
    type FetchWITSVIDStream = Stream2<workload::WitsvidResponse>;
    type FetchWITBundlesStream = Stream2<workload::WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<workload::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        Ok(Response::new(open_stream(self, &req, x509_response).await?))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<workload::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Ok(Response::new(open_stream(self, &req, x509_bundles).await?))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<workload::JwtsvidRequest>,
    ) -> Result<Response<workload::JwtsvidResponse>, Status> {
        check_header(&req)?;
        let r = req.get_ref();
        if r.audience.is_empty() || r.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let selectors = caller_selectors(&self.selectors, &req).await?;
        let r = req.get_ref();
        let snapshot = self.identities.current();
        let entries = require_identity(&snapshot, &selectors)?;
        let wanted: Vec<_> =
            entries.into_iter().filter(|e| r.spiffe_id.is_empty() || e.spiffe_id.to_string() == r.spiffe_id).collect();
        if wanted.is_empty() {
            return Err(Status::permission_denied(format!("the caller is not entitled to {}", r.spiffe_id)));
        }
        let mut svids = Vec::new();
        let mut hints = std::collections::HashSet::new();
        for e in wanted {
            if !e.hint.is_empty() && !hints.insert(e.hint.clone()) {
                continue;
            }
            let token = self
                .identities
                .jwt(&e.id, &r.audience)
                .await
                .map_err(|err| Status::unavailable(format!("JWT-SVID for {}: {err}", e.spiffe_id)))?;
            svids.push(workload::Jwtsvid { spiffe_id: e.spiffe_id.to_string(), svid: token, hint: e.hint.clone() });
        }
        Ok(Response::new(workload::JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<workload::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Ok(Response::new(open_stream(self, &req, jwt_bundles).await?))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<workload::ValidateJwtsvidRequest>,
    ) -> Result<Response<workload::ValidateJwtsvidResponse>, Status> {
        check_header(&req)?;
        let r = req.get_ref();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let selectors = caller_selectors(&self.selectors, &req).await?;
        let snapshot = self.identities.current();
        require_identity(&snapshot, &selectors)?;
        let r = req.get_ref();
        let (id, claims) = validate_jwt(&snapshot, &r.svid, &r.audience)
            .map_err(|e| Status::invalid_argument(format!("invalid JWT-SVID: {e}")))?;
        let fields = claims
            .as_object()
            .map(|o| o.iter().map(|(k, v)| (k.clone(), json_to_prost(v))).collect())
            .unwrap_or_default();
        Ok(Response::new(workload::ValidateJwtsvidResponse {
            spiffe_id: id.to_string(),
            claims: Some(prost_types::Struct { fields }),
        }))
    }

    async fn fetch_witsvid(
        &self,
        _: Request<workload::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented("the WIT-SVID profile is not supported"))
    }

    async fn fetch_wit_bundles(
        &self,
        _: Request<workload::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented("the WIT-SVID profile is not supported"))
    }
}

/// Binds the socket (replacing a stale one), world-connectable: callers are identified by
/// the kernel, not by file permissions.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64URL, Engine};
    use ring::{
        rand::SystemRandom,
        signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING},
    };
    use serde_json::{json, Value};

    use super::*;
    use crate::identity::Bundle;
    use crate::svid::now;

    struct Signer {
        key: EcdsaKeyPair,
        kid: &'static str,
    }

    impl Signer {
        fn new(kid: &'static str) -> Signer {
            let rng = SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            Signer {
                key: EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap(),
                kid,
            }
        }

        fn jwk(&self) -> Value {
            let point = self.key.public_key().as_ref();
            json!({"kty": "EC", "crv": "P-256", "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..65]),
                   "kid": self.kid, "use": "jwt-svid"})
        }

        fn sign(&self, header: &Value, claims: &Value) -> String {
            let input = format!("{}.{}", B64URL.encode(header.to_string()), B64URL.encode(claims.to_string()));
            let sig = self.key.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
            format!("{input}.{}", B64URL.encode(sig.as_ref()))
        }

        fn token(&self, sub: &str, aud: &str, exp: i64) -> String {
            self.sign(
                &json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"}),
                &json!({"sub": sub, "aud": aud, "exp": exp, "iat": now()}),
            )
        }
    }

    fn snapshot(keys: &[&Signer]) -> Snapshot {
        let jwks = json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string().into_bytes();
        let bundle = Bundle { trust_domain: "example.org".into(), x509_authorities: vec![], jwks, sequence: 1 };
        Snapshot::new(vec![], HashMap::new(), bundle, true)
    }

    #[test]
    fn a_genuine_token_validates() {
        let k = Signer::new("k1");
        let (id, claims) =
            validate_jwt(&snapshot(&[&k]), &k.token("spiffe://example.org/web", "db", now() + 60), "db").unwrap();
        assert_eq!(id.to_string(), "spiffe://example.org/web");
        assert_eq!(claims["aud"], "db");
    }

    #[test]
    fn each_bad_token_is_refused_naming_why() {
        let k = Signer::new("k1");
        let stranger = Signer::new("k2");
        let snap = snapshot(&[&k]);
        let later = now() + 60;
        let good = k.token("spiffe://example.org/web", "db", later);
        let parts: Vec<&str> = good.split('.').collect();
        let claims = json!({"sub": "spiffe://example.org/web", "aud": "db", "exp": later});
        let mut sig = B64URL.decode(parts[2]).unwrap();
        sig[3] ^= 1;
        let cases: Vec<(String, &str, &str)> = vec![
            (format!("{}.{}.{}", parts[0], parts[1], B64URL.encode(&sig)), "db", "signature does not verify"),
            (stranger.token("spiffe://example.org/web", "db", later), "db", "unknown kid \"k2\""),
            (format!("{}.{}.", B64URL.encode(r#"{"alg":"none"}"#), parts[1]), "db", "alg \"none\" is not allowed"),
            (k.sign(&json!({"alg": "HS256", "kid": "k1"}), &claims), "db", "alg \"HS256\" is not allowed"),
            (k.sign(&json!({"alg": "ES256", "kid": "k1", "typ": "x"}), &claims), "db", "typ \"x\" is neither"),
            (k.sign(&json!({"alg": "ES256"}), &claims), "db", "no kid"),
            (good.clone(), "payments", "audience \"payments\" is not in the token's aud"),
            (k.token("spiffe://example.org/web", "db", now() - 1), "db", "token expired at"),
            // Signed with this trust domain's key, yet naming another trust domain.
            (
                k.token("spiffe://other.org/web", "db", later),
                "db",
                "sub spiffe://other.org/web is of trust domain other.org",
            ),
            (k.token("not-an-id", "db", later), "db", "sub \"not-an-id\" is not a SPIFFE ID"),
            (
                k.sign(&json!({"alg": "ES256", "kid": "k1"}), &json!({"sub": "spiffe://example.org/web", "aud": "db"})),
                "db",
                "malformed: no exp claim",
            ),
            ("abc".into(), "db", "malformed: not a compact JWS"),
            ("a.b.c".into(), "db", "malformed: the header is not base64url"),
            (format!("{}.{}.x", B64URL.encode("[1"), parts[1]), "db", "malformed: the header is not JSON"),
        ];
        for (token, audience, reason) in cases {
            let err = validate_jwt(&snap, &token, audience).unwrap_err();
            assert!(err.starts_with(reason), "{token}: expected {reason:?}, got {err:?}");
        }
    }
}

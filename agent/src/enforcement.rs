//! In-kernel enforcement, the agent's side: which processes in the protected cgroups have
//! which identity (kernel record → selectors → registration entry), the policy compiled into
//! the kernel's maps (reloaded atomically when the file, the entries or the node's attestation
//! change), and the audit log of every drop the kernel reports.
//!
//! The kernel decides; the agent only keeps its tables current. Enforcement is pinned in
//! bpffs, so it keeps deciding with the last tables while no agent runs, and a new agent
//! takes the pins over.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tether_common::{
    drop_reason, key_kind, service_flags, sock_role, CidrKey, DropEvent, FlowKey, IdentityKey, RuleRef, ServiceKey,
    ServiceVal, SockState, TunnelConfig,
};
use tokio::sync::watch;

use crate::{
    cgroup::Cgroup,
    config::EnforcementConfig,
    ebpf::Enforcer,
    identity::{identity_number, Snapshot},
    mesh::{self, IdentityName, LocalService, LocalView, RemoteView},
    policy::{self, Compiled, Policy, PortRange},
    process::{
        caller::{ProcessIdentity, Resolver},
        manifest::Manifest,
        measure::{Outcome, Wait},
        pidfd::PidFd,
    },
};

/// How often this node's addresses are read again.
const ADDRS_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum EnforcementError {
    #[error("{0}")]
    Kernel(#[from] crate::ebpf::EbpfError),
    #[error("{0}")]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("{0}")]
    Policy(#[from] policy::PolicyError),
    #[error("golden manifest: {0}")]
    Manifest(String),
    #[error("rule {rule:?}: ports {lo}-{hi} span {n} ports; the kernel tables take a single port, up to {MAX_EXPANDED} per range, or any port")]
    PortRange { rule: String, lo: u16, hi: u16, n: u32 },
    #[error("identities {a} and {b} hash to the same number; rename one")]
    Collision { a: String, b: String },
}

/// A port range becomes one kernel row per port (0 = any); wider ranges are refused.
pub const MAX_EXPANDED: u32 = 1024;

/// The identities the node may have: every entry, with and without a golden binary; then
/// the identities other nodes serve (tunnels), never golden here (their binaries are
/// measured on their nodes), unless this node serves the same SPIFFE ID.
fn identity_table(snapshot: &Snapshot, remote: &RemoteView) -> Result<Vec<policy::IdentityInfo>, EnforcementError> {
    let mut table = IdentityTable::default();
    table.add_local(snapshot)?;
    for r in &remote.identities {
        table.add(policy::IdentityInfo {
            id: identity_number(&r.spiffe_id, false),
            spiffe_id: r.spiffe_id.clone(),
            namespace: if r.namespace.is_empty() { "default".into() } else { r.namespace.clone() },
            labels: r.labels.clone(),
            golden: false,
        })?;
    }
    Ok(table.out)
}

fn local_identity_table(snapshot: &Snapshot) -> Result<Vec<policy::IdentityInfo>, EnforcementError> {
    let mut table = IdentityTable::default();
    table.add_local(snapshot)?;
    Ok(table.out)
}

/// Identities by number, each number naming one identity: the same identity again is
/// skipped, another identity with the same number is an error.
#[derive(Default)]
struct IdentityTable {
    out: Vec<policy::IdentityInfo>,
    seen: HashMap<u32, String>,
}

impl IdentityTable {
    fn add(&mut self, info: policy::IdentityInfo) -> Result<(), EnforcementError> {
        let name = display_name(&info.spiffe_id, info.golden);
        match self.seen.get(&info.id) {
            Some(other) if *other == name => return Ok(()),
            Some(other) => return Err(EnforcementError::Collision { a: other.clone(), b: name }),
            None => {}
        }
        self.seen.insert(info.id, name);
        self.out.push(info);
        Ok(())
    }

    /// Every entry of the node, with and without a golden binary.
    fn add_local(&mut self, snapshot: &Snapshot) -> Result<(), EnforcementError> {
        for e in &snapshot.entries {
            for golden in [false, true] {
                self.add(policy::IdentityInfo {
                    id: identity_number(&e.spiffe_id.to_string(), golden),
                    spiffe_id: e.spiffe_id.to_string(),
                    namespace: e.namespace.clone(),
                    labels: e.labels.clone(),
                    golden,
                })?;
            }
        }
        Ok(())
    }
}

/// How audit lines and logs name an identity.
fn display_name(spiffe_id: &str, golden: bool) -> String {
    format!("{spiffe_id}{}", if golden { " (golden)" } else { "" })
}

fn ports(rule: &str, r: PortRange) -> Result<Vec<u16>, EnforcementError> {
    if r == PortRange::ANY {
        return Ok(vec![0]);
    }
    let n = u32::from(r.hi) - u32::from(r.lo) + 1;
    if n > MAX_EXPANDED {
        return Err(EnforcementError::PortRange { rule: rule.into(), lo: r.lo, hi: r.hi, n });
    }
    Ok((r.lo..=r.hi).collect())
}

/// Kernel rows for a compiled policy.
pub type Tables = (Vec<(FlowKey, RuleRef)>, Vec<(CidrKey, RuleRef)>, Vec<(CidrKey, RuleRef)>);

pub fn encode(c: &Compiled) -> Result<Tables, EnforcementError> {
    let name = |rule: u32| c.rule_names.get(rule as usize).cloned().unwrap_or_default();
    let mut flows = Vec::new();
    for f in &c.identity_flows {
        for port in ports(&name(f.rule), f.ports)? {
            let key = FlowKey { src: f.src, dst: f.dst, dport: port, _pad: 0, proto: u32::from(f.proto.ip_proto()) };
            flows.push((key, RuleRef { rule: f.rule }));
        }
    }
    let cidr = |rows: &[policy::CidrFlow]| -> Result<Vec<(CidrKey, RuleRef)>, EnforcementError> {
        let mut out = Vec::new();
        for f in rows {
            for port in ports(&name(f.rule), f.ports)? {
                let key = CidrKey {
                    prefixlen: 64 + u32::from(f.net.prefix),
                    identity: f.identity,
                    proto: u16::from(f.proto.ip_proto()),
                    port,
                    addr: f.net.addr,
                };
                out.push((key, RuleRef { rule: f.rule }));
            }
        }
        Ok(out)
    };
    Ok((flows, cidr(&c.egress)?, cidr(&c.ingress)?))
}

/// What the enforcement loop last pushed to the kernel, to push only changes.
#[derive(Default)]
struct Pushed {
    identities: Vec<(IdentityKey, u32)>,
    tables: Option<Tables>,
    node_attested: Option<bool>,
    /// When this node's addresses were last read.
    addrs_at: Option<std::time::Instant>,
    /// Sockets made before enforcement were looked for (once, after the first identities).
    preexisting_done: bool,
    /// When each published record key was first published: its processes' listeners are
    /// looked at for [`LATE_LISTENERS_FOR`] after.
    published_at: HashMap<IdentityKey, std::time::Instant>,
    /// What `tables` was compiled from (identities, the policy file's stamp, attestation):
    /// the policy is compiled again only when one of them changes.
    compiled_from: Option<(Vec<policy::IdentityInfo>, Option<SystemTime>, bool)>,
    metrics: String,
    /// Tunnels: the capture table and target, and the view last published to the tunnel.
    services: Option<Vec<(ServiceKey, ServiceVal)>>,
    capture: Option<Option<mesh::Capture>>,
    local_view: Option<Arc<LocalView>>,
}

pub struct Enforcement {
    config: EnforcementConfig,
    enforcer: Enforcer,
    golden: Option<Manifest>,
    cgroups: Vec<Cgroup>,
    policy: Option<(Policy, Option<SystemTime>)>,
    names: HashMap<u32, String>,
    pushed: Pushed,
    audit: Option<std::fs::File>,
    metrics: PathBuf,
    /// Policies this agent has loaded into the kernel (a metric tests and operators watch).
    policy_loads: u64,
    mesh: Option<mesh::EnforcementEnds>,
    /// Identities published because their process was seen, with when it was last seen:
    /// kept through a short absence (see [`KEEP_ABSENT`]).
    seen: HashMap<IdentityKey, (u32, String, std::time::Instant)>,
}

/// What one pass over the protected cgroups found.
#[derive(Default)]
struct Scan {
    identities: Vec<(IdentityKey, u32)>,
    /// The protected processes, with the pidfd they were identified through and the
    /// protected cgroup they are under (first scan only).
    processes: Vec<(u32, PidFd, crate::process::Record, u64)>,
    /// Later scans: the processes whose identity is published by this round, or was first
    /// published less than [`LATE_LISTENERS_FOR`] ago, as `processes`.
    newly_identified: Vec<(u32, PidFd, crate::process::Record, u64)>,
    /// Their network namespaces.
    namespaces: BTreeMap<u64, crate::netns::Netns>,
    /// Their TCP listeners (only looked for when a tunnel runs).
    services: Vec<LocalService>,
    /// The record keys of every process identified (an entry matched or not), and the
    /// SPIFFE ID of each that matched.
    present: std::collections::HashSet<IdentityKey>,
    matched: HashMap<IdentityKey, String>,
}

fn key_of(id: &ProcessIdentity) -> Option<IdentityKey> {
    let exe = id.record.exe.as_ref()?;
    Some(IdentityKey { cgroup_id: id.record.cgroup_id, exe: exe.key(), euid: id.record.euid, egid: id.record.egid })
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn ip(a: u32) -> String {
    std::net::Ipv4Addr::from(u32::from_be(a)).to_string()
}

impl Enforcement {
    /// Takes over (or creates) the pinned enforcement and opens the audit log. Until the
    /// first [`Enforcement::sync`], the kernel keeps what a previous agent left (or, on a
    /// first start, denies every flow of the protected cgroups).
    pub fn start(config: EnforcementConfig, data_dir: &Path, cgroup_root: &Path) -> Result<Self, EnforcementError> {
        let cgroups = config
            .protected_cgroups
            .iter()
            .map(|p| Cgroup::open(&if p.is_absolute() { p.clone() } else { cgroup_root.join(p) }))
            .collect::<Result<Vec<_>, _>>()?;
        let mut enforcer = Enforcer::start(&config.pin_dir, &cgroups)?;
        if let Some(per_root) = config.socket_processes_per_cgroup {
            enforcer.set_quota(&cgroups, per_root.min(crate::ebpf::EXEC_TABLE))?;
        }
        let support = crate::ebpf::probe_kernel();
        tracing::info!(
            protected = cgroups.len(),
            pin_dir = %config.pin_dir.display(),
            lease_seconds = config.node_lease_seconds,
            "enforcement active through cgroup hooks (sock_create, connect4, sendmsg4, post_bind4, getpeername4 with tunnel capture, \
             cgroup_skb ingress/egress) and tp_btf process records; BPF LSM hooks are not used{}",
            if support.bpf_lsm { " (this kernel would allow them)" } else { " (this kernel refuses them)" }
        );
        let mut enforcer = enforcer;
        enforcer.set_audit_interval(Duration::from_millis(config.audit_interval_ms))?;
        let golden = match &config.golden_manifest {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| EnforcementError::Manifest(format!("{}: {e}", p.display())))?;
                Some(
                    Manifest::parse(&text, &p.display().to_string())
                        .map_err(|e| EnforcementError::Manifest(e.to_string()))?,
                )
            }
            None => None,
        };
        let audit_path = config.audit_log.clone().unwrap_or_else(|| data_dir.join("audit.jsonl"));
        if let Some(dir) = audit_path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let audit = match std::fs::OpenOptions::new().create(true).append(true).open(&audit_path) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::error!(path = %audit_path.display(), "audit log unavailable: {e}");
                None
            }
        };
        Ok(Enforcement {
            config,
            enforcer,
            golden,
            cgroups,
            policy: None,
            names: HashMap::new(),
            pushed: Pushed::default(),
            audit,
            metrics: data_dir.join("metrics.prom"),
            policy_loads: 0,
            seen: HashMap::new(),
            mesh: None,
        })
    }

    /// Works with the node tunnel: remote identities in the policy, remote workloads in the
    /// kernel's capture table, and what is in force published back.
    pub fn with_mesh(&mut self, link: mesh::EnforcementEnds) {
        self.mesh = Some(link);
    }

    /// A reader of the process records the pinned programs keep: the resolver identities
    /// are derived with must read the same records the enforcement hooks read.
    pub fn monitor(&self) -> Result<crate::ebpf::Monitor, EnforcementError> {
        Ok(crate::ebpf::Monitor::open_pinned(&self.config.pin_dir)?)
    }

    /// The policy, re-read when the file changed. A file that does not parse keeps the
    /// previous policy in force (never none) and is reported.
    fn current_policy(&mut self) -> Option<&Policy> {
        let m = mtime(&self.config.policy);
        let stale = match &self.policy {
            Some((_, seen)) => *seen != m,
            None => true,
        };
        if stale {
            match Policy::load(&self.config.policy) {
                Ok(p) => {
                    tracing::info!(summary = %policy::check_summary(&p), "enforcement policy loaded");
                    self.policy = Some((p, m));
                }
                Err(e) => {
                    tracing::error!("enforcement policy NOT reloaded, the previous one stays in force: {e}");
                    if let Some((_, seen)) = &mut self.policy {
                        *seen = m; // report once per change
                    }
                }
            }
        }
        self.policy.as_ref().map(|(p, _)| p)
    }

    fn golden(&self, id: &ProcessIdentity) -> bool {
        let (Some(manifest), Some(path), Some(Outcome::Measured { sha256 })) =
            (&self.golden, &id.path, &id.measurement)
        else {
            return false;
        };
        manifest.expected(path) == Some(sha256)
    }

    /// Every process in the protected cgroups, identified from its kernel record.
    fn scan(&self, snapshot: &Snapshot, resolver: &Resolver) -> Scan {
        // The processes themselves are kept only for the one look at sockets made before
        // enforcement, at start-up.
        let want_processes = !self.pushed.preexisting_done;
        let mut out: HashMap<IdentityKey, u32> = HashMap::new();
        let mut scan = Scan::default();
        // Per namespace, its TCP listeners (read once per pass).
        let mut listeners: HashMap<u64, crate::netns::Listeners> = HashMap::new();
        for cg in &self.cgroups {
            let mut dirs = vec![cg.path.clone()];
            while let Some(dir) = dirs.pop() {
                if let Ok(rd) = std::fs::read_dir(&dir) {
                    dirs.extend(rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
                }
                let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else { continue };
                for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                    let netns = crate::netns::of_process(pid);
                    if let Some(ns) = &netns {
                        scan.namespaces.entry(ns.inode).or_insert_with(|| ns.clone());
                    }
                    let Ok(pidfd) = PidFd::open(pid) else { continue };
                    // Not waiting for a binary being hashed: this process is picked up on
                    // the round after its measurement finishes (or its deadline passes).
                    let identified = resolver.identify_with(&pidfd, Wait::No);
                    let mut pidfd = Some(pidfd);
                    if want_processes {
                        // Stamping its sockets needs only the kernel's record, not the
                        // measurement.
                        let record = match &identified {
                            Ok(id) => Some(id.record.clone()),
                            Err(_) => pidfd.as_ref().and_then(|p| resolver.record(p).ok().flatten()),
                        };
                        if let (Some(record), Some(pidfd)) = (record, pidfd.take()) {
                            scan.processes.push((pid, pidfd, record, cg.id));
                        }
                    }
                    let Ok(id) = identified else { continue };
                    let Some(key) = key_of(&id) else { continue };
                    scan.present.insert(key);
                    let Some(entry) = snapshot.matching(&id.selectors).into_iter().next() else { continue };
                    let number = identity_number(&entry.spiffe_id.to_string(), self.golden(&id));
                    out.insert(key, number);
                    scan.matched.insert(key, entry.spiffe_id.to_string());
                    let recent = self.pushed.published_at.get(&key).is_none_or(|t| t.elapsed() < LATE_LISTENERS_FOR);
                    if let Some(pidfd) = pidfd.filter(|_| recent) {
                        scan.newly_identified.push((pid, pidfd, id.record.clone(), cg.id));
                    }
                    if self.mesh.is_some() {
                        if let Some(ns) = &netns {
                            let table = listeners
                                .entry(ns.inode)
                                .or_insert_with(|| crate::netns::tcp_listeners(pid).unwrap_or_default());
                            for inode in crate::netns::socket_inodes(pid) {
                                if let Some((addr, port)) = table.get(&inode) {
                                    scan.services.push(LocalService {
                                        addr: *addr,
                                        port: *port,
                                        identity: number,
                                        spiffe_id: entry.spiffe_id.to_string(),
                                        netns: ns.inode,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        // Ordered by keep_briefly_absent, which adds to them.
        scan.identities = out.into_iter().collect();
        scan.services.sort();
        scan.services.dedup();
        scan
    }

    /// This node's addresses: those of the configured namespaces (or of every namespace of
    /// the machine) and of the protected processes' namespaces.
    fn node_addresses(&self, protected: &BTreeMap<u64, crate::netns::Netns>) -> Vec<std::net::Ipv4Addr> {
        let mut namespaces = if self.config.node_network_namespaces.is_empty() {
            crate::netns::all()
        } else {
            self.config
                .node_network_namespaces
                .iter()
                .filter_map(|p| match crate::netns::at(p) {
                    Ok(ns) => Some((ns.inode, ns)),
                    Err(e) => {
                        tracing::warn!(path = %p.display(), "node network namespace unreadable: {e}");
                        None
                    }
                })
                .collect()
        };
        namespaces.extend(protected.iter().map(|(k, v)| (*k, v.clone())));
        let mut addrs: Vec<std::net::Ipv4Addr> = namespaces
            .values()
            .filter_map(|ns| crate::netns::addresses(ns).ok())
            .flatten()
            // 127/8 is local everywhere; the kernel programs know it.
            .filter(|a| !a.is_loopback())
            .collect();
        addrs.sort();
        addrs.dedup();
        addrs
    }

    /// Keeps in `scan.identities` what was published for a record key whose processes were
    /// all absent from this scan, for [`KEEP_ABSENT`] after one was last seen, while an entry
    /// with that SPIFFE ID still exists; remembers when each matched key was seen, and puts
    /// the identities in a stable order.
    fn keep_briefly_absent(&mut self, scan: &mut Scan, snapshot: &Snapshot) {
        let now = std::time::Instant::now();
        for (key, number) in &scan.identities {
            if let Some(id) = scan.matched.get(key) {
                self.seen.insert(*key, (*number, id.clone(), now));
            }
        }
        let entry_exists = |id: &str| snapshot.entries.iter().any(|e| e.spiffe_id.to_string() == id);
        self.seen.retain(|key, (number, id, at)| {
            if scan.matched.contains_key(key) {
                return true;
            }
            if scan.present.contains(key) || now.duration_since(*at) >= KEEP_ABSENT || !entry_exists(id) {
                return false;
            }
            scan.identities.push((*key, *number));
            true
        });
        // A stable order, so "changed" means changed.
        scan.identities.sort_by_key(|(k, _)| {
            (k.cgroup_id, k.exe.ino, k.exe.ctime_sec, k.exe.ctime_nsec, k.exe.dev, k.euid, k.egid)
        });
    }

    /// Sockets the protected processes held before enforcement was attached carry no state,
    /// and the kernel drops their traffic (fail closed). Listening and bound sockets are
    /// stamped as their holder's (the holder's identity then decides, as for any socket it
    /// makes); connected ones stay unstamped and are reported: their connections were never
    /// judged. Every one is written to the audit log.
    ///
    /// With `only_listeners`, for processes whose identity is being published: a TCP listener
    /// made with listen() and no bind() while its process had no identity was stamped by no
    /// hook (socket() stamps only for an identity; bind() stamps always, but none ran), so
    /// nothing could reach it. It is stamped as its holder's now.
    fn stamp_preexisting(&mut self, processes: &[(u32, PidFd, crate::process::Record, u64)], only_listeners: bool) {
        for (pid, pidfd, record, root) in processes {
            let Some(exe) = record.exe else { continue };
            let state = SockState {
                key: IdentityKey { cgroup_id: record.cgroup_id, exe: exe.key(), euid: record.euid, egid: record.egid },
                exec_ktime_ns: record.exec_ktime_ns,
                tgid: record.tgid,
                key_valid: key_kind::RECORD,
                role: sock_role::INBOUND,
                ..SockState::default()
            };
            for held in crate::netns::inet_sockets(*pid, pidfd) {
                match self.enforcer.socket_state(&held.fd) {
                    Ok(None) => {}
                    _ => continue,
                }
                let listening = crate::netns::sockopt(&held.fd, libc::SO_ACCEPTCONN) == Some(1);
                if only_listeners && !listening {
                    continue;
                }
                let udp = crate::netns::sockopt(&held.fd, libc::SO_TYPE) == Some(libc::SOCK_DGRAM);
                let connected = {
                    // SAFETY: an all-zero sockaddr_in to fill; the length says how much.
                    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                    // SAFETY: a valid fd and buffer.
                    unsafe {
                        libc::getpeername(
                            std::os::fd::AsRawFd::as_raw_fd(&held.fd),
                            (&mut addr as *mut libc::sockaddr_in).cast(),
                            &mut len,
                        ) == 0
                    }
                };
                let action = if listening || (udp && !connected) {
                    match self.enforcer.stamp_socket(&held.fd, state, *root) {
                        Ok(()) => "stamped as its holder's",
                        Err(e) => {
                            tracing::warn!(pid, fd = held.number, "stamping a socket made before enforcement: {e}");
                            "left unstamped (stamping failed)"
                        }
                    }
                } else {
                    "left unstamped: its connection was never judged and carries nothing"
                };
                let line = serde_json::json!({
                    "time": SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
                    "event": if only_listeners { "listener_made_before_identity" } else { "socket_made_before_enforcement" },
                    "pid": pid,
                    "fd": held.number,
                    "listening": listening,
                    "udp": udp,
                    "connected": connected,
                    "action": action,
                });
                tracing::warn!(target: "tether_agent::audit", "{line}");
                if let Some(f) = &mut self.audit {
                    let _ = writeln!(f, "{line}");
                }
            }
        }
    }

    /// One round: identities, policy, local addresses and the node's lease into the kernel
    /// (only what changed; the lease every round while the node is attested).
    pub fn sync(&mut self, snapshot: &Snapshot, resolver: &Resolver) -> Result<(), EnforcementError> {
        let attested = snapshot.node_attested;
        if attested {
            self.enforcer.set_lease(Duration::from_secs(self.config.node_lease_seconds))?;
        } else if self.pushed.node_attested != Some(false) {
            // A refused node ends its lease at once, not when it runs out.
            self.enforcer.set_lease(Duration::ZERO)?;
        }
        if self.pushed.node_attested != Some(attested) {
            self.pushed.node_attested = Some(attested);
            tracing::info!(attested, "enforcement: node attestation state");
        }
        let remote: Arc<RemoteView> = self.mesh.as_ref().map(|m| m.remote.borrow().clone()).unwrap_or_default();
        let identities = identity_table(snapshot, &remote)?;
        let policy = self.current_policy().cloned();
        let inputs = (identities, self.policy.as_ref().and_then(|(_, seen)| *seen), attested);
        let changed = self.pushed.compiled_from.as_ref() != Some(&inputs);
        if changed {
            self.names = inputs.0.iter().map(|i| (i.id, display_name(&i.spiffe_id, i.golden))).collect();
        }
        if let Some(policy) = policy.filter(|_| changed) {
            let mut compiled = policy::compile(&policy, &inputs.0, &policy::Context { node_attested: attested });
            // Rows between two remote identities concern no workload of this node; address
            // rows only ever apply to local workloads.
            let local: std::collections::HashSet<u32> = local_identity_table(snapshot)?.iter().map(|i| i.id).collect();
            compiled.identity_flows.retain(|f| local.contains(&f.src) || local.contains(&f.dst));
            compiled.egress.retain(|f| local.contains(&f.identity));
            compiled.ingress.retain(|f| local.contains(&f.identity));
            match encode(&compiled) {
                Ok(tables) if self.pushed.tables.as_ref() != Some(&tables) => {
                    self.enforcer.load_policy(&tables.0, &tables.1, &tables.2)?;
                    self.policy_loads += 1;
                    tracing::info!(
                        flows = tables.0.len(),
                        egress = tables.1.len(),
                        ingress = tables.2.len(),
                        "enforcement policy in force"
                    );
                    self.pushed.tables = Some(tables);
                }
                Ok(_) => {}
                Err(e) => tracing::error!("enforcement policy NOT applied, the previous one stays in force: {e}"),
            }
            self.pushed.compiled_from = Some(inputs);
        }
        let mut scan = self.scan(snapshot, resolver);
        self.keep_briefly_absent(&mut scan, snapshot);
        if self.pushed.addrs_at.is_none_or(|at| at.elapsed() >= ADDRS_EVERY) {
            let addrs = self.node_addresses(&scan.namespaces);
            if self.enforcer.set_local_addrs(&addrs)? {
                tracing::info!(addresses = ?addrs, "this node's addresses (never admitted by address rules)");
            }
            self.pushed.addrs_at = Some(std::time::Instant::now());
        }
        let ids = scan.identities;
        if ids != self.pushed.identities {
            self.enforcer.set_identities(&ids)?;
            for (key, id) in ids.iter().filter(|x| !self.pushed.identities.contains(x)) {
                tracing::info!(
                    cgroup_id = key.cgroup_id,
                    exe_ino = key.exe.ino,
                    euid = key.euid,
                    identity = %self.names.get(id).map(String::as_str).unwrap_or("?"),
                    "enforcement identity published"
                );
            }
            let now = std::time::Instant::now();
            self.pushed.published_at.retain(|k, _| ids.iter().any(|(key, _)| key == k));
            for (key, _) in &ids {
                self.pushed.published_at.entry(*key).or_insert(now);
            }
            self.pushed.identities = ids;
        }
        if !self.pushed.preexisting_done {
            self.stamp_preexisting(&scan.processes, false);
            self.pushed.preexisting_done = true;
        } else if !scan.newly_identified.is_empty() {
            self.stamp_preexisting(&scan.newly_identified, true);
        }
        if self.mesh.is_some() {
            let local: std::collections::HashSet<u32> = local_identity_table(snapshot)?.iter().map(|i| i.id).collect();
            let identities = self.pushed.compiled_from.as_ref().map(|c| c.0.clone()).unwrap_or_default();
            self.sync_mesh(&remote, &identities, &local, scan.services, attested)?;
        }
        self.write_metrics();
        Ok(())
    }

    /// Tunnels: the remote workloads into the capture table (after the policy that judges
    /// them), the capture target, and the view of what is in force for the tunnel.
    fn sync_mesh(
        &mut self,
        remote: &RemoteView,
        identities: &[policy::IdentityInfo],
        local: &std::collections::HashSet<u32>,
        services: Vec<LocalService>,
        attested: bool,
    ) -> Result<(), EnforcementError> {
        let mut table: Vec<(ServiceKey, ServiceVal)> = remote
            .services
            .iter()
            .map(|s| {
                let down = remote.peers.get(s.peer).is_some_and(|p| p.down);
                (
                    ServiceKey { addr: u32::from_ne_bytes(s.addr.octets()), port: s.port.to_be(), _pad: 0 },
                    ServiceVal {
                        identity: identity_number(&s.spiffe_id, false),
                        flags: if down { service_flags::NODE_DOWN } else { 0 },
                    },
                )
            })
            .collect();
        table.sort_by_key(|(k, _)| (k.addr, k.port));
        if self.pushed.services.as_ref() != Some(&table) {
            self.enforcer.set_tunnel_services(&table)?;
            tracing::info!(services = table.len(), "remote workloads in the capture table");
            self.pushed.services = Some(table);
        }
        if self.pushed.capture != Some(remote.capture) {
            let config = match remote.capture {
                Some(c) => TunnelConfig {
                    netns_cookie: c.netns_cookie,
                    listener_addr: u32::from_ne_bytes(c.listener.ip().octets()),
                    listener_port: c.listener.port().to_be(),
                    enabled: 1,
                },
                None => TunnelConfig::default(),
            };
            self.enforcer.set_tunnel_config(config)?;
            tracing::info!(capture = ?remote.capture, "tunnel capture");
            self.pushed.capture = Some(remote.capture);
        }
        let names = identities
            .iter()
            .map(|i| {
                let name =
                    IdentityName { spiffe_id: i.spiffe_id.clone(), golden: i.golden, local: local.contains(&i.id) };
                (i.id, name)
            })
            .collect();
        let view = LocalView {
            node_attested: attested,
            identities: names,
            flows: self.pushed.tables.as_ref().map(|t| t.0.iter().map(|(k, _)| *k).collect()).unwrap_or_default(),
            services,
        };
        if self.pushed.local_view.as_deref() != Some(&view) {
            let view = Arc::new(view);
            self.pushed.local_view = Some(view.clone());
            if let Some(m) = &self.mesh {
                m.local.send_replace(view);
            }
        }
        Ok(())
    }

    /// Ends the node's lease now (the agent could not attest the node at start).
    pub fn end_lease(&mut self) -> Result<(), EnforcementError> {
        self.enforcer.set_lease(Duration::ZERO)?;
        Ok(())
    }

    /// `metrics.prom`, rewritten only when a count changed.
    fn write_metrics(&mut self) {
        let Ok(counts) = self.enforcer.drop_counts() else { return };
        let mut text = String::from("# HELP tether_enforcement_drops_total Flows and packets dropped in the kernel, by reason.\n# TYPE tether_enforcement_drops_total counter\n");
        for (reason, n) in counts.iter().enumerate().skip(1) {
            text.push_str(&format!(
                "tether_enforcement_drops_total{{reason=\"{}\"}} {n}\n",
                drop_reason::name(reason as u32)
            ));
        }
        text.push_str(&format!("tether_enforcement_identities {}\n", self.pushed.identities.len()));
        text.push_str(&format!(
            "# HELP tether_enforcement_policy_loads_total Policies this agent loaded into the kernel.\n# TYPE tether_enforcement_policy_loads_total counter\ntether_enforcement_policy_loads_total {}\n",
            self.policy_loads
        ));
        if let Ok(until) = self.enforcer.lease_until_ns() {
            text.push_str(&format!("tether_enforcement_lease_until_monotonic_ns {until}\n"));
        }
        if text == self.pushed.metrics {
            return;
        }
        let tmp = self.metrics.with_extension("tmp");
        match std::fs::write(&tmp, &text).and_then(|_| std::fs::rename(&tmp, &self.metrics)) {
            Ok(()) => self.pushed.metrics = text,
            Err(e) => tracing::debug!("metrics not written: {e}"),
        }
    }

    /// One audit line per reported drop.
    pub fn audit(&mut self, events: &[DropEvent]) {
        for e in events {
            let name = |id: u32| match id {
                0 => serde_json::Value::Null,
                id => serde_json::Value::String(self.names.get(&id).cloned().unwrap_or_else(|| format!("#{id}"))),
            };
            let line = serde_json::json!({
                "time": SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
                "verdict": "drop",
                "reason": drop_reason::name(e.reason),
                "direction": if e.direction == tether_common::direction::INGRESS { "ingress" } else { "egress" },
                "src_identity": name(e.src_identity),
                "dst_identity": name(e.dst_identity),
                "proto": match e.tuple.proto { 6 => "tcp", 17 => "udp", _ => "other" },
                "src": format!("{}:{}", ip(e.tuple.saddr), u16::from_be(e.tuple.sport)),
                "dst": format!("{}:{}", ip(e.tuple.daddr), u16::from_be(e.tuple.dport)),
                "tgid": e.tgid,
                "cgroup_id": e.cgroup_id,
                "suppressed_before": e.suppressed,
            });
            tracing::warn!(target: "tether_agent::audit", "{line}");
            if let Some(f) = &mut self.audit {
                let _ = writeln!(f, "{line}");
            }
        }
    }
}

/// The least time between two scans started by execs (a burst of execs is one scan, and a
/// workload exec'ing in a loop costs at most ten scans a second).
const EXEC_SCAN_GAP: Duration = Duration::from_millis(100);

/// How long an identity stays published after the last process with its record key was
/// seen, while its entry still exists: a workload restarting (its old process gone, the new
/// one between a wrapper's exec and its own) keeps its identity instead of flapping, now
/// that execs start scans at exactly those moments. An entry deleted, or a process seen
/// that no longer matches, withdraws it at once.
const KEEP_ABSENT: Duration = Duration::from_secs(2);

/// For how long after an identity is first published its processes' listeners are looked
/// at (and stamped if no hook could): a listener made by `socket()` before the publication
/// and `listen()` after it (no bind), or one whose stamping failed, is caught meanwhile.
const LATE_LISTENERS_FOR: Duration = Duration::from_secs(10);

/// Runs enforcement next to the identity plane: syncs every `every` and whenever the
/// snapshot changes, and writes the audit log as drops arrive.
pub async fn run(
    mut enforcement: Enforcement,
    resolver: Arc<Resolver>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    every: Duration,
) {
    let mut drops = match enforcement.enforcer.take_drop_events() {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::error!("no drop events (the audit log stays empty; drops are still counted): {e}");
            None
        }
    };
    // An exec in a protected cgroup scans at once (at most every EXEC_SCAN_GAP), so a new
    // process's identity is published within milliseconds, not a scan interval.
    let mut execs = match enforcement.enforcer.take_exec_events() {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!("no exec events (new processes are identified at the next scan): {e}");
            None
        }
    };
    let mut last_sync = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(every);
    let mut remote = enforcement.mesh.as_ref().map(|m| m.remote.clone());
    let mut measured = resolver.measurer().finished();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            batch = async {
                match &mut execs {
                    Some(e) => e.next_batch().await,
                    None => std::future::pending().await,
                }
            } => {
                match batch {
                    // Only execs under a protected cgroup are sent (the programs filter).
                    Ok(_) => tokio::time::sleep_until(last_sync + EXEC_SCAN_GAP).await,
                    Err(e) => {
                        tracing::warn!("reading exec events (new processes are identified at the next scan): {e}");
                        execs = None;
                        continue;
                    }
                }
            }
            changed = snapshots.changed() => if changed.is_err() { return },
            changed = async {
                match &mut remote {
                    Some(r) => r.changed().await,
                    None => std::future::pending().await,
                }
            } => if changed.is_err() { remote = None },
            // A binary the last scan skipped while it was being hashed.
            _ = measured.changed() => {}
            batch = async {
                match &mut drops {
                    Some(d) => d.next_batch().await,
                    None => std::future::pending().await,
                }
            } => {
                match batch {
                    Ok(events) => enforcement.audit(&events),
                    Err(e) => tracing::warn!("reading drop events: {e}"),
                }
                continue;
            }
        }
        let snapshot = snapshots.borrow_and_update().clone();
        // Identification reads /proc and hashes binaries: not on the async workers.
        let result = tokio::task::block_in_place(|| enforcement.sync(&snapshot, &resolver));
        last_sync = tokio::time::Instant::now();
        if let Err(e) = result {
            tracing::error!("enforcement sync failed (the kernel keeps the previous tables): {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{CidrFlow, IdentityFlow, Ipv4Net, Proto};

    #[test]
    fn encoding_expands_ports_and_keeps_any_as_zero() {
        let c = Compiled {
            identity_flows: vec![IdentityFlow {
                rule: 0,
                src: 7,
                dst: 9,
                proto: Proto::Tcp,
                ports: PortRange { lo: 80, hi: 81 },
            }],
            egress: vec![CidrFlow {
                rule: 1,
                identity: 7,
                net: Ipv4Net { addr: [10, 0, 0, 0], prefix: 8 },
                proto: Proto::Udp,
                ports: PortRange::ANY,
            }],
            ingress: vec![],
            rule_names: vec!["a".into(), "b".into()],
        };
        let (flows, egress, ingress) = encode(&c).unwrap();
        assert_eq!(flows.iter().map(|(k, _)| k.dport).collect::<Vec<_>>(), vec![80, 81]);
        assert_eq!(flows[0].0.proto, 6);
        assert_eq!(egress.len(), 1);
        assert_eq!((egress[0].0.prefixlen, egress[0].0.port, egress[0].0.proto, egress[0].1.rule), (72, 0, 17, 1));
        assert!(ingress.is_empty());
        let wide = Compiled {
            identity_flows: vec![IdentityFlow {
                rule: 0,
                src: 1,
                dst: 2,
                proto: Proto::Tcp,
                ports: PortRange { lo: 1000, hi: 9000 },
            }],
            rule_names: vec!["wide".into()],
            ..c
        };
        let e = encode(&wide).unwrap_err().to_string();
        assert!(e.contains("rule \"wide\": ports 1000-9000 span 8001 ports"), "{e}");
    }
}

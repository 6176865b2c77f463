//! Enforcement: the kernel programs of `agent-ebpf/src/enforce.rs` attached to protected
//! cgroups, their identity and policy maps, and the drop audit stream.
//!
//! Everything lives pinned under one bpffs directory, so enforcement outlives the agent and
//! the next agent takes it over without a gap:
//!
//! ```text
//! <pin_dir>/v2/<MAP>                        every map the programs share (common::maps names,
//!                                           plus TASK_RECORDS and MEASUREMENTS)
//! <pin_dir>/v2/links/process/<program>      the record-keeping tp_btf links
//! <pin_dir>/v2/links/<cgroup-id>/<program>  one cgroup link per enforcement program and cgroup
//! ```
//!
//! `v2` is the layout of the maps' keys and values: pins of another layout (an agent of
//! another version) are never reused with programs that read them differently. They are
//! removed once this layout's programs are attached beside them (both refuse while both
//! run), so an upgrade leaves no moment without enforcement.
//!
//! Taking over (after the previous agent was killed, or on upgrade): the maps are reused as
//! they are (identities, policy, stamps and records keep working), every pinned cgroup link
//! is switched to the new program with `BPF_LINK_UPDATE` + `BPF_F_REPLACE` (atomic: no
//! packet sees no program), and the tracing links are replaced after the new ones are
//! attached (they cannot be updated).

use std::{
    ffi::CString,
    fs::{self, File},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData, MapError, PerCpuArray, RingBuf, SkStorage,
    },
    programs::{
        links::{CgroupAttachMode, FdLink},
        CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
    },
    Btf as AyaBtf, Ebpf,
};
use tether_common::{
    drop_reason, maps, programs, CidrKey, DropEvent, EnforceConfig, ExecGen, FlowKey, IdentityKey, IdentityVal,
    ProtectedRoot, Quota, RuleRef, ServiceKey, ServiceVal, SockState, TraceFilter, TunnelConfig, MAX_PROTECTED_ROOTS,
};
use tokio::io::unix::AsyncFd;

use super::{load_with_pins, map_err, monitor, program_err, EbpfError, Loaded};
use crate::cgroup::Cgroup;

/// Entries of the kernel's exec table (`EXEC_GEN`), shared out as per-root quotas.
pub const EXEC_TABLE: u64 = 65536;

/// The layout of the pinned maps' keys and values; pins of another layout are never reused.
pub(super) const LAYOUT: &str = "v2";

/// Maps pinned under the pin directory: shared by every load on it, kept across agents.
pub(super) const PINNED_MAPS: [&str; 24] = [
    maps::TASK_RECORDS,
    // Not read by enforcement yet; pinned so that a `Monitor::open_pinned` publishes
    // measurements where the pinned programs can see them.
    maps::MEASUREMENTS,
    maps::IDENTITIES,
    maps::SOCK_STATE,
    maps::EXEC_GEN,
    maps::EXEC_GEN_EXITS,
    maps::EXEC_EPOCH,
    maps::EXEC_GEN_QUOTA,
    maps::PROTECTED_ROOTS,
    maps::LOCAL_ADDRS,
    maps::FLOWS[0],
    maps::FLOWS[1],
    maps::EGRESS[0],
    maps::EGRESS[1],
    maps::INGRESS[0],
    maps::INGRESS[1],
    maps::ENFORCE_CONFIG,
    maps::DROP_EVENTS,
    maps::DROP_COUNTS,
    maps::AUDIT_LIMIT,
    maps::TUNNEL_SERVICES,
    maps::TUNNEL_CONFIG,
    maps::TUNNEL_SOCK,
    maps::TUNNEL_CONNS,
];

/// Where a pinned map of this layout lives (for the tunnel, which opens the few it uses).
pub(super) fn pinned_map_path(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join(LAYOUT).join(name)
}

/// Directory (under `links/`) of the record-keeping links.
const PROCESS_LINKS: &str = "process";

#[derive(Clone, Copy, Debug)]
pub(super) enum Hook {
    Sock,
    SockAddr,
    SkbIngress,
    SkbEgress,
}

/// The enforcement programs in attach order: sockets are stamped before anything checks a
/// stamp.
const HOOKS: [(&str, Hook); 7] = [
    (programs::SOCK_CREATE, Hook::Sock),
    (programs::POST_BIND4, Hook::Sock),
    (programs::SKB_EGRESS, Hook::SkbEgress),
    (programs::SKB_INGRESS, Hook::SkbIngress),
    // Attached only with tunnel capture, before any socket is captured (see
    // Enforcer::set_tunnel_config), so a captured socket always shows what it dialled.
    (programs::GETPEERNAME4, Hook::SockAddr),
    (programs::SENDMSG4, Hook::SockAddr),
    (programs::CONNECT4_ENFORCE, Hook::SockAddr),
];

/// The address-less part of a [`CidrKey`], as aya's LPM key carries it after the prefix
/// length (same 16 bytes as the kernel side's key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct CidrData {
    identity: u32,
    proto: u16,
    port: u16,
    addr: [u8; 4],
}

// SAFETY: repr(C), no padding (4 + 2 + 2 + 4), every bit pattern valid.
unsafe impl aya::Pod for CidrData {}

const _: () = assert!(size_of::<Key<CidrData>>() == size_of::<CidrKey>());

/// Bits of a [`CidrKey`] always matched in full: identity, protocol, port.
const CIDR_FIXED_BITS: u32 = 64;

fn cidr_key(k: &CidrKey, name: &'static str) -> Result<Key<CidrData>, EbpfError> {
    if !(CIDR_FIXED_BITS..=CIDR_FIXED_BITS + 32).contains(&k.prefixlen) {
        return Err(EbpfError::InvalidEntry { name, what: "CidrKey prefixlen must be 64 + (0..=32)" });
    }
    Ok(Key::new(k.prefixlen, CidrData { identity: k.identity, proto: k.proto, port: k.port, addr: k.addr }))
}

/// A pinned link, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedLinkStatus {
    pub path: PathBuf,
    pub link_id: u32,
    pub program_id: u32,
}

/// Enforcement attached to protected cgroups. Dropping it leaves enforcement in place (the
/// links and maps are pinned): that is what happens when the agent exits or is killed.
/// [`Enforcer::detach_all`] removes it.
pub struct Enforcer {
    pin_dir: PathBuf,
    identities: HashMap<MapData, IdentityKey, IdentityVal>,
    sock_state: SkStorage<MapData, SockState>,
    exec_gen: HashMap<MapData, u32, ExecGen>,
    local_addrs: HashMap<MapData, u32, u32>,
    quotas: HashMap<MapData, u64, Quota>,
    flows: [HashMap<MapData, FlowKey, RuleRef>; 2],
    egress: [LpmTrie<MapData, CidrData, RuleRef>; 2],
    ingress: [LpmTrie<MapData, CidrData, RuleRef>; 2],
    config: Array<MapData, EnforceConfig>,
    drop_counts: PerCpuArray<MapData, u64>,
    drop_events: Option<RingBuf<MapData>>,
    tunnel_services: HashMap<MapData, ServiceKey, ServiceVal>,
    tunnel_config: Array<MapData, TunnelConfig>,
    /// The cgroups enforced on (hooks attached later go to them).
    protected: Vec<Cgroup>,
    _loaded: Loaded,
}

/// The drop audit stream, taken out of the [`Enforcer`] so it can be awaited on its own.
pub struct DropEvents {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl Enforcer {
    /// Loads the programs, or takes over the ones pinned under `pin_dir` (e.g.
    /// `/sys/fs/bpf/tether/<name>`, created if missing; it must be on bpffs), and enforces on
    /// each `protected` cgroup — cgroups the caller owns, never the root cgroup.
    ///
    /// Also keeps the process records (tp_btf programs, pinned links) and seeds records for
    /// processes already running. Cgroups pinned by a previous agent but not in `protected`
    /// stay enforced, switched to the new programs like the others.
    pub fn start(pin_dir: &Path, protected: &[Cgroup]) -> Result<Self, EbpfError> {
        if protected.iter().any(|cg| cg.level == 0) {
            return Err(EbpfError::Io {
                op: "refusing to attach to the root cgroup",
                source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            });
        }
        let dir = pin_dir.join(LAYOUT);
        let links = dir.join("links");
        let process_links = links.join(PROCESS_LINKS);
        fs::create_dir_all(&process_links)
            .map_err(|source| EbpfError::Io { op: "creating the pin directory", source })?;

        let mut loaded = load_with_pins(Some(&dir), &PINNED_MAPS)?;
        let ebpf = &mut loaded.ebpf;
        let btf = AyaBtf::from_sys_fs()?;
        monitor::attach_process_programs(ebpf, &btf, Some(&process_links))?;
        monitor::seed(ebpf, &btf)?;

        for (name, hook) in HOOKS {
            load_hook(ebpf, name, hook)?;
        }
        // Take over what a previous agent left: every pinned cgroup link now runs our programs.
        for dir in cgroup_link_dirs(&links)? {
            for (name, _) in HOOKS {
                let pin = dir.join(name);
                if !pin.exists() {
                    continue;
                }
                match replace_link_program(&pin, prog_fd(ebpf, name)?) {
                    Ok(()) => {}
                    // The cgroup is gone (its links were detached with it): forget the pins.
                    Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {
                        tracing::info!(pin = %pin.display(), "pinned link of a removed cgroup dropped");
                        let _ = fs::remove_file(&pin);
                    }
                    Err(source) => return Err(EbpfError::Io { op: "updating a pinned cgroup link", source }),
                }
            }
            // Empty once every pin in it was dropped above.
            let _ = fs::remove_dir(&dir);
        }
        // getpeername4 only serves captured sockets: attached when capture is enabled (see
        // set_tunnel_config), now if the pinned configuration already captures, and kept
        // (updated above) where a previous agent had it.
        let capture_on = {
            let map = ebpf.map(maps::TUNNEL_CONFIG).ok_or(EbpfError::Missing(maps::TUNNEL_CONFIG))?;
            let config: Array<&MapData, TunnelConfig> =
                Array::try_from(map).map_err(map_err(maps::TUNNEL_CONFIG, "open"))?;
            config.get(&0, 0).is_ok_and(|c| c.enabled != 0)
        };
        for cg in protected {
            attach_missing(ebpf, &links, cg, |name| capture_on || name != programs::GETPEERNAME4)?;
            tracing::info!(cgroup_id = cg.id, cgroup = %cg.path.display(), "enforcing");
        }

        // Pins of another layout (an older agent's) go once ours run beside them.
        remove_other_layouts(pin_dir)?;

        let identities = HashMap::try_from(take(ebpf, maps::IDENTITIES)?).map_err(map_err(maps::IDENTITIES, "open"))?;
        let sock_state =
            SkStorage::try_from(take(ebpf, maps::SOCK_STATE)?).map_err(map_err(maps::SOCK_STATE, "open"))?;
        let local_addrs =
            HashMap::try_from(take(ebpf, maps::LOCAL_ADDRS)?).map_err(map_err(maps::LOCAL_ADDRS, "open"))?;
        let exec_gen = HashMap::try_from(take(ebpf, maps::EXEC_GEN)?).map_err(map_err(maps::EXEC_GEN, "open"))?;
        let quotas =
            HashMap::try_from(take(ebpf, maps::EXEC_GEN_QUOTA)?).map_err(map_err(maps::EXEC_GEN_QUOTA, "open"))?;
        let mut roots: Array<MapData, ProtectedRoot> =
            Array::try_from(take(ebpf, maps::PROTECTED_ROOTS)?).map_err(map_err(maps::PROTECTED_ROOTS, "open"))?;
        // The protected roots, for the per-root quotas (a root pinned by a previous agent and
        // not configured now keeps being enforced, but shares the catch-all quota 0).
        for i in 0..MAX_PROTECTED_ROOTS {
            let root = protected
                .get(i as usize)
                .map(|cg| ProtectedRoot { cgroup_id: cg.id, level: cg.level, _pad: 0 })
                .unwrap_or_default();
            roots.set(i, root, 0).map_err(map_err(maps::PROTECTED_ROOTS, "set"))?;
        }
        let flows = [
            HashMap::try_from(take(ebpf, maps::FLOWS[0])?).map_err(map_err(maps::FLOWS[0], "open"))?,
            HashMap::try_from(take(ebpf, maps::FLOWS[1])?).map_err(map_err(maps::FLOWS[1], "open"))?,
        ];
        let egress = [
            LpmTrie::try_from(take(ebpf, maps::EGRESS[0])?).map_err(map_err(maps::EGRESS[0], "open"))?,
            LpmTrie::try_from(take(ebpf, maps::EGRESS[1])?).map_err(map_err(maps::EGRESS[1], "open"))?,
        ];
        let ingress = [
            LpmTrie::try_from(take(ebpf, maps::INGRESS[0])?).map_err(map_err(maps::INGRESS[0], "open"))?,
            LpmTrie::try_from(take(ebpf, maps::INGRESS[1])?).map_err(map_err(maps::INGRESS[1], "open"))?,
        ];
        let config =
            Array::try_from(take(ebpf, maps::ENFORCE_CONFIG)?).map_err(map_err(maps::ENFORCE_CONFIG, "open"))?;
        let drop_counts =
            PerCpuArray::try_from(take(ebpf, maps::DROP_COUNTS)?).map_err(map_err(maps::DROP_COUNTS, "open"))?;
        let drop_events =
            RingBuf::try_from(take(ebpf, maps::DROP_EVENTS)?).map_err(map_err(maps::DROP_EVENTS, "open"))?;
        let tunnel_services =
            HashMap::try_from(take(ebpf, maps::TUNNEL_SERVICES)?).map_err(map_err(maps::TUNNEL_SERVICES, "open"))?;
        let tunnel_config =
            Array::try_from(take(ebpf, maps::TUNNEL_CONFIG)?).map_err(map_err(maps::TUNNEL_CONFIG, "open"))?;
        let mut enforcer = Enforcer {
            pin_dir: pin_dir.to_path_buf(),
            identities,
            sock_state,
            exec_gen,
            local_addrs,
            quotas,
            flows,
            egress,
            ingress,
            config,
            drop_counts,
            drop_events: Some(drop_events),
            tunnel_services,
            tunnel_config,
            protected: protected.to_vec(),
            _loaded: loaded,
        };
        // The exec table shared evenly by the protected cgroups and the catch-all.
        enforcer.set_quota(protected, EXEC_TABLE / (protected.len() as u64 + 1))?;
        Ok(enforcer)
    }

    /// The pin directory this enforcer runs on.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Replaces the identity table: keys not in `ids` are removed first (their processes lose
    /// their identity), then every entry is written (entries that stay are overwritten in
    /// place, never missing). Then the epoch moves: every connection is judged again with
    /// the new identities at its next packet.
    pub fn set_identities(&mut self, ids: &[(IdentityKey, u32)]) -> Result<(), EbpfError> {
        let name = maps::IDENTITIES;
        let wanted: std::collections::HashSet<IdentityKey> = ids.iter().map(|(k, _)| *k).collect();
        let stale: Vec<IdentityKey> = self
            .identities
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(name, "keys"))?
            .into_iter()
            .filter(|k| !wanted.contains(k))
            .collect();
        for k in &stale {
            remove_present(self.identities.remove(k)).map_err(map_err(name, "remove"))?;
        }
        for (key, identity) in ids {
            if *identity == 0 {
                return Err(EbpfError::InvalidEntry { name, what: "identity 0 means none" });
            }
            insert_result(name, self.identities.insert(key, IdentityVal { identity: *identity, _pad: 0 }, 0))?;
        }
        self.bump_epoch()
    }

    /// Replaces the set of this node's addresses (every network namespace of the node): a
    /// packet from one of them that did not come over loopback comes from another namespace
    /// of this node, and is never admitted by an address rule. Moves the epoch if it changed.
    pub fn set_local_addrs(&mut self, addrs: &[std::net::Ipv4Addr]) -> Result<bool, EbpfError> {
        let name = maps::LOCAL_ADDRS;
        let wanted: std::collections::HashSet<u32> = addrs.iter().map(|a| u32::from_ne_bytes(a.octets())).collect();
        let present: std::collections::HashSet<u32> =
            self.local_addrs.keys().collect::<Result<_, _>>().map_err(map_err(name, "keys"))?;
        if wanted == present {
            return Ok(false);
        }
        // Additions first: an address is never briefly taken for a remote one.
        for a in wanted.difference(&present) {
            insert_result(name, self.local_addrs.insert(a, 1, 0))?;
        }
        for a in present.difference(&wanted) {
            remove_present(self.local_addrs.remove(a)).map_err(map_err(name, "remove"))?;
        }
        self.bump_epoch()?;
        Ok(true)
    }

    /// How many processes that hold sockets each protected root may have at once (entries of
    /// the exec table); past it, only that root's new sockets fail.
    pub fn set_quota(&mut self, roots: &[Cgroup], per_root: u64) -> Result<(), EbpfError> {
        let name = maps::EXEC_GEN_QUOTA;
        // Root 0 is the catch-all for sockets outside every configured root (cgroups a
        // previous agent protected).
        for id in std::iter::once(0).chain(roots.iter().map(|cg| cg.id)) {
            let used = self.quotas.get(&id, 0).map(|q| q.used).unwrap_or(0);
            insert_result(name, self.quotas.insert(id, Quota { used, limit: per_root }, 0))?;
        }
        Ok(())
    }

    /// The state the kernel keeps on a socket (None: the socket carries none).
    pub fn socket_state(&self, socket: &impl std::os::fd::AsRawFd) -> Result<Option<SockState>, EbpfError> {
        match self.sock_state.get(socket, 0) {
            Ok(s) => Ok(Some(s)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(source) => Err(EbpfError::Map { name: maps::SOCK_STATE, op: "get", source }),
        }
    }

    /// Stamps a socket that carries no state (made before enforcement was attached) as if
    /// `state`'s process had made it: that process gets its exec table entry (counted against
    /// `root`'s quota) as if it had made a socket, and the epoch moves so the connection is
    /// judged.
    pub fn stamp_socket(
        &mut self,
        socket: &impl std::os::fd::AsRawFd,
        state: SockState,
        root: u64,
    ) -> Result<(), EbpfError> {
        let name = maps::EXEC_GEN;
        match self.exec_gen.get(&state.tgid, 0) {
            Ok(e) if e.exec == state.exec_ktime_ns => {}
            Ok(_) | Err(MapError::KeyNotFound) => {
                let mut quota = self.quotas.get(&root, 0).map_err(map_err(maps::EXEC_GEN_QUOTA, "get"))?;
                if quota.used >= quota.limit {
                    return Err(EbpfError::MapFull { name: maps::EXEC_GEN_QUOTA });
                }
                insert_result(name, self.exec_gen.insert(state.tgid, ExecGen { exec: state.exec_ktime_ns, root }, 0))?;
                quota.used += 1;
                insert_result(maps::EXEC_GEN_QUOTA, self.quotas.insert(root, quota, 0))?;
            }
            Err(source) => return Err(EbpfError::Map { name, op: "get", source }),
        }
        self.sock_state.insert(socket, state, 0).map_err(map_err(maps::SOCK_STATE, "insert"))?;
        self.bump_epoch()
    }

    /// Replaces the table of workloads other Tether nodes serve. Additions and changes are
    /// written before removals; if anything was removed or changed, the epoch moves, so
    /// captured connections to what is no longer there (or no longer the same) are judged
    /// again at their next packet. Returns whether anything changed.
    pub fn set_tunnel_services(&mut self, services: &[(ServiceKey, ServiceVal)]) -> Result<bool, EbpfError> {
        let name = maps::TUNNEL_SERVICES;
        let wanted: std::collections::HashMap<ServiceKey, ServiceVal> = services.iter().copied().collect();
        let present: Vec<(ServiceKey, ServiceVal)> =
            self.tunnel_services.iter().collect::<Result<_, _>>().map_err(map_err(name, "iter"))?;
        let present_map: std::collections::HashMap<ServiceKey, ServiceVal> = present.iter().copied().collect();
        if present_map == wanted {
            return Ok(false);
        }
        let mut rejudge = false;
        for (k, v) in &wanted {
            match present_map.get(k) {
                Some(old) if old == v => {}
                Some(old) => {
                    // Only a changed identity matters to established connections (a node
                    // marked down refuses new connects, it does not cut live ones).
                    rejudge |= old.identity != v.identity;
                    insert_result(name, self.tunnel_services.insert(k, v, 0))?;
                }
                None => insert_result(name, self.tunnel_services.insert(k, v, 0))?,
            }
        }
        for k in present_map.keys().filter(|k| !wanted.contains_key(k)) {
            remove_present(self.tunnel_services.remove(k)).map_err(map_err(name, "remove"))?;
            rejudge = true;
        }
        if rejudge {
            self.bump_epoch()?;
        }
        Ok(true)
    }

    /// Where connect() captures remote workloads to (or nothing, `enabled == 0`). Enabling
    /// attaches `cgroup/getpeername4` (which shows a captured socket what it dialled) to the
    /// protected cgroups first, so no socket is captured before its hook runs; without
    /// capture, accept() runs no such hook.
    pub fn set_tunnel_config(&mut self, config: TunnelConfig) -> Result<(), EbpfError> {
        if config.enabled != 0 {
            let links = self.pin_dir.join(LAYOUT).join("links");
            for cg in &self.protected {
                attach_missing(&mut self._loaded.ebpf, &links, cg, |name| name == programs::GETPEERNAME4)?;
            }
        }
        self.tunnel_config.set(0, config, 0).map_err(map_err(maps::TUNNEL_CONFIG, "set"))
    }

    /// Every cached verdict is judged again at its connection's next packet.
    pub fn bump_epoch(&mut self) -> Result<(), EbpfError> {
        let mut cfg = self.read_config()?;
        cfg.epoch = next_epoch(cfg.epoch);
        self.write_config(cfg)
    }

    /// Writes a whole policy into the inactive generation (cleared first), then makes it the
    /// live one with a single write of [`EnforceConfig::generation`]: the programs see the
    /// old policy or the new one, never a mix. On error the live policy is unchanged.
    pub fn load_policy(
        &mut self,
        flows: &[(FlowKey, RuleRef)],
        egress: &[(CidrKey, RuleRef)],
        ingress: &[(CidrKey, RuleRef)],
    ) -> Result<(), EbpfError> {
        let mut cfg = self.read_config()?;
        let next = if cfg.generation == 0 { 1 } else { 0 };
        let (flows_name, egress_name, ingress_name) = (maps::FLOWS[next], maps::EGRESS[next], maps::INGRESS[next]);
        // Validate before touching anything.
        let egress: Vec<(Key<CidrData>, RuleRef)> =
            egress.iter().map(|(k, r)| Ok((cidr_key(k, egress_name)?, *r))).collect::<Result<_, EbpfError>>()?;
        let ingress: Vec<(Key<CidrData>, RuleRef)> =
            ingress.iter().map(|(k, r)| Ok((cidr_key(k, ingress_name)?, *r))).collect::<Result<_, EbpfError>>()?;

        let flow_map = &mut self.flows[next];
        let old: Vec<FlowKey> = flow_map.keys().collect::<Result<_, _>>().map_err(map_err(flows_name, "keys"))?;
        for k in &old {
            remove_present(flow_map.remove(k)).map_err(map_err(flows_name, "remove"))?;
        }
        for (k, r) in flows {
            insert_result(flows_name, flow_map.insert(k, r, 0))?;
        }
        for (trie, name, entries) in
            [(&mut self.egress[next], egress_name, &egress), (&mut self.ingress[next], ingress_name, &ingress)]
        {
            let old: Vec<Key<CidrData>> = trie.keys().collect::<Result<_, _>>().map_err(map_err(name, "keys"))?;
            for k in &old {
                remove_present(trie.remove(k)).map_err(map_err(name, "remove"))?;
            }
            for (k, r) in entries {
                insert_result(name, trie.insert(k, r, 0))?;
            }
        }
        cfg.generation = next as u32;
        // The same write moves the epoch: connections are judged under the new policy.
        cfg.epoch = next_epoch(cfg.epoch);
        self.write_config(cfg)?;
        tracing::info!(
            generation = next,
            flows = flows.len(),
            egress = egress.len(),
            ingress = ingress.len(),
            "policy loaded"
        );
        Ok(())
    }

    /// The node's attestation lease: protected flows pass until `for_` from now, then stop
    /// unless renewed (a dead agent, or a node the server refused). `Duration::ZERO` ends it
    /// at once. A fresh pin directory has none: every flow of a protected workload is dropped.
    pub fn set_lease(&mut self, for_: Duration) -> Result<(), EbpfError> {
        let mut cfg = self.read_config()?;
        cfg.lease_until_ns = if for_.is_zero() { 0 } else { monotonic_ns().saturating_add(for_.as_nanos() as u64) };
        if cfg.epoch == 0 {
            cfg.epoch = 1;
        }
        self.write_config(cfg)
    }

    /// When the lease runs out (CLOCK_MONOTONIC ns; 0: no lease).
    pub fn lease_until_ns(&self) -> Result<u64, EbpfError> {
        Ok(self.read_config()?.lease_until_ns)
    }

    /// Minimum time between two drop events from one source (counts are always kept);
    /// zero reports every drop.
    pub fn set_audit_interval(&mut self, d: Duration) -> Result<(), EbpfError> {
        let mut cfg = self.read_config()?;
        cfg.audit_interval_ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.write_config(cfg)
    }

    /// Run time and run count of each loaded program (meaningful while
    /// [`super::enable_run_stats`] is held): what each hook costs per run.
    pub fn program_stats(&self) -> Vec<(String, std::time::Duration, u64)> {
        super::program_stats(&self._loaded.ebpf)
    }

    /// Drops so far, summed over CPUs, indexed by [`drop_reason`] (since the maps were
    /// created: they survive agent restarts).
    pub fn drop_counts(&self) -> Result<[u64; drop_reason::COUNT as usize], EbpfError> {
        let mut out = [0u64; drop_reason::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = self.drop_counts.get(&(i as u32), 0).map_err(map_err(maps::DROP_COUNTS, "get"))?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// The exec events of the process programs this enforcer attached (once): every exec
    /// under a protected cgroup (the programs check PROTECTED_ROOTS, so a cgroup made after
    /// the last scan counts too). Needs a tokio runtime.
    pub fn take_exec_events(&mut self) -> Result<monitor::ExecEvents, EbpfError> {
        let filter = TraceFilter { enabled: tether_common::TRACE_PROTECTED_ROOTS, ..Default::default() };
        let ebpf = &mut self._loaded.ebpf;
        let mut map: Array<_, TraceFilter> =
            Array::try_from(ebpf.map_mut(maps::TRACE_FILTER).ok_or(EbpfError::Missing(maps::TRACE_FILTER))?)
                .map_err(map_err(maps::TRACE_FILTER, "open"))?;
        map.set(0, filter, 0).map_err(map_err(maps::TRACE_FILTER, "set"))?;
        let ring = RingBuf::try_from(
            ebpf.take_map(maps::EXEC_EVENTS).ok_or(EbpfError::Missing("exec events (already taken)"))?,
        )
        .map_err(map_err(maps::EXEC_EVENTS, "open"))?;
        monitor::ExecEvents::register(ring)
    }

    /// The drop event stream (once). Needs a tokio runtime.
    pub fn take_drop_events(&mut self) -> Result<DropEvents, EbpfError> {
        let ring = self.drop_events.take().ok_or(EbpfError::Missing("drop events (already taken)"))?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(EbpfError::Io {
                op: "drop events need a tokio runtime",
                source: std::io::ErrorKind::Unsupported.into(),
            });
        }
        // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| EbpfError::Io { op: "registering the drop ring buffer with tokio", source: e.into() })?;
        Ok(DropEvents { ring })
    }

    /// Every link pinned under the pin directory, with the program it runs now.
    pub fn pinned_links(&self) -> Result<Vec<PinnedLinkStatus>, EbpfError> {
        pinned_links(&self.maps_dir())
    }

    /// Ends enforcement: detaches and unpins every link and unpins every map under `pin_dir`
    /// (the directory given to [`Enforcer::start`]), then removes the directory.
    pub fn detach_all(self, pin_dir: &Path) -> Result<(), EbpfError> {
        drop(self);
        Self::detach_pinned(pin_dir)
    }

    /// As [`Enforcer::detach_all`], without a running enforcer (`tether-agent enforce stop`
    /// after the agent is gone). Only files named as Tether names them are removed.
    pub fn detach_pinned(pin_dir: &Path) -> Result<(), EbpfError> {
        remove_other_layouts(pin_dir)?;
        let dir = pin_dir.join(LAYOUT);
        detach_layout(&dir)?;
        remove_dir(pin_dir)
    }

    /// The directory this layout's maps and links are pinned in.
    fn maps_dir(&self) -> PathBuf {
        self.pin_dir.join(LAYOUT)
    }
}

/// Detaches and unpins everything of this layout under `pin_dir`, then removes it.
fn detach_layout(pin_dir: &Path) -> Result<(), EbpfError> {
    let links = pin_dir.join("links");
    for dir in cgroup_link_dirs(&links)? {
        for (name, _) in HOOKS {
            let pin = dir.join(name);
            if !pin.exists() {
                continue;
            }
            // Detach explicitly: whoever still holds an fd of the link (a hung agent)
            // cannot keep it enforcing.
            match obj_get(&pin) {
                Ok(link) => {
                    if let Err(e) = link_detach(link.as_fd()) {
                        tracing::warn!(pin = %pin.display(), "detaching a cgroup link: {e}");
                    }
                }
                Err(e) => tracing::warn!(pin = %pin.display(), "opening a pinned link: {e}"),
            }
            remove_pin(&pin)?;
        }
        remove_dir(&dir)?;
    }
    let process = links.join(PROCESS_LINKS);
    for (name, _) in monitor::PROCESS_PROGRAMS {
        // Tracing links detach when their last reference (the pin) goes.
        remove_pin(&process.join(name))?;
        remove_pin(&process.join(format!("{name}_staged")))?;
    }
    remove_dir(&process)?;
    remove_dir(&links)?;
    for name in PINNED_MAPS {
        remove_pin(&pin_dir.join(name))?;
    }
    remove_dir(pin_dir)
}

impl Enforcer {
    fn read_config(&self) -> Result<EnforceConfig, EbpfError> {
        self.config.get(&0, 0).map_err(map_err(maps::ENFORCE_CONFIG, "get"))
    }

    fn write_config(&mut self, cfg: EnforceConfig) -> Result<(), EbpfError> {
        self.config.set(0, cfg, 0).map_err(map_err(maps::ENFORCE_CONFIG, "set"))
    }
}

impl DropEvents {
    /// Waits for the next batch of drop events.
    pub async fn next_batch(&mut self) -> Result<Vec<DropEvent>, EbpfError> {
        loop {
            let mut guard = self
                .ring
                .readable_mut()
                .await
                .map_err(|source| EbpfError::Io { op: "polling the drop ring buffer", source })?;
            let ring = guard.get_inner_mut();
            let mut batch = Vec::new();
            while let Some(item) = ring.next() {
                if item.len() >= size_of::<DropEvent>() {
                    // SAFETY: one DropEvent per record, length checked, read unaligned.
                    batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const DropEvent) });
                }
            }
            guard.clear_ready();
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }
}

/// The next epoch; never 0 (0 marks "no verdict" on sockets).
fn next_epoch(e: u32) -> u32 {
    match e.wrapping_add(1) {
        0 => 1,
        n => n,
    }
}

/// CLOCK_MONOTONIC in ns, the clock `bpf_ktime_get_coarse_ns` reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Removes pins of other layouts under `pin_dir` (an older agent's): cgroup links are
/// detached explicitly (whoever holds their fd cannot keep them enforcing), everything else
/// goes with its pin. Only bpffs files are touched (bpffs holds nothing else).
fn remove_other_layouts(pin_dir: &Path) -> Result<(), EbpfError> {
    let entries = match fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(EbpfError::Io { op: "listing the pin directory", source }),
    };
    for entry in entries.flatten() {
        if entry.file_name() == LAYOUT {
            continue;
        }
        remove_pins_under(&entry.path());
        tracing::info!(pin = %entry.path().display(), "pins of another enforcement layout removed");
    }
    Ok(())
}

fn remove_pins_under(path: &Path) {
    if path.is_dir() {
        if let Ok(rd) = fs::read_dir(path) {
            for e in rd.flatten() {
                remove_pins_under(&e.path());
            }
        }
        let _ = fs::remove_dir(path);
        return;
    }
    if let Ok(link) = obj_get(path) {
        if link_info(link.as_fd()).is_ok() {
            let _ = link_detach(link.as_fd());
        }
    }
    let _ = fs::remove_file(path);
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, EbpfError> {
    ebpf.take_map(name).ok_or(EbpfError::Missing(name))
}

/// E2BIG (hash maps) and ENOSPC (LPM tries) mean full; ENOMEM is as good as full.
fn insert_result(name: &'static str, r: Result<(), MapError>) -> Result<(), EbpfError> {
    match r {
        Ok(()) => Ok(()),
        Err(MapError::SyscallError(e))
            if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)) =>
        {
            Err(EbpfError::MapFull { name })
        }
        Err(source) => Err(EbpfError::Map { name, op: "insert", source }),
    }
}

/// A key that vanished between listing and removing is fine.
fn remove_present(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

pub(super) fn load_hook(ebpf: &mut Ebpf, name: &'static str, hook: Hook) -> Result<(), EbpfError> {
    let prog = ebpf.program_mut(name).ok_or(EbpfError::Missing(name))?;
    let r = match hook {
        Hook::Sock => <&mut CgroupSock>::try_from(prog).map_err(program_err(name, "type"))?.load(),
        Hook::SockAddr => <&mut CgroupSockAddr>::try_from(prog).map_err(program_err(name, "type"))?.load(),
        Hook::SkbIngress | Hook::SkbEgress => {
            <&mut CgroupSkb>::try_from(prog).map_err(program_err(name, "type"))?.load()
        }
    };
    r.map_err(program_err(name, "load"))
}

fn prog_fd<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<BorrowedFd<'a>, EbpfError> {
    let prog = ebpf.program(name).ok_or(EbpfError::Missing(name))?;
    Ok(prog.fd().map_err(program_err(name, "fd"))?.as_fd())
}

/// Attaches and pins, on `cg`, each hook `which` takes that is not pinned there yet.
fn attach_missing(ebpf: &mut Ebpf, links: &Path, cg: &Cgroup, which: impl Fn(&str) -> bool) -> Result<(), EbpfError> {
    let dir = links.join(cg.id.to_string());
    fs::create_dir_all(&dir).map_err(|source| EbpfError::Io { op: "creating a cgroup's link directory", source })?;
    let cgroup_dir = File::open(&cg.path).map_err(|source| EbpfError::Io { op: "opening the cgroup", source })?;
    for (name, hook) in HOOKS {
        let pin = dir.join(name);
        if !which(name) || pin.exists() {
            continue;
        }
        attach_hook(ebpf, name, hook, &cgroup_dir)?
            .pin(&pin)
            .map_err(|e| EbpfError::Io { op: "pinning a cgroup link", source: std::io::Error::other(e) })?;
    }
    Ok(())
}

/// A new cgroup link (`BPF_LINK_CREATE`; the kernel runs it alongside other programs on the
/// cgroup), returned unpinned.
pub(super) fn attach_hook(ebpf: &mut Ebpf, name: &'static str, hook: Hook, cgroup: &File) -> Result<FdLink, EbpfError> {
    let prog = ebpf.program_mut(name).ok_or(EbpfError::Missing(name))?;
    let mode = CgroupAttachMode::Single; // links may not ask for more; the kernel multi-attaches them
                                         // Only links made by BPF_LINK_CREATE can be pinned; aya uses it on every kernel we run on.
    let link = |e: aya::programs::links::LinkError| EbpfError::Io {
        op: "the cgroup attachment is not a bpf_link (kernel older than 5.7?)",
        source: std::io::Error::other(e),
    };
    let fd_link = match hook {
        Hook::Sock => {
            let p = <&mut CgroupSock>::try_from(prog).map_err(program_err(name, "type"))?;
            let id = p.attach(cgroup, mode).map_err(program_err(name, "attach"))?;
            FdLink::try_from(p.take_link(id).map_err(program_err(name, "take link"))?).map_err(link)?
        }
        Hook::SockAddr => {
            let p = <&mut CgroupSockAddr>::try_from(prog).map_err(program_err(name, "type"))?;
            let id = p.attach(cgroup, mode).map_err(program_err(name, "attach"))?;
            FdLink::try_from(p.take_link(id).map_err(program_err(name, "take link"))?).map_err(link)?
        }
        Hook::SkbIngress | Hook::SkbEgress => {
            let p = <&mut CgroupSkb>::try_from(prog).map_err(program_err(name, "type"))?;
            let kind = if matches!(hook, Hook::SkbIngress) {
                CgroupSkbAttachType::Ingress
            } else {
                CgroupSkbAttachType::Egress
            };
            let id = p.attach(cgroup, kind, mode).map_err(program_err(name, "attach"))?;
            FdLink::try_from(p.take_link(id).map_err(program_err(name, "take link"))?).map_err(link)?
        }
    };
    Ok(fd_link)
}

/// `links/<cgroup-id>` directories (not `links/process`).
fn cgroup_link_dirs(links: &Path) -> Result<Vec<PathBuf>, EbpfError> {
    let entries = match fs::read_dir(links) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(EbpfError::Io { op: "listing pinned links", source }),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| EbpfError::Io { op: "listing pinned links", source })?;
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.parse::<u64>().is_ok()) {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

fn pinned_links(pin_dir: &Path) -> Result<Vec<PinnedLinkStatus>, EbpfError> {
    let links = pin_dir.join("links");
    let mut pins: Vec<PathBuf> = monitor::PROCESS_PROGRAMS
        .iter()
        .map(|(name, _)| links.join(PROCESS_LINKS).join(name))
        .filter(|p| p.exists())
        .collect();
    for dir in cgroup_link_dirs(&links)? {
        pins.extend(HOOKS.iter().map(|(name, _)| dir.join(name)).filter(|p| p.exists()));
    }
    pins.into_iter()
        .map(|path| {
            let fd = obj_get(&path).map_err(|source| EbpfError::Io { op: "opening a pinned link", source })?;
            let (link_id, program_id) =
                link_info(fd.as_fd()).map_err(|source| EbpfError::Io { op: "reading a link's info", source })?;
            Ok(PinnedLinkStatus { path, link_id, program_id })
        })
        .collect()
}

fn remove_pin(path: &Path) -> Result<(), EbpfError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(EbpfError::Io { op: "removing a pin", source: e }),
        _ => Ok(()),
    }
}

fn remove_dir(path: &Path) -> Result<(), EbpfError> {
    match fs::remove_dir(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(EbpfError::Io { op: "removing a pin directory (not empty?)", source: e })
        }
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------
// bpf(2) commands aya 0.14 does not offer for cgroup links.

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_F_REPLACE: u32 = 1 << 2;

/// `attr` must have no implicit padding: the kernel checks that bytes past the command's
/// last field are zero.
pub(super) fn sys_bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a bpf_attr prefix for `cmd`, fully initialised, valid for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned_fd(rc: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        // Explicit: the kernel refuses nonzero bytes past the last field.
        _pad: u32,
    }
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let attr = ObjGet { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, _pad: 0 };
    sys_bpf(BPF_OBJ_GET, &attr).map(owned_fd)
}

/// (link id, program id) of a link.
fn link_info(link: BorrowedFd<'_>) -> std::io::Result<(u32, u32)> {
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // struct bpf_link_info starts { __u32 type; __u32 id; __u32 prog_id; ... }; the kernel
    // fills as much as we ask for.
    let mut info = [0u32; 4];
    let attr = InfoByFd {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    Ok((info[1], info[2]))
}

fn prog_get_fd_by_id(id: u32) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct GetById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    sys_bpf(BPF_PROG_GET_FD_BY_ID, &GetById { id, next_id: 0, open_flags: 0 }).map(owned_fd)
}

/// Switches the pinned link at `pin` to `new_prog`, atomically, and only if it still runs
/// the program it ran when we looked (`BPF_F_REPLACE`).
fn replace_link_program(pin: &Path, new_prog: BorrowedFd<'_>) -> std::io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let link = obj_get(pin)?;
    let (_, old_id) = link_info(link.as_fd())?;
    let old = prog_get_fd_by_id(old_id)?;
    let attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        flags: BPF_F_REPLACE,
        old_prog_fd: old.as_raw_fd() as u32,
    };
    sys_bpf(BPF_LINK_UPDATE, &attr).map(|_| ())
}

fn link_detach(link: BorrowedFd<'_>) -> std::io::Result<()> {
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    sys_bpf(BPF_LINK_DETACH, &LinkDetach { link_fd: link.as_raw_fd() as u32 }).map(|_| ())
}

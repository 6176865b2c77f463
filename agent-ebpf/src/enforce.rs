//! Enforcement: who may talk to whom, decided in the kernel from what it recorded of each
//! process. Attached only to protected cgroups (never the root cgroup).
//!
//! Every socket of a protected cgroup carries a [`SockState`] (socket storage, cloned onto
//! accepted sockets): its creator's record key and exec, and the verdict of its connection
//! with the epoch it was decided at.
//! - `cgroup/sock_create` stamps the socket when its creator has an identity (others are
//!   stamped at their first bind, or at a connect or send by a process with an identity, so
//!   a refused process allocates nothing), and refuses what no hook could judge (IPv6, raw
//!   and ICMP sockets, protocols other than TCP and UDP).
//! - `cgroup/connect4` and `cgroup/sendmsg4` judge the destination: a socket of this network
//!   namespace (found by the kernel's own socket lookup, never by port) by identity, anything
//!   else by address. A connected socket keeps its verdict.
//! - `cgroup/post_bind4` marks the socket a server: its accepted sockets judge their peers.
//! - `cgroup_skb/ingress` judges the peer of each inbound connection at its handshake (the
//!   accepted socket inherits the verdict from its listener): a socket of this namespace (it
//!   came over loopback) by its own stamp, found by the kernel's socket lookup; another
//!   namespace of this node is never a valid address source; anything else by address. The
//!   destination is the receiving socket itself.
//! - `cgroup_skb/egress` drops packets of sockets whose creator has since exec'd.
//! - Per packet, both `cgroup_skb` hooks do one socket-storage lookup and compare the
//!   verdict's epoch with the live one (and the creator's exec, and the node's lease). Any
//!   change of identities, policy or local addresses bumps the epoch: established
//!   connections are judged again at their next packet.
//! - The node's attestation is a lease: when it runs out (no agent renews it, or the server
//!   refused the node), nothing of a protected workload gets through.
//!
//! Tunnels between nodes: a TCP connect() to a workload another Tether node serves
//! (`TUNNEL_SERVICES`, kept by the agent from the server) is judged by identity like a local
//! one, then captured: the destination is rewritten to the agent's tunnel listener and the
//! original kept in the socket's own storage (`TUNNEL_SOCK`), which `cgroup/getpeername4`
//! shows back to the application. The connection's first packet (its SYN, before the
//! listener can accept it) publishes (client tuple -> original destination, identities,
//! cookie) in `TUNNEL_CONNS` for the agent. A captured connection judged again (another
//! epoch) is judged against its original destination, never against the listener.
//! Sockets the agent's tunnel stamps from user space carry a remote peer's identity
//! ([`key_kind::TUNNEL_PEER`]): a workload receiving from one judges it by that identity.
//!
//! Policy maps come in two generations; `ENFORCE_CONFIG.generation` picks the live one, so
//! the agent swaps a whole policy with one write. Every map is pinned by the agent (not
//! declared pinned here: unpinned loads such as `trace-exec` must not share them).
//!
//! IPv4 only: IPv6 sockets are refused at creation. Every refusal is counted and
//! (rate-limited) reported as a `DropEvent`.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_tuple, task_struct, BPF_F_CLONE, BPF_F_CURRENT_NETNS, BPF_F_NO_PREALLOC, BPF_NOEXIST,
        BPF_SK_STORAGE_GET_F_CREATE,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_current_task_btf, bpf_ktime_get_ns,
        generated::{
            bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_set_retval, bpf_sk_fullsock,
            bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release, bpf_sk_storage_get, bpf_skb_cgroup_id,
        },
    },
    macros::{btf_map, cgroup_skb, cgroup_sock, cgroup_sock_addr, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, Queue, RingBuf},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};
use tether_common::{
    direction, drop_reason, key_kind, record_flags, service_flags, sock_role, tunnel_state, DropEvent, EnforceConfig,
    ExecGen, ExecGenExit, FlowKey, IdentityKey, IdentityVal, ProtectedRoot, Quota, RuleRef, ServiceKey, ServiceVal,
    SockState, TunnelConfig, TunnelConn, TunnelSock, TupleKey, EXEC_GEN_EXITED, EXEC_GEN_EXIT_GRACE_NS,
    MAX_PROTECTED_ROOTS,
};

use crate::process::TASK_RECORDS;

const ALLOW: i32 = 1;
const DENY: i32 = 0;

const IPPROTO_ICMP: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;

/// TCP states (the same numbers name UDP's unconnected state).
const TCP_CLOSE: u32 = 7;
const TCP_LISTEN: u32 = 10;

/// `LOOPBACK_IFINDEX`: every network namespace's `lo`.
const LOOPBACK_IFINDEX: u32 = 1;

/// Socket storage (BPF_MAP_TYPE_SK_STORAGE). aya-ebpf 0.2's `btf_maps::SkStorage` only takes
/// a sock_addr context; this one takes any socket pointer the verifier accepts (the ctx of
/// cgroup/sock programs, `bpf_sock_addr.sk`, `bpf_sk_fullsock`, `bpf_sk_lookup_*`).
/// BPF_F_CLONE: an accepted socket inherits its listener's state.
#[repr(C)]
pub struct SkStorage<T> {
    r#type: *const [i32; aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize],
}

// SAFETY: placeholder pointers the loader patches; never dereferenced from Rust.
unsafe impl<T> Sync for SkStorage<T> {}

impl<T> SkStorage<T> {
    pub const fn new() -> Self {
        SkStorage {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    fn as_ptr(&self) -> *mut c_void {
        self as *const Self as *mut c_void
    }

    /// The socket's value, or None.
    ///
    /// # Safety
    /// `sk` must be a socket pointer the verifier accepts for `bpf_sk_storage_get`.
    #[inline(always)]
    pub unsafe fn get(&self, sk: *mut c_void) -> Option<*mut T> {
        let p = unsafe { bpf_sk_storage_get(self.as_ptr(), sk, core::ptr::null_mut(), 0) };
        (!p.is_null()).then_some(p as *mut T)
    }

    /// The socket's value, created from `init` if absent.
    ///
    /// # Safety
    /// As [`Self::get`].
    #[inline(always)]
    pub unsafe fn get_or_insert(&self, sk: *mut c_void, init: &mut T) -> Option<*mut T> {
        let p = unsafe {
            bpf_sk_storage_get(self.as_ptr(), sk, init as *mut T as *mut c_void, BPF_SK_STORAGE_GET_F_CREATE as u64)
        };
        (!p.is_null()).then_some(p as *mut T)
    }
}

/// The identity of each protected workload, by what the kernel recorded of its process.
#[map]
static IDENTITIES: HashMap<IdentityKey, IdentityVal> = HashMap::with_max_entries(16384, 0);

#[btf_map]
static SOCK_STATE: SkStorage<SockState> = SkStorage::new();

/// tgid -> exec of the process's current image, for processes that stamped a socket; marked
/// at exit, removed EXEC_GEN_EXIT_GRACE_NS later.
#[map]
static EXEC_GEN: HashMap<u32, ExecGen> = HashMap::with_max_entries(65536, 0);

/// Exits in order, so their EXEC_GEN entries go once the grace period is over.
#[map]
static EXEC_GEN_EXITS: Queue<ExecGenExit> = Queue::with_max_entries(65536, 0);

/// One counter, moved (atomically, by the process programs only) whenever an EXEC_GEN entry
/// changes: an exec or exit of a process that holds sockets, an entry removed. A socket
/// remembers the value its creator was last checked at and looks EXEC_GEN up again only
/// when it moved, so the per-packet check is an array read, not a hash lookup.
#[map]
static EXEC_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// EXEC_GEN entries per protected root, and each root's limit.
#[map]
static EXEC_GEN_QUOTA: HashMap<u64, Quota> = HashMap::with_max_entries(MAX_PROTECTED_ROOTS, 0);

#[map]
static PROTECTED_ROOTS: Array<ProtectedRoot> = Array::with_max_entries(MAX_PROTECTED_ROOTS, 0);

/// Expired exits removed per exit: more than one, so the queue shrinks when exits slow down.
const EXIT_SWEEP: usize = 4;

/// Every address of this node's network namespaces.
#[map]
static LOCAL_ADDRS: HashMap<u32, u32> = HashMap::with_max_entries(16384, 0);

#[map]
static FLOWS_0: HashMap<FlowKey, RuleRef> = HashMap::with_max_entries(65536, 0);
#[map]
static FLOWS_1: HashMap<FlowKey, RuleRef> = HashMap::with_max_entries(65536, 0);

/// The address-less part of a [`tether_common::CidrKey`]; aya's `Key` adds the prefix length
/// in front, giving the same 16 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CidrData {
    identity: u32,
    proto: u16,
    port: u16,
    addr: u32,
}

#[map]
static EGRESS_0: LpmTrie<CidrData, RuleRef> = LpmTrie::with_max_entries(16384, BPF_F_NO_PREALLOC);
#[map]
static EGRESS_1: LpmTrie<CidrData, RuleRef> = LpmTrie::with_max_entries(16384, BPF_F_NO_PREALLOC);
#[map]
static INGRESS_0: LpmTrie<CidrData, RuleRef> = LpmTrie::with_max_entries(16384, BPF_F_NO_PREALLOC);
#[map]
static INGRESS_1: LpmTrie<CidrData, RuleRef> = LpmTrie::with_max_entries(16384, BPF_F_NO_PREALLOC);

#[map]
static ENFORCE_CONFIG: Array<EnforceConfig> = Array::with_max_entries(1, 0);

#[map]
static DROP_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map]
static DROP_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_reason::COUNT, 0);

/// Audit source -> `last report ktime & !0xffff | suppressed since` (saturating at 0xffff):
/// nanoseconds below 65 µs do not matter to an interval, so one u64 holds both.
#[map]
static AUDIT_LIMIT: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

const SUPPRESSED_MASK: u64 = 0xffff;

/// Workloads other Tether nodes serve: (address, port) -> identity.
#[map]
static TUNNEL_SERVICES: HashMap<ServiceKey, ServiceVal> = HashMap::with_max_entries(16384, 0);

#[map]
static TUNNEL_CONFIG: Array<TunnelConfig> = Array::with_max_entries(1, 0);

/// A captured socket's original destination.
#[btf_map]
static TUNNEL_SOCK: SkStorage<TunnelSock> = SkStorage::new();

/// Captured connections, by the client socket's tuple, until the agent accepts them. LRU: an
/// entry the agent never takes (the client gave up) ages out; one evicted early only makes
/// that connection fail (the agent refuses a connection it has no entry for).
#[map]
static TUNNEL_CONNS: LruHashMap<TupleKey, TunnelConn> = LruHashMap::with_max_entries(65536, 0);

const ECONNREFUSED: i32 = 111;

// ---------------------------------------------------------------------------------------
// Called by the process programs (process.rs).

/// A process's image changed: sockets it stamped before stop carrying its traffic. Only
/// processes that stamped a socket have an entry; others are left alone (no insert), so
/// exec churn cannot fill the map.
#[inline(always)]
pub(crate) fn note_exec(tgid: u32, exec_ktime_ns: u64) {
    if let Some(slot) = EXEC_GEN.get_ptr_mut(tgid) {
        // SAFETY: valid for this run; one aligned 8-byte store.
        unsafe { (*slot).exec = exec_ktime_ns };
        move_exec_epoch();
    }
}

/// Every socket checks its creator again at its next packet.
#[inline(always)]
fn move_exec_epoch() {
    if let Some(e) = EXEC_EPOCH.get_ptr_mut(0) {
        // SAFETY: the map's one value, aligned and valid for this run; an atomic add (BPF's
        // atomic add instruction: the target's core has no atomic read-modify-write types),
        // so concurrent moves are never lost.
        unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(e, 1) };
    }
}

#[inline(always)]
fn exec_epoch() -> u64 {
    EXEC_EPOCH.get(0).copied().unwrap_or(0)
}

/// The thread-group leader exited: sockets it made may no longer start flows, but may
/// finish sending what they hold (a process's exit closes its sockets after this tracepoint,
/// so removing the entry now would drop every FIN and unsent tail). The entry is removed
/// after the grace period.
#[inline(always)]
pub(crate) fn note_exit(tgid: u32) {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(slot) = EXEC_GEN.get_ptr_mut(tgid) {
        // SAFETY: valid for this run; one aligned 8-byte store.
        let value = unsafe {
            (*slot).exec |= EXEC_GEN_EXITED;
            (*slot).exec
        };
        move_exec_epoch();
        let note = ExecGenExit { tgid, _pad: 0, exit_ktime_ns: now, value };
        if EXEC_GEN_EXITS.push(note, 0).is_err() {
            // Too many recent exits to remember: the entry goes now (tails may be cut).
            remove_exec_gen(tgid, value);
        }
    }
    sweep_exits(now);
}

/// Removes the entry if it still holds `exec`, returning its quota.
#[inline(always)]
fn remove_exec_gen(tgid: u32, exec: u64) {
    // SAFETY: copied out at once.
    let Some(entry) = (unsafe { EXEC_GEN.get(tgid) }).copied() else {
        return;
    };
    if entry.exec != exec || EXEC_GEN.remove(tgid).is_err() {
        return;
    }
    move_exec_epoch();
    if let Some(q) = EXEC_GEN_QUOTA.get_ptr_mut(entry.root) {
        // SAFETY: valid for this run. Racing CPUs may lose an update; the agent resyncs.
        unsafe { (*q).used = (*q).used.saturating_sub(1) };
    }
}

/// Removes the entries of exits older than the grace period, if not reused since.
#[inline(always)]
fn sweep_exits(now: u64) {
    for _ in 0..EXIT_SWEEP {
        let Ok(Some(note)) = EXEC_GEN_EXITS.pop() else {
            return;
        };
        if now.wrapping_sub(note.exit_ktime_ns) < EXEC_GEN_EXIT_GRACE_NS {
            // Not yet; back it goes (behind newer exits: it is looked at again later).
            let _ = EXEC_GEN_EXITS.push(note, 0);
            return;
        }
        remove_exec_gen(note.tgid, note.value);
    }
}

// ---------------------------------------------------------------------------------------
// Shared pieces.

/// Why a flow is refused, and what the audit log says about it.
#[derive(Clone, Copy)]
struct Denial {
    reason: u32,
    direction: u32,
    src: u32,
    dst: u32,
    tuple: TupleKey,
    tgid: u32,
}

impl Denial {
    #[inline(always)]
    fn new(reason: u32, direction: u32) -> Denial {
        Denial { reason, direction, src: 0, dst: 0, tuple: TupleKey::default(), tgid: 0 }
    }
}

#[inline(always)]
fn config() -> EnforceConfig {
    match ENFORCE_CONFIG.get(0) {
        Some(c) => *c,
        // Unreachable for an array; a zero lease denies everything.
        None => EnforceConfig { generation: 0, epoch: 0, lease_until_ns: 0, audit_interval_ns: 0 },
    }
}

/// The node's attestation lease holds.
#[inline(always)]
fn lease_holds(cfg: &EnforceConfig) -> bool {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() < cfg.lease_until_ns }
}

/// The state a socket gets from the process running this hook: its record's key and exec.
#[inline(always)]
fn current_state() -> SockState {
    // SAFETY: plain helper calls; the task pointer is trusted by the verifier.
    let task: *mut task_struct = unsafe { bpf_get_current_task_btf() };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let mut state = SockState { tgid, ..SockState::default() };
    // SAFETY: a trusted task pointer.
    let Some(rec) = (unsafe { TASK_RECORDS.get(task) }) else {
        return state;
    };
    // SAFETY: valid for this run; only fields are copied out.
    unsafe {
        state.key = IdentityKey { cgroup_id: (*rec).cgroup_id, exe: (*rec).exe, euid: (*rec).euid, egid: (*rec).egid };
        state.key_valid = u32::from((*rec).flags & record_flags::EXE_VALID != 0);
        state.exec_ktime_ns = (*rec).exec_ktime_ns;
    }
    state
}

/// The protected root the current process is under (0 if none is known).
#[inline(always)]
pub(crate) fn current_root() -> u64 {
    for i in 0..MAX_PROTECTED_ROOTS {
        let Some(root) = PROTECTED_ROOTS.get(i) else {
            return 0;
        };
        if root.cgroup_id == 0 {
            return 0;
        }
        // SAFETY: plain helper call; 0 when the level is deeper than the current cgroup.
        if unsafe { bpf_get_current_ancestor_cgroup_id(root.level as i32) } == root.cgroup_id {
            return root.cgroup_id;
        }
    }
    0
}

/// Makes sure the stamping process has an EXEC_GEN entry for its current exec, counted
/// against its protected root's quota. Fails when the root's quota (or the map) is full:
/// then only this root's new sockets fail.
#[inline(always)]
fn register_exec(tgid: u32, exec: u64) -> Result<(), ()> {
    // SAFETY: copied out at once.
    if let Some(e) = unsafe { EXEC_GEN.get(tgid) } {
        if e.exec == exec {
            return Ok(());
        }
        // A dead process's entry for a reused PID, or an exec the tracepoint missed: this
        // process's own exec replaces it (the old sockets become stale, as they must).
        let slot = EXEC_GEN.get_ptr_mut(tgid).ok_or(())?;
        // SAFETY: valid for this run.
        unsafe { (*slot).exec = exec };
        move_exec_epoch();
        return Ok(());
    }
    let root = current_root();
    let quota = EXEC_GEN_QUOTA.get_ptr_mut(root).ok_or(())?;
    // SAFETY: valid for this run. Two CPUs racing may both pass with one slot left: the
    // quota is a bound on one root's share, not an exact count.
    unsafe {
        if (*quota).used >= (*quota).limit {
            return Err(());
        }
        (*quota).used += 1;
    }
    if EXEC_GEN.insert(tgid, ExecGen { exec, root }, BPF_NOEXIST as u64).is_err() {
        // SAFETY: as above.
        unsafe { (*quota).used = (*quota).used.saturating_sub(1) };
        // Lost a race with another thread of this process: that entry is as good.
        // SAFETY: copied out at once.
        return match unsafe { EXEC_GEN.get(tgid) } {
            Some(e) if e.exec == exec => Ok(()),
            _ => Err(()),
        };
    }
    Ok(())
}

/// The identity a state's creator has now (0: none).
#[inline(always)]
fn identity_of(state: &SockState) -> u32 {
    match state.key_valid {
        // SAFETY: the value is copied out at once.
        key_kind::RECORD => unsafe { IDENTITIES.get(state.key) }.map(|v| v.identity).unwrap_or(0),
        // Only the agent writes such a state (from user space, by socket fd).
        key_kind::TUNNEL_PEER => state.id,
        _ => 0,
    }
}

/// As [`identity_of`], kept on the socket for the rest of the epoch (identities only change
/// with the epoch), so a listener's identity is looked up once, not per handshake.
#[inline(always)]
fn identity_cached(state: *mut SockState, cfg: &EnforceConfig) -> u32 {
    // SAFETY: a socket's own storage, valid for this run.
    let s = unsafe { &mut *state };
    if s.id_epoch == cfg.epoch && cfg.epoch != 0 {
        return s.id;
    }
    let id = identity_of(s);
    s.id = id;
    s.id_epoch = cfg.epoch;
    id
}

/// The creator still runs the image that made the socket (and has not exited): it may start
/// flows. `exec_seen` (EXEC_EPOCH + 1 when the creator was last found running that image)
/// saves the lookup while no exec table entry changed: an exec or exit of any process
/// holding sockets moves the epoch.
#[inline(always)]
fn creator_is_current(state: *mut SockState) -> bool {
    let epoch = exec_epoch();
    // SAFETY: the socket's own storage, valid for this run.
    let s = unsafe { &mut *state };
    if s.exec_seen == epoch.wrapping_add(1) {
        return true;
    }
    // SAFETY: the value is copied out at once.
    let ok = matches!(unsafe { EXEC_GEN.get(s.tgid) }, Some(e) if e.exec == s.exec_ktime_ns);
    if ok {
        // Read before the lookup: an exec after it moves the epoch past what is kept here.
        s.exec_seen = epoch.wrapping_add(1);
    }
    ok
}

/// The creator still runs, or exited, in the image that made the socket: the socket may
/// carry packets (an exited creator's sockets drain and close). Only a running creator is
/// remembered in `exec_seen` (see [`creator_is_current`]): an exited one's sockets look it
/// up at each packet of their short tail.
#[inline(always)]
fn creator_may_send(state: *mut SockState) -> bool {
    if creator_is_current(state) {
        return true;
    }
    // SAFETY: the socket's own storage, valid for this run; the value is copied out at once.
    let s = unsafe { &*state };
    matches!(unsafe { EXEC_GEN.get(s.tgid) }, Some(e) if e.exec == s.exec_ktime_ns | EXEC_GEN_EXITED)
}

#[inline(always)]
fn flow_allowed(generation: u32, src: u32, dst: u32, dport: u16, proto: u32) -> bool {
    let flows = if generation == 0 { &FLOWS_0 } else { &FLOWS_1 };
    let mut key = FlowKey { src, dst, dport, _pad: 0, proto };
    if flows.get_ptr(key).is_some() {
        return true;
    }
    key.dport = 0;
    flows.get_ptr(key).is_some()
}

/// Longest-prefix match on `addr` (network order) for (identity, proto, port), then for any
/// port.
#[inline(always)]
fn cidr_allowed(trie: &LpmTrie<CidrData, RuleRef>, identity: u32, proto: u32, port: u16, addr: u32) -> bool {
    let mut key = Key::new(96, CidrData { identity, proto: proto as u16, port, addr });
    if trie.get(&key).is_some() {
        return true;
    }
    key.data.port = 0;
    trie.get(&key).is_some()
}

/// 127.0.0.0/8, or an address of one of this node's network namespaces.
#[inline(always)]
fn is_local(addr: u32) -> bool {
    // SAFETY: presence only.
    u32::from_be(addr) >> 24 == 127 || unsafe { LOCAL_ADDRS.get(addr) }.is_some()
}

/// Counts the drop, and reports it unless its source reported within the audit interval.
#[inline(always)]
fn record_drop(d: &Denial, cgroup_id: u64, interval_ns: u64) {
    if let Some(count) = DROP_COUNTS.get_ptr_mut(d.reason) {
        // SAFETY: this CPU's slot; per-CPU, so no other writer.
        unsafe { *count += 1 };
    }
    // The source: the sending identity if known, else the peer address, else the cgroup;
    // with the reason, so each kind of refusal from one source is reported.
    let source = if d.src != 0 {
        1u64 << 62 | d.src as u64
    } else if d.tuple.saddr != 0 {
        2u64 << 62 | d.tuple.saddr as u64
    } else {
        cgroup_id & ((1u64 << 56) - 1)
    } ^ (u64::from(d.reason & 0x3f) << 56);
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut suppressed = 0u32;
    if interval_ns != 0 {
        match AUDIT_LIMIT.get_ptr_mut(source) {
            Some(slot) => {
                // SAFETY: valid for this run. Racing updates from two CPUs may lose a count.
                let v = unsafe { *slot };
                let last = v & !SUPPRESSED_MASK;
                let held = v & SUPPRESSED_MASK;
                if now.wrapping_sub(last) < interval_ns {
                    let held = if held < SUPPRESSED_MASK { held + 1 } else { held };
                    // SAFETY: as above.
                    unsafe { *slot = last | held };
                    return;
                }
                suppressed = held as u32;
                // SAFETY: as above.
                unsafe { *slot = now & !SUPPRESSED_MASK };
            }
            None => {
                let _ = AUDIT_LIMIT.insert(source, now & !SUPPRESSED_MASK, 0);
            }
        }
    }
    if let Some(mut entry) = DROP_EVENTS.reserve::<DropEvent>(0) {
        entry.write(DropEvent {
            ktime_ns: now,
            cgroup_id,
            reason: d.reason,
            direction: d.direction,
            src_identity: d.src,
            dst_identity: d.dst,
            tuple: d.tuple,
            tgid: d.tgid,
            suppressed,
        });
        entry.submit(0);
    }
    // A full ring buffer loses the event; DROP_COUNTS still has it.
}

// ---------------------------------------------------------------------------------------
// Sockets of this network namespace, found by the kernel's own lookup.

/// What a socket lookup found.
#[derive(Clone, Copy)]
enum Found {
    /// No socket matched.
    Nothing,
    /// A socket of a protected cgroup, with its creator's identity (0: none).
    Protected(u32),
    /// A socket no protected hook ever saw (an unprotected process's).
    Unprotected,
}

/// Looks up a socket of the current network namespace the way the kernel would deliver a
/// packet `saddr:sport -> daddr:dport` (all network order), checks it with `accept` (on the
/// socket's own fields, so a listener or a look-alike is not taken for a connected peer),
/// and reads its state. The reference the lookup takes is released on every path.
///
/// # Safety
/// `ctx` must be the program's context pointer (an skb or a sock_addr).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn lookup(
    ctx: *mut c_void,
    cfg: &EnforceConfig,
    proto: u32,
    saddr: u32,
    sport: u16,
    daddr: u32,
    dport: u16,
    peer: bool,
) -> Found {
    // SAFETY: all-zero is a valid tuple; the IPv4 member is written below.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = saddr;
    tuple.__bindgen_anon_1.ipv4.daddr = daddr;
    tuple.__bindgen_anon_1.ipv4.sport = sport;
    tuple.__bindgen_anon_1.ipv4.dport = dport;
    let size = size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
    // SAFETY: a valid context and tuple; the result is released below.
    let sk = unsafe {
        if proto == IPPROTO_TCP {
            bpf_sk_lookup_tcp(ctx, &mut tuple, size, BPF_F_CURRENT_NETNS as u64, 0)
        } else {
            bpf_sk_lookup_udp(ctx, &mut tuple, size, BPF_F_CURRENT_NETNS as u64, 0)
        }
    };
    if sk.is_null() {
        return Found::Nothing;
    }
    // SAFETY: a referenced socket from the lookup, released right after.
    let found = unsafe {
        let ok = if peer { accept_peer(&*sk, saddr, sport, daddr, dport) } else { accept_server(&*sk, dport) };
        if !ok {
            Found::Nothing
        } else {
            match SOCK_STATE.get(sk as *mut c_void) {
                Some(state) => Found::Protected(identity_cached(state, cfg)),
                None => Found::Unprotected,
            }
        }
    };
    // SAFETY: releases the lookup's reference.
    unsafe { bpf_sk_release(sk as *mut c_void) };
    found
}

/// A server socket for a connection to `dport`: a TCP listener or a bound UDP socket.
#[inline(always)]
fn accept_server(sk: &bpf_sock, dport: u16) -> bool {
    sk.src_port == u32::from(u16::from_be(dport)) && (sk.protocol != IPPROTO_TCP || sk.state == TCP_LISTEN)
}

/// The peer's own socket, seen from the receiver: the lookup was for a packet to the peer
/// (`daddr:dport` is the peer), so the socket must be bound there and, for TCP, be the one
/// connected to us (`saddr:sport`), never a listener.
#[inline(always)]
fn accept_peer(sk: &bpf_sock, saddr: u32, sport: u16, daddr: u32, dport: u16) -> bool {
    if sk.src_port != u32::from(u16::from_be(dport)) || (sk.src_ip4 != 0 && sk.src_ip4 != daddr) {
        return false;
    }
    if sk.protocol == IPPROTO_TCP {
        return sk.state != TCP_LISTEN && sk.dst_port == sport && sk.dst_ip4 == saddr;
    }
    // UDP: unconnected, or connected to us.
    sk.dst_port == 0 || (sk.dst_port == sport && sk.dst_ip4 == saddr)
}

// ---------------------------------------------------------------------------------------
// Judging a connection.

/// The verdict of a connection from `src` (this socket's identity) to `daddr:dport`
/// (network order): the destination socket's identity when it is a socket of this
/// namespace a protected process made, else the destination address. Returns the
/// destination identity (0: an address).
#[inline(always)]
fn judge_outbound(
    ctx: *mut c_void,
    cfg: &EnforceConfig,
    src: u32,
    proto: u32,
    daddr: u32,
    dport_be: u16,
) -> Result<u32, (u32, u32)> {
    let dport = u16::from_be(dport_be);
    if is_local(daddr) {
        // SAFETY: the program's context.
        match unsafe { lookup(ctx, cfg, proto, 0, 0, daddr, dport_be, false) } {
            Found::Protected(0) => return Err((drop_reason::NO_IDENTITY, 0)),
            Found::Protected(dst) => {
                return if flow_allowed(cfg.generation, src, dst, dport, proto) {
                    Ok(dst)
                } else {
                    Err((drop_reason::POLICY, dst))
                };
            }
            // An unprotected service of this node, or no listener (the connect will fail
            // on its own): address rules decide.
            Found::Unprotected | Found::Nothing => {}
        }
    }
    let trie = if cfg.generation == 0 { &EGRESS_0 } else { &EGRESS_1 };
    if cidr_allowed(trie, src, proto, dport, daddr) {
        Ok(0)
    } else {
        Err((drop_reason::POLICY, 0))
    }
}

/// The verdict of a connection from `saddr:sport` to this socket (`dst`, at `daddr:dport`;
/// all network order). `via_loopback`: the packet came from this network namespace, so
/// the peer is a socket of it (found by the kernel's lookup, judged by its identity).
/// Returns the peer's identity (0: an address).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn judge_inbound(
    ctx: *mut c_void,
    cfg: &EnforceConfig,
    dst: u32,
    proto: u32,
    saddr: u32,
    sport: u16,
    daddr: u32,
    dport_be: u16,
    via_loopback: bool,
) -> Result<u32, (u32, u32)> {
    let dport = u16::from_be(dport_be);
    if via_loopback {
        // The lookup is for a packet back to the peer: from us to it.
        // SAFETY: the program's context.
        return match unsafe { lookup(ctx, cfg, proto, daddr, dport_be, saddr, sport, true) } {
            Found::Protected(src) if src != 0 => {
                if flow_allowed(cfg.generation, src, dst, dport, proto) {
                    Ok(src)
                } else {
                    Err((drop_reason::POLICY, src))
                }
            }
            _ => Err((drop_reason::UNAUTHENTICATED_PEER, 0)),
        };
    }
    // Another namespace of this node: its processes are not identified by address.
    if is_local(saddr) {
        return Err((drop_reason::UNAUTHENTICATED_PEER, 0));
    }
    let trie = if cfg.generation == 0 { &INGRESS_0 } else { &INGRESS_1 };
    if cidr_allowed(trie, dst, proto, dport, saddr) {
        Ok(0)
    } else {
        Err((drop_reason::UNAUTHENTICATED_PEER, 0))
    }
}

/// Keeps a connection's verdict on its socket.
#[inline(always)]
fn remember(state: *mut SockState, cfg: &EnforceConfig, verdict: u32, src: u32, dst: u32) {
    // SAFETY: the socket's own storage, valid for this run.
    unsafe {
        (*state).verdict = verdict;
        (*state).src = src;
        (*state).dst = dst;
        (*state).epoch = cfg.epoch;
    }
}

// ---------------------------------------------------------------------------------------
// cgroup/sock_create

/// Stamps the new socket with its creator's record and exec. Refuses, at socket(), what no
/// hook could judge: IPv6 (not enforced yet), raw and ICMP datagram sockets (they pass no
/// connect or sendmsg hook), and every protocol but TCP and UDP.
#[cgroup_sock(sock_create)]
pub fn enforce_sock_create(ctx: SockContext) -> i32 {
    let cfg = config();
    match try_sock_create(&ctx) {
        Ok(()) => ALLOW,
        Err(mut d) => {
            d.tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
            // SAFETY: plain helper call.
            record_drop(&d, unsafe { bpf_get_current_cgroup_id() }, cfg.audit_interval_ns);
            DENY
        }
    }
}

fn try_sock_create(ctx: &SockContext) -> Result<(), Denial> {
    // SAFETY: ctx fields of a cgroup/sock program.
    let (family, kind, protocol) = unsafe { ((*ctx.sock).family, (*ctx.sock).type_, (*ctx.sock).protocol) };
    let refused = match (family, kind, protocol) {
        (AF_INET6, _, _) => drop_reason::IPV6,
        (AF_INET, SOCK_STREAM, IPPROTO_TCP) | (AF_INET, SOCK_DGRAM, IPPROTO_UDP) => 0,
        (_, SOCK_RAW, _) => drop_reason::RAW_SOCKET,
        (_, SOCK_DGRAM, IPPROTO_ICMP) => drop_reason::ICMP_SOCKET,
        _ => drop_reason::PROTOCOL,
    };
    if refused != 0 {
        return Err(Denial::new(refused, direction::EGRESS));
    }
    // SAFETY: for cgroup/sock programs the ctx is the socket.
    match unsafe { stamp(ctx.sock as *mut c_void, false) } {
        Err(reason) => Err(Denial::new(reason, direction::EGRESS)),
        Ok(_) => Ok(()),
    }
}

/// Gives a socket with no state yet the state of the process running this hook: its
/// record's key and exec. Sockets are stamped when made, by a creator with an identity;
/// the others (no identity yet, or made before enforcement was attached) when first used:
/// at bind (`always`: a server whose identity comes later must be reachable then), at
/// connect or unconnected send (only a process with an identity, so each refused connect
/// of a process without one allocates nothing). A stamped socket's identity is looked up
/// again at every epoch, so it follows its stamper's identity from then on.
/// Err: the drop reason (this root's exec quota is used up, or no storage could be made).
///
/// # Safety
/// `sk` must be a socket pointer the verifier accepts for `bpf_sk_storage_get`.
#[inline(always)]
unsafe fn stamp(sk: *mut c_void, always: bool) -> Result<Option<*mut SockState>, u32> {
    let mut state = current_state();
    if !always {
        if state.key_valid != key_kind::RECORD {
            return Ok(None);
        }
        // SAFETY: the value is copied out at once.
        let Some(identity) = (unsafe { IDENTITIES.get(state.key) }).map(|v| v.identity) else {
            return Ok(None);
        };
        // Kept for this epoch, as identity_cached would.
        state.id = identity;
        state.id_epoch = config().epoch;
    }
    // Read before the exec table is: an exec or exit after it moves the epoch past this.
    let epoch = exec_epoch();
    if state.key_valid != 0 {
        if register_exec(state.tgid, state.exec_ktime_ns).is_err() {
            // This root's quota is used up: its new sockets fail, nobody else's.
            return Err(drop_reason::MAP_FULL);
        }
        // The stamping process runs this very exec: what creator_is_current would find.
        state.exec_seen = epoch.wrapping_add(1);
    }
    // SAFETY: as the caller promised. An existing state is kept (never overwritten).
    match unsafe { SOCK_STATE.get_or_insert(sk, &mut state) } {
        Some(slot) => Ok(Some(slot)),
        None => Err(drop_reason::MAP_FULL),
    }
}

// ---------------------------------------------------------------------------------------
// cgroup/connect4, cgroup/sendmsg4

#[cgroup_sock_addr(connect4)]
pub fn enforce_connect4(ctx: SockAddrContext) -> i32 {
    verdict_addr(&ctx, true)
}

/// Unconnected UDP sends (a connected socket was judged at connect).
#[cgroup_sock_addr(sendmsg4)]
pub fn enforce_sendmsg4(ctx: SockAddrContext) -> i32 {
    verdict_addr(&ctx, false)
}

#[inline(always)]
fn verdict_addr(ctx: &SockAddrContext, connect: bool) -> i32 {
    let cfg = config();
    match try_addr(ctx, &cfg, connect) {
        Ok(()) => ALLOW,
        // Refused without a drop to report (an unreachable tunnel peer).
        Err(d) if d.reason == 0 => DENY,
        Err(d) => {
            // SAFETY: plain helper call.
            record_drop(&d, unsafe { bpf_get_current_cgroup_id() }, cfg.audit_interval_ns);
            DENY
        }
    }
}

/// The destination is allowed for the socket's identity; a connect keeps the verdict on
/// the socket for its packets.
#[inline(always)]
fn try_addr(ctx: &SockAddrContext, cfg: &EnforceConfig, connect: bool) -> Result<(), Denial> {
    // SAFETY: ctx fields of a sock_addr program, read one at a time at their exact size.
    let (daddr, dport_be, proto, sk) = unsafe {
        let a = ctx.sock_addr;
        ((*a).user_ip4, (*a).user_port as u16, (*a).protocol, (*a).__bindgen_anon_1.sk)
    };
    // SAFETY: `sk` is the program's socket (never null in sock_addr programs).
    let (saddr, sport_host) = unsafe { ((*sk).src_ip4, (*sk).src_port) };
    let tuple = TupleKey { saddr, daddr, sport: (sport_host as u16).to_be(), dport: dport_be, proto };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let mut d = Denial { reason: 0, direction: direction::EGRESS, src: 0, dst: 0, tuple, tgid };

    if !lease_holds(cfg) {
        d.reason = drop_reason::NODE_UNATTESTED;
        return Err(d);
    }
    // SAFETY: `sk` is the sock_addr program's socket.
    let state = match unsafe { SOCK_STATE.get(sk as *mut c_void) } {
        Some(state) => state,
        // First use of a socket whose creator had no identity (or that predates
        // enforcement): stamped for this caller if it has one.
        // SAFETY: as above.
        None => match unsafe { stamp(sk as *mut c_void, false) } {
            Ok(Some(state)) => state,
            Ok(None) => {
                d.reason = drop_reason::NO_IDENTITY;
                return Err(d);
            }
            Err(reason) => {
                d.reason = reason;
                return Err(d);
            }
        },
    };
    let src = identity_cached(state, cfg);
    d.src = src;
    if src == 0 {
        d.reason = drop_reason::NO_IDENTITY;
        return Err(d);
    }
    if !creator_is_current(state) {
        d.reason = drop_reason::STALE_SOCKET;
        return Err(d);
    }
    if connect && proto == IPPROTO_TCP {
        // A workload of another Tether node: by identity, through the tunnel.
        match try_capture(ctx, sk as *mut c_void, state, cfg, src, daddr, dport_be) {
            Capture::NotTunnelled => {}
            Capture::Captured => return Ok(()),
            Capture::NodeDown => {
                // Not a policy refusal: the caller learns at once that nobody answers.
                // SAFETY: plain helper call (cgroup programs, Linux 5.18+).
                unsafe { bpf_set_retval(-ECONNREFUSED) };
                d.reason = 0;
                return Err(d);
            }
            Capture::Refused(reason, dst) => {
                d.reason = reason;
                d.dst = dst;
                return Err(d);
            }
        }
    }
    let verdict = judge_outbound(ctx.sock_addr as *mut c_void, cfg, src, proto, daddr, dport_be);
    match verdict {
        Ok(dst) => {
            if connect {
                // SAFETY: valid for this run.
                unsafe { (*state).role = sock_role::OUTBOUND };
                remember(state, cfg, 0, src, dst);
            }
            Ok(())
        }
        Err((reason, dst)) => {
            d.reason = reason;
            d.dst = dst;
            Err(d)
        }
    }
}

/// What connect4 does with a destination a tunnel could serve.
enum Capture {
    /// Not a remote Tether workload (or no tunnel here): address rules decide.
    NotTunnelled,
    /// Allowed, and redirected to the tunnel listener.
    Captured,
    /// A remote workload on a node known to be unreachable.
    NodeDown,
    /// Refused: (reason, destination identity).
    Refused(u32, u32),
}

/// The tunnel's configuration, if it captures sockets of this program's network namespace.
#[inline(always)]
fn tunnel_here(ctx: *mut c_void) -> Option<TunnelConfig> {
    let tc = *TUNNEL_CONFIG.get(0)?;
    if tc.enabled == 0 {
        return None;
    }
    // SAFETY: the sock_addr program's context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx) };
    (cookie == tc.netns_cookie).then_some(tc)
}

/// A connect() to a remote Tether workload: judged by identity (`src` to the workload's
/// identity on that port), then captured: the socket goes to the tunnel listener, its
/// original destination kept in its storage.
#[inline(always)]
fn try_capture(
    ctx: &SockAddrContext,
    sk: *mut c_void,
    state: *mut SockState,
    cfg: &EnforceConfig,
    src: u32,
    daddr: u32,
    dport_be: u16,
) -> Capture {
    // No tunnel on this node: nothing to look up.
    if TUNNEL_CONFIG.get(0).is_none_or(|tc| tc.enabled == 0) {
        return Capture::NotTunnelled;
    }
    // SAFETY: presence, copied out at once.
    let Some(svc) = (unsafe { TUNNEL_SERVICES.get(ServiceKey { addr: daddr, port: dport_be, _pad: 0 }) }).copied()
    else {
        return Capture::NotTunnelled;
    };
    let Some(tc) = tunnel_here(ctx.sock_addr as *mut c_void) else {
        return Capture::NotTunnelled;
    };
    if !flow_allowed(cfg.generation, src, svc.identity, u16::from_be(dport_be), IPPROTO_TCP) {
        return Capture::Refused(drop_reason::POLICY, svc.identity);
    }
    // Nobody answers for a node marked down, nor when the capture port is not the agent's
    // listener (the agent is away, and someone else may hold the port).
    if svc.flags & service_flags::NODE_DOWN != 0 || !agent_listens(ctx.sock_addr as *mut c_void, &tc) {
        return Capture::NodeDown;
    }
    let mut orig = TunnelSock { daddr, dport: dport_be, _pad: 0, dst_identity: svc.identity, _pad2: 0 };
    // SAFETY: the sock_addr program's socket.
    let Some(slot) = (unsafe { TUNNEL_SOCK.get_or_insert(sk, &mut orig) }) else {
        return Capture::Refused(drop_reason::MAP_FULL, svc.identity);
    };
    // SAFETY: the socket's own storage and the program's context, valid for this run; the
    // context's user_ip4/user_port are writable in connect4 (4-byte stores).
    unsafe {
        *slot = orig;
        (*state).role = sock_role::OUTBOUND;
        (*state).tunnel = tunnel_state::PENDING;
        (*ctx.sock_addr).user_ip4 = tc.listener_addr;
        (*ctx.sock_addr).user_port = u32::from(tc.listener_port);
    }
    remember(state, cfg, 0, src, svc.identity);
    Capture::Captured
}

/// The capture listener is the agent's own (stamped by it), found by the kernel's lookup.
#[inline(always)]
fn agent_listens(ctx: *mut c_void, tc: &TunnelConfig) -> bool {
    // SAFETY: all-zero is a valid tuple; the IPv4 member is written below.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.daddr = tc.listener_addr;
    tuple.__bindgen_anon_1.ipv4.dport = tc.listener_port;
    let size = size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
    // SAFETY: the program's context and a valid tuple; the reference is released below.
    let sk = unsafe { bpf_sk_lookup_tcp(ctx, &mut tuple, size, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a referenced socket from the lookup, released right after.
    let ok = unsafe {
        accept_server(&*sk, tc.listener_port)
            && SOCK_STATE.get(sk as *mut c_void).is_some_and(|s| (*s).key_valid == key_kind::TUNNEL_LISTENER)
    };
    // SAFETY: releases the lookup's reference.
    unsafe { bpf_sk_release(sk as *mut c_void) };
    ok
}

/// The verdict of a captured connection judged again: against its original destination,
/// which must still be the same remote workload, allowed for `src`.
#[inline(always)]
fn judge_captured(sk: *mut c_void, cfg: &EnforceConfig, src: u32) -> Result<u32, (u32, u32)> {
    // SAFETY: a full socket; the value is copied out at once.
    let Some(orig) = (unsafe { TUNNEL_SOCK.get(sk) }).map(|p| unsafe { *p }) else {
        return Err((drop_reason::POLICY, 0));
    };
    let key = ServiceKey { addr: orig.daddr, port: orig.dport, _pad: 0 };
    // SAFETY: presence, copied out at once.
    match unsafe { TUNNEL_SERVICES.get(key) }.copied() {
        Some(svc)
            if svc.identity == orig.dst_identity
                && flow_allowed(cfg.generation, src, svc.identity, u16::from_be(orig.dport), IPPROTO_TCP) =>
        {
            Ok(svc.identity)
        }
        _ => Err((drop_reason::POLICY, orig.dst_identity)),
    }
}

/// The captured socket's first packet (its SYN) tells the agent what the connection it is
/// about to accept is: written before the packet leaves, so before any accept.
#[inline(always)]
fn publish_capture(ctx: &SkBuffContext, sk: *mut bpf_sock, state: *mut SockState) {
    // SAFETY: a full socket; the values are copied out at once.
    let Some(orig) = (unsafe { TUNNEL_SOCK.get(sk as *mut c_void) }).map(|p| unsafe { *p }) else {
        return;
    };
    // SAFETY: a full socket and its own storage, valid for this run.
    let (key, s) = unsafe {
        (
            TupleKey {
                saddr: (*sk).src_ip4,
                daddr: (*sk).dst_ip4,
                sport: ((*sk).src_port as u16).to_be(),
                dport: (*sk).dst_port,
                proto: IPPROTO_TCP,
            },
            *state,
        )
    };
    // SAFETY: the program's own skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) };
    let conn = TunnelConn {
        cookie,
        daddr: orig.daddr,
        dport: orig.dport,
        _pad: 0,
        src_identity: s.src,
        dst_identity: orig.dst_identity,
        tgid: s.tgid,
        _pad2: 0,
    };
    if TUNNEL_CONNS.insert(key, conn, 0).is_ok() {
        // SAFETY: as above.
        unsafe { (*state).tunnel = tunnel_state::PUBLISHED };
    }
}

// ---------------------------------------------------------------------------------------
// cgroup/getpeername4

/// A captured socket shows the address its application dialled, not the tunnel listener.
/// Never refuses (getpeername hooks may not).
#[cgroup_sock_addr(getpeername4)]
pub fn enforce_getpeername4(ctx: SockAddrContext) -> i32 {
    // No tunnel on this node: no socket was captured (every accept() runs this hook).
    if TUNNEL_CONFIG.get(0).is_none_or(|tc| tc.enabled == 0) {
        return ALLOW;
    }
    // SAFETY: the sock_addr program's socket (never null).
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk } as *mut c_void;
    // SAFETY: the program's socket; the value is copied out at once.
    if let Some(orig) = unsafe { TUNNEL_SOCK.get(sk) }.map(|p| unsafe { *p }) {
        // SAFETY: user_ip4/user_port are writable in getpeername4 (4-byte stores).
        unsafe {
            (*ctx.sock_addr).user_ip4 = orig.daddr;
            (*ctx.sock_addr).user_port = u32::from(orig.dport);
        }
    }
    ALLOW
}

// ---------------------------------------------------------------------------------------
// cgroup/post_bind4

/// A bound socket is a server: the connections it accepts come in. A socket not stamped
/// yet is stamped for the binding process, identity or not (its identity may come later).
/// Refuses only when this root's exec quota is used up.
#[cgroup_sock(post_bind4)]
pub fn enforce_post_bind4(ctx: SockContext) -> i32 {
    let sk = ctx.sock as *mut c_void;
    // SAFETY: for cgroup/sock programs the ctx is the socket.
    let state = match unsafe { SOCK_STATE.get(sk) } {
        Some(state) => state,
        // SAFETY: as above.
        None => match unsafe { stamp(sk, true) } {
            Ok(Some(state)) => state,
            Ok(None) => return ALLOW,
            Err(reason) => {
                let mut d = Denial::new(reason, direction::INGRESS);
                d.tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
                // SAFETY: plain helper call.
                record_drop(&d, unsafe { bpf_get_current_cgroup_id() }, config().audit_interval_ns);
                return DENY;
            }
        },
    };
    // SAFETY: valid for this run. A later connect makes it outbound again.
    unsafe {
        if (*state).role == sock_role::NEW {
            (*state).role = sock_role::INBOUND;
        }
    }
    ALLOW
}

// ---------------------------------------------------------------------------------------
// cgroup_skb/ingress and egress

/// IPv4 header fields the policy needs; the packet starts at the IP header.
#[inline(always)]
fn parse_ipv4(ctx: &SkBuffContext) -> Option<TupleKey> {
    let ip: [u8; 20] = ctx.load(0).ok()?;
    if ip[0] >> 4 != 4 {
        return None;
    }
    let proto = ip[9] as u32;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    let ports: [u8; 4] = ctx.load(ihl).ok()?;
    Some(TupleKey {
        saddr: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        daddr: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        sport: u16::from_ne_bytes([ports[0], ports[1]]),
        dport: u16::from_ne_bytes([ports[2], ports[3]]),
        proto,
    })
}

const TCP_FLAG_SYN: u8 = 0x02;

/// [`parse_ipv4`] and the TCP flags (0 for UDP), in one read for the common header without
/// IP options (an IPv4 header of 20 bytes and the TCP header to its flags: 34 bytes). Flags
/// that cannot be read are taken as a SYN's (the packet is judged).
#[inline(always)]
fn parse_headers(ctx: &SkBuffContext) -> Option<(TupleKey, u8)> {
    if let Ok(h) = ctx.load::<[u8; 34]>(0) {
        if h[0] == 0x45 {
            let proto = h[9] as u32;
            if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
                return None;
            }
            let tuple = TupleKey {
                saddr: u32::from_ne_bytes([h[12], h[13], h[14], h[15]]),
                daddr: u32::from_ne_bytes([h[16], h[17], h[18], h[19]]),
                sport: u16::from_ne_bytes([h[20], h[21]]),
                dport: u16::from_ne_bytes([h[22], h[23]]),
                proto,
            };
            return Some((tuple, if proto == IPPROTO_TCP { h[33] } else { 0 }));
        }
    }
    // IP options, or a packet shorter than 34 bytes (UDP).
    let tuple = parse_ipv4(ctx)?;
    if tuple.proto != IPPROTO_TCP {
        return Some((tuple, 0));
    }
    let ihl = ctx.load::<u8>(0).map(|v| ((v & 0x0f) as usize) * 4).unwrap_or(0);
    Some((tuple, ctx.load::<u8>(ihl + 13).unwrap_or(TCP_FLAG_SYN)))
}

/// The TCP header's RST flag (the packet is IPv4 TCP).
#[inline(always)]
fn is_rst(ctx: &SkBuffContext) -> bool {
    let Ok(vihl) = ctx.load::<u8>(0) else {
        return false;
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    ctx.load::<u8>(ihl + 13).map(|flags| flags & 0x04 != 0).unwrap_or(false)
}

/// A reset arriving on a connected socket the tunnel captured.
#[inline(always)]
fn captured_reset(ctx: &SkBuffContext) -> bool {
    let Some(sk) = skb_fullsock(ctx) else {
        return false;
    };
    // SAFETY: a full socket; the state is copied out at once.
    let tunnelled =
        unsafe { SOCK_STATE.get(sk as *mut c_void) }.is_some_and(|s| unsafe { (*s).tunnel } != tunnel_state::NONE);
    tunnelled && has_one_peer(sk) && is_rst(ctx)
}

/// The packet's full socket, if it has one (request and timewait sockets give none).
#[inline(always)]
fn skb_fullsock(ctx: &SkBuffContext) -> Option<*mut bpf_sock> {
    // SAFETY: the ctx's socket field.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a socket pointer from the skb.
    let full = unsafe { bpf_sk_fullsock(sk) };
    (!full.is_null()).then_some(full)
}

/// A socket with one peer (TCP in any connected state, connected UDP), as opposed to a
/// listener or an unconnected UDP socket.
#[inline(always)]
fn has_one_peer(sk: *mut bpf_sock) -> bool {
    // SAFETY: a full socket.
    let st = unsafe { (*sk).state };
    st != TCP_LISTEN && st != TCP_CLOSE
}

#[cgroup_skb(ingress)]
pub fn enforce_ingress(ctx: SkBuffContext) -> i32 {
    let cfg = config();
    match try_ingress(&ctx, &cfg) {
        Ok(()) => ALLOW,
        Err(d) => {
            // SAFETY: the program's own skb.
            let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
            let d = if d.tuple.proto == 0 { Denial { tuple: parse_ipv4(&ctx).unwrap_or_default(), ..d } } else { d };
            record_drop(&d, cgroup_id, cfg.audit_interval_ns);
            DENY
        }
    }
}

fn try_ingress(ctx: &SkBuffContext, cfg: &EnforceConfig) -> Result<(), Denial> {
    let mut d = Denial::new(0, direction::INGRESS);
    if !lease_holds(cfg) {
        // Even then, the tunnel's reset of a captured connection reaches its application,
        // so it fails at once instead of hanging (a reset carries nothing).
        if captured_reset(ctx) {
            return Ok(());
        }
        d.reason = drop_reason::NODE_UNATTESTED;
        return Err(d);
    }
    // Request and timewait sockets (handshake and close) carry no data of their own.
    let Some(sk) = skb_fullsock(ctx) else {
        return Ok(());
    };
    // SAFETY: a full socket.
    let (sk_state, sk_proto) = unsafe { ((*sk).state, (*sk).protocol) };
    // A closed TCP socket takes nothing in (TCP discards what reaches it): the late packets
    // of a connection closing on another CPU are no flow to judge.
    if sk_proto == IPPROTO_TCP && sk_state == TCP_CLOSE {
        return Ok(());
    }
    // SAFETY: a full socket.
    let Some(state) = (unsafe { SOCK_STATE.get(sk as *mut c_void) }) else {
        d.reason = drop_reason::UNSTAMPED_SOCKET;
        return Err(d);
    };
    let connected = sk_state != TCP_LISTEN && sk_state != TCP_CLOSE;
    // Per packet, only the fields the verdict needs are read.
    // SAFETY: valid for this run.
    let (tunnel, epoch, verdict, role) = unsafe { ((*state).tunnel, (*state).epoch, (*state).verdict, (*state).role) };
    // A captured connection's peer is the local tunnel listener: its reset (the tunnel
    // stream closed, e.g. revoked) always reaches the application, so it never hangs.
    if connected && tunnel != tunnel_state::NONE && is_rst(ctx) {
        return Ok(());
    }
    if connected && epoch == cfg.epoch {
        if verdict == 0 {
            return Ok(());
        }
        // SAFETY: valid for this run.
        let (src, dst) = unsafe { ((*state).src, (*state).dst) };
        return Err(Denial { reason: verdict, direction: direction::INGRESS, src, dst, ..d });
    }
    // Not IPv4 TCP/UDP (or too short to tell): not ours to judge.
    let Some((tuple, tcp_flags)) = parse_headers(ctx) else {
        return Ok(());
    };
    // SAFETY: the program's own skb.
    let via_loopback = unsafe { (*ctx.skb.skb).ingress_ifindex } == LOOPBACK_IFINDEX;
    // An unconnected UDP socket that never bound is a client: what reaches its port can only
    // be a reply, so it is taken only from a source the socket's identity may send to (judged
    // as its sends were at sendmsg). Per datagram, as its peers vary. (A TCP listener judges
    // its SYNs below, bound or not: listen() without bind() binds no hook sees.)
    if !connected && role == sock_role::NEW && sk_proto != IPPROTO_TCP {
        d.tuple = tuple;
        let own = identity_cached(state, cfg);
        d.dst = own;
        // As a connected socket takes what its peer sends, whatever namespace that peer is in
        // (a TCP or connected UDP flow to another namespace of this node, allowed by an address
        // rule, gets its replies): the source must be a destination this socket may reach.
        let verdict = if own == 0 {
            Err((drop_reason::NO_IDENTITY, 0))
        } else {
            judge_outbound(ctx.skb.skb as *mut c_void, cfg, own, tuple.proto, tuple.saddr, tuple.sport)
        };
        return match verdict {
            Ok(_) => Ok(()),
            // A sender without identity (any host, or a local process) at an address and
            // port this socket may not send to: no reply to anything it was allowed to send.
            Err((reason, peer)) => {
                d.reason =
                    if reason == drop_reason::POLICY && peer == 0 { drop_reason::UNAUTHENTICATED_PEER } else { reason };
                d.src = peer;
                Err(d)
            }
        };
    }
    // A listener judges each SYN; what completes a handshake (or is stray) reaches a
    // connection only if the kernel holds a request, or a SYN cookie, made for an allowed SYN
    // of that very tuple: the connection's socket is cloned with the verdict kept below.
    if tuple.proto == IPPROTO_TCP && sk_state == TCP_LISTEN && tcp_flags & TCP_FLAG_SYN == 0 {
        return Ok(());
    }
    // SAFETY: valid for this run.
    let s = unsafe { *state };
    d.tuple = tuple;
    let ctxp = ctx.skb.skb as *mut c_void;
    let own = identity_cached(state, cfg);
    let verdict = if connected && s.role == sock_role::OUTBOUND {
        // Our own connection, judged again after a change: as it was at connect.
        let src = own;
        if src == 0 {
            Err((drop_reason::NO_IDENTITY, 0))
        } else if s.tunnel != tunnel_state::NONE {
            judge_captured(sk as *mut c_void, cfg, src).map(|dst| (src, dst))
        } else {
            judge_outbound(ctxp, cfg, src, tuple.proto, tuple.saddr, tuple.sport).map(|dst| (src, dst))
        }
    } else {
        let dst = own;
        if dst == 0 {
            Err((drop_reason::NO_IDENTITY, 0))
        } else {
            judge_inbound(ctxp, cfg, dst, tuple.proto, tuple.saddr, tuple.sport, tuple.daddr, tuple.dport, via_loopback)
                .map(|src| (src, dst))
        }
    };
    match verdict {
        Ok((src, dst)) => {
            // A listener keeps the verdict of the handshake it just allowed: the socket the
            // kernel makes for the connection (when this packet completes the handshake) is
            // cloned from the listener right after this program, and starts with it. Only
            // allowed verdicts are kept there: a refused handshake makes no socket. (Two
            // handshakes judged at once on two CPUs may swap the identities kept for the
            // audit log; both are allowed ones.)
            remember(state, cfg, 0, src, dst);
            Ok(())
        }
        Err((reason, other)) => {
            if connected {
                remember(state, cfg, reason, other, own);
            }
            d.reason = reason;
            d.src = other;
            d.dst = own;
            Err(d)
        }
    }
}

#[cgroup_skb(egress)]
pub fn enforce_egress(ctx: SkBuffContext) -> i32 {
    let cfg = config();
    match try_egress(&ctx, &cfg) {
        Ok(()) => ALLOW,
        Err(d) => {
            // SAFETY: the program's own skb.
            let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
            let d = Denial { tuple: parse_ipv4(&ctx).unwrap_or_default(), ..d };
            record_drop(&d, cgroup_id, cfg.audit_interval_ns);
            DENY
        }
    }
}

/// Per packet: the lease, the creator's exec, and the connection's verdict (judged again if
/// it is of another epoch). Packets of sockets whose creator has exec'd since it made them
/// are dropped: a connection established under one identity does not carry the next image's
/// traffic.
fn try_egress(ctx: &SkBuffContext, cfg: &EnforceConfig) -> Result<(), Denial> {
    if !lease_holds(cfg) {
        return Err(Denial::new(drop_reason::NODE_UNATTESTED, direction::EGRESS));
    }
    // Request sockets (SYN-ACK) and timewait sockets (closing ACKs) carry no data.
    let Some(sk) = skb_fullsock(ctx) else {
        return Ok(());
    };
    // SAFETY: a full socket.
    let Some(state) = (unsafe { SOCK_STATE.get(sk as *mut c_void) }) else {
        return Err(Denial::new(drop_reason::UNSTAMPED_SOCKET, direction::EGRESS));
    };
    if !creator_may_send(state) {
        // SAFETY: valid for this run.
        let s = unsafe { *state };
        let mut d = Denial::new(drop_reason::STALE_SOCKET, direction::EGRESS);
        d.tgid = s.tgid;
        d.src = identity_of(&s);
        return Err(d);
    }
    if !has_one_peer(sk) {
        // Unconnected UDP: every destination was judged at sendmsg.
        return Ok(());
    }
    // Per packet, only the fields the verdict needs are read.
    // SAFETY: valid for this run.
    let (tunnel, epoch, verdict) = unsafe { ((*state).tunnel, (*state).epoch, (*state).verdict) };
    if tunnel == tunnel_state::PENDING {
        publish_capture(ctx, sk, state);
    }
    if epoch == cfg.epoch {
        if verdict == 0 {
            return Ok(());
        }
        // SAFETY: valid for this run.
        let (src, dst, tgid) = unsafe { ((*state).src, (*state).dst, (*state).tgid) };
        return Err(Denial { reason: verdict, src, dst, tgid, ..Denial::new(0, direction::EGRESS) });
    }
    // SAFETY: valid for this run.
    let s = unsafe { *state };
    let mut d = Denial::new(0, direction::EGRESS);
    d.tgid = s.tgid;
    // SAFETY: a full socket; addresses and ports in network order.
    let (local_addr, local_port, peer_addr, peer_port, proto) =
        unsafe { ((*sk).src_ip4, ((*sk).src_port as u16).to_be(), (*sk).dst_ip4, (*sk).dst_port, (*sk).protocol) };
    let own = identity_cached(state, cfg);
    let ctxp = ctx.skb.skb as *mut c_void;
    let verdict = if own == 0 {
        Err((drop_reason::NO_IDENTITY, 0))
    } else if s.role == sock_role::OUTBOUND && s.tunnel != tunnel_state::NONE {
        judge_captured(sk as *mut c_void, cfg, own).map(|dst| (own, dst))
    } else if s.role == sock_role::OUTBOUND {
        judge_outbound(ctxp, cfg, own, proto, peer_addr, peer_port).map(|dst| (own, dst))
    } else {
        // An accepted connection: its peer is of this namespace when its address is local.
        let local = is_local(peer_addr);
        judge_inbound(ctxp, cfg, own, proto, peer_addr, peer_port, local_addr, local_port, local).map(|src| (src, own))
    };
    match verdict {
        Ok((src, dst)) => {
            remember(state, cfg, 0, src, dst);
            Ok(())
        }
        Err((reason, other)) => {
            remember(state, cfg, reason, own, other);
            d.reason = reason;
            d.src = own;
            d.dst = other;
            Err(d)
        }
    }
}

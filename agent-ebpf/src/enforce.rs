//! Enforcement: who may talk to whom, decided in the kernel from what it recorded of each
//! process. Attached only to protected cgroups (never the root cgroup).
//!
//! - `cgroup/sock_create` stamps every new socket with its creator's identity and exec.
//! - `cgroup/connect4` and `cgroup/sendmsg4` refuse destinations the policy does not allow.
//! - `cgroup/post_bind4` records which identity serves a port; `sockops` records which
//!   identity opened each same-node TCP connection, so the server side can check it.
//! - `cgroup_skb/ingress` drops packets to a protected listener from peers the policy does
//!   not allow; `cgroup_skb/egress` drops packets of sockets whose creator has since exec'd.
//! - While `ENFORCE_CONFIG.node_attested` is 0, nothing of a protected workload gets through.
//!
//! Policy maps come in two generations; `ENFORCE_CONFIG.generation` picks the live one, so
//! the agent swaps a whole policy with one write. Every map is pinned by the agent (not
//! declared pinned here: unpinned loads such as `trace-exec` must not share them).
//!
//! IPv4 only: IPv6 sockets are stamped but nothing checks them (no connect6/sendmsg6 hook).
//! Every decision is logged as a drop count and (rate-limited) a `DropEvent`.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        bpf_sock, task_struct, BPF_F_CLONE, BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_ktime_get_ns,
        generated::{bpf_sk_fullsock, bpf_sk_storage_get, bpf_skb_cgroup_id},
    },
    macros::{btf_map, cgroup_skb, cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, Queue, RingBuf},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use tether_common::{
    direction, drop_reason, record_flags, BoundVal, DropEvent, EnforceConfig, ExecGenExit, FlowKey, IdentityKey,
    IdentityVal, PortKey, RuleRef, SockStamp, TupleKey, EXEC_GEN_EXITED, EXEC_GEN_EXIT_GRACE_NS,
};

use crate::process::TASK_RECORDS;

const ALLOW: i32 = 1;
const DENY: i32 = 0;

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// Socket storage (BPF_MAP_TYPE_SK_STORAGE). aya-ebpf 0.2's `btf_maps::SkStorage` only takes
/// a sock_addr context; this one takes any socket pointer the verifier accepts (the ctx of
/// cgroup/sock programs, `bpf_sock_addr.sk`, `bpf_sock_ops.sk`, `bpf_sk_fullsock`).
/// BPF_F_CLONE: an accepted socket inherits its listener's stamp.
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
static SOCK_STAMPS: SkStorage<SockStamp> = SkStorage::new();

/// tgid -> exec ktime of the process's current image, maintained by the process programs.
/// One entry per live process on the machine, and per process exited in the last
/// EXEC_GEN_EXIT_GRACE_NS (marked EXEC_GEN_EXITED).
#[map]
static EXEC_GEN: HashMap<u32, u64> = HashMap::with_max_entries(65536, 0);

/// Exits in order, so their EXEC_GEN entries go once the grace period is over.
#[map]
static EXEC_GEN_EXITS: Queue<ExecGenExit> = Queue::with_max_entries(65536, 0);

/// Expired exits removed per exit: more than one, so the queue shrinks when exits slow down.
const EXIT_SWEEP: usize = 4;

#[map]
static PEERS: LruHashMap<TupleKey, u32> = LruHashMap::with_max_entries(65536, 0);

#[map]
static BOUND: HashMap<PortKey, BoundVal> = HashMap::with_max_entries(16384, 0);

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

// ---------------------------------------------------------------------------------------
// Called by the process programs (process.rs).

/// A process's image changed (exec) or a process appeared (fork, seeding).
#[inline(always)]
pub(crate) fn note_exec(tgid: u32, exec_ktime_ns: u64, only_if_new: bool) {
    let flags = if only_if_new { BPF_NOEXIST as u64 } else { 0 };
    // A full map leaves the process without an entry: its sockets fail the check (closed).
    let _ = EXEC_GEN.insert(tgid, exec_ktime_ns, flags);
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
            *slot |= EXEC_GEN_EXITED;
            *slot
        };
        let note = ExecGenExit { tgid, _pad: 0, exit_ktime_ns: now, value };
        if EXEC_GEN_EXITS.push(note, 0).is_err() {
            // Too many recent exits to remember: the entry goes now (tails may be cut).
            let _ = EXEC_GEN.remove(tgid);
        }
    }
    sweep_exits(now);
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
        // SAFETY: copied out at once.
        if unsafe { EXEC_GEN.get(note.tgid) }.copied() == Some(note.value) {
            let _ = EXEC_GEN.remove(note.tgid);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Shared pieces.

/// Why a flow is refused, and what the audit log says about it.
struct Denial {
    reason: u32,
    direction: u32,
    src: u32,
    dst: u32,
    tuple: TupleKey,
    tgid: u32,
}

#[inline(always)]
fn config() -> EnforceConfig {
    match ENFORCE_CONFIG.get(0) {
        Some(c) => *c,
        // Unreachable for an array; an unattested default denies everything.
        None => EnforceConfig { generation: 0, node_attested: 0, audit_interval_ns: 0 },
    }
}

/// The identity of the process running this hook: its record, looked up in IDENTITIES.
/// Returns (identity, tgid, exec ktime); identity 0 when there is no record or no entry.
#[inline(always)]
fn current_stamp() -> SockStamp {
    // SAFETY: plain helper calls; the task pointer is trusted by the verifier.
    let task: *mut task_struct = unsafe { bpf_get_current_task_btf() };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: a trusted task pointer.
    let Some(rec) = (unsafe { TASK_RECORDS.get(task) }) else {
        return SockStamp { key: IdentityKey::default(), exec_ktime_ns: 0, tgid, key_valid: 0 };
    };
    // SAFETY: valid for this run; only fields are copied out.
    let (key, flags, exec) = unsafe {
        (
            IdentityKey { cgroup_id: (*rec).cgroup_id, exe: (*rec).exe, euid: (*rec).euid, egid: (*rec).egid },
            (*rec).flags,
            (*rec).exec_ktime_ns,
        )
    };
    SockStamp { key, exec_ktime_ns: exec, tgid, key_valid: u32::from(flags & record_flags::EXE_VALID != 0) }
}

/// The identity a stamp's creator has now (0: none).
#[inline(always)]
fn identity_of(key: &IdentityKey, valid: u32) -> u32 {
    if valid == 0 {
        return 0;
    }
    // SAFETY: the value is copied out at once.
    unsafe { IDENTITIES.get(*key) }.map(|v| v.identity).unwrap_or(0)
}

/// The stamp belongs to a live process running the image that made the socket: it may
/// start flows.
#[inline(always)]
fn stamp_is_current(stamp: &SockStamp) -> bool {
    // SAFETY: the value is copied out at once.
    matches!(unsafe { EXEC_GEN.get(stamp.tgid) }, Some(&t) if t == stamp.exec_ktime_ns)
}

/// The stamp's process still runs, or exited, in the image that made the socket: the
/// socket may carry packets (an exited creator's sockets drain and close).
#[inline(always)]
fn stamp_may_send(stamp: &SockStamp) -> bool {
    // SAFETY: the value is copied out at once.
    matches!(unsafe { EXEC_GEN.get(stamp.tgid) }, Some(&t) if t & !EXEC_GEN_EXITED == stamp.exec_ktime_ns)
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

#[inline(always)]
fn egress_allowed(generation: u32, identity: u32, proto: u32, port: u16, addr: u32) -> bool {
    let trie = if generation == 0 { &EGRESS_0 } else { &EGRESS_1 };
    cidr_allowed(trie, identity, proto, port, addr)
}

#[inline(always)]
fn ingress_allowed(generation: u32, identity: u32, proto: u32, port: u16, addr: u32) -> bool {
    let trie = if generation == 0 { &INGRESS_0 } else { &INGRESS_1 };
    cidr_allowed(trie, identity, proto, port, addr)
}

/// 127.0.0.0/8, `addr` in network order.
#[inline(always)]
fn is_loopback(addr: u32) -> bool {
    u32::from_be(addr) >> 24 == 127
}

/// Counts the drop, and reports it unless its source reported within the audit interval.
#[inline(always)]
fn record_drop(d: &Denial, cgroup_id: u64, interval_ns: u64) {
    if let Some(count) = DROP_COUNTS.get_ptr_mut(d.reason) {
        // SAFETY: this CPU's slot; per-CPU, so no other writer.
        unsafe { *count += 1 };
    }
    // The source: the sending identity if known, else the peer address, else the cgroup.
    let source = if d.src != 0 {
        1u64 << 62 | d.src as u64
    } else if d.tuple.saddr != 0 {
        2u64 << 62 | d.tuple.saddr as u64
    } else {
        cgroup_id & ((1u64 << 62) - 1)
    };
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
// cgroup/sock_create

/// Stamps the new socket with its creator's identity and exec. Never refuses a socket: an
/// unstamped or identity-0 socket is refused where it would be used.
///
/// Except IPv6 sockets: no hook checks their flows yet, so they are refused here (EPERM at
/// socket()) instead of being a way around enforcement.
#[cgroup_sock(sock_create)]
pub fn enforce_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: ctx field of a cgroup/sock program.
    if unsafe { (*ctx.sock).family } == AF_INET6 {
        let stamp = current_stamp();
        let d = Denial {
            reason: drop_reason::IPV6,
            direction: direction::EGRESS,
            src: identity_of(&stamp.key, stamp.key_valid),
            dst: 0,
            tuple: TupleKey::default(),
            tgid: stamp.tgid,
        };
        // SAFETY: plain helper call.
        record_drop(&d, unsafe { bpf_get_current_cgroup_id() }, config().audit_interval_ns);
        return DENY;
    }
    let _ = try_sock_create(&ctx);
    ALLOW
}

const AF_INET6: u32 = 10;

fn try_sock_create(ctx: &SockContext) -> Result<(), ()> {
    let mut stamp = current_stamp();
    // SAFETY: for cgroup/sock programs the ctx is the socket.
    let slot = unsafe { SOCK_STAMPS.get_or_insert(ctx.sock as *mut c_void, &mut stamp) }.ok_or(())?;
    // SAFETY: valid for this run.
    unsafe { *slot = stamp };
    Ok(())
}

// ---------------------------------------------------------------------------------------
// cgroup/connect4, cgroup/sendmsg4

#[cgroup_sock_addr(connect4)]
pub fn enforce_connect4(ctx: SockAddrContext) -> i32 {
    verdict_addr(&ctx)
}

/// Unconnected UDP sends (a connected socket was checked at connect).
#[cgroup_sock_addr(sendmsg4)]
pub fn enforce_sendmsg4(ctx: SockAddrContext) -> i32 {
    verdict_addr(&ctx)
}

#[inline(always)]
fn verdict_addr(ctx: &SockAddrContext) -> i32 {
    let cfg = config();
    match try_addr(ctx, &cfg) {
        Ok(()) => ALLOW,
        Err(d) => {
            // SAFETY: plain helper call.
            record_drop(&d, unsafe { bpf_get_current_cgroup_id() }, cfg.audit_interval_ns);
            DENY
        }
    }
}

/// The destination is allowed for the socket's identity.
///
/// Same-node destinations (a protected workload's port in BOUND, at a loopback address or at
/// the socket's own bound source address) are checked identity to identity in FLOWS; every
/// other destination by address in EGRESS. A same-node destination at another local address
/// (e.g. the host's interface address) takes the EGRESS path here, and its server side still
/// checks FLOWS on ingress through PEERS.
#[inline(always)]
fn try_addr(ctx: &SockAddrContext, cfg: &EnforceConfig) -> Result<(), Denial> {
    // SAFETY: ctx fields of a sock_addr program, read one at a time at their exact size.
    let (daddr, dport_be, proto, sk) = unsafe {
        let a = ctx.sock_addr;
        ((*a).user_ip4, (*a).user_port as u16, (*a).protocol, (*a).__bindgen_anon_1.sk)
    };
    // SAFETY: `sk` is the program's socket (never null in sock_addr programs).
    let (saddr, sport_host) = unsafe { ((*sk).src_ip4, (*sk).src_port) };
    let tuple = TupleKey { saddr, daddr, sport: (sport_host as u16).to_be(), dport: dport_be, proto };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let mut denial = Denial { reason: 0, direction: direction::EGRESS, src: 0, dst: 0, tuple, tgid };

    if cfg.node_attested != 1 {
        denial.reason = drop_reason::NODE_UNATTESTED;
        return Err(denial);
    }
    // SAFETY: `sk` is the sock_addr program's socket.
    let Some(stamp) = (unsafe { SOCK_STAMPS.get(sk as *mut c_void) }) else {
        // Made before the programs were attached: no identity can be vouched for.
        denial.reason = drop_reason::NO_IDENTITY;
        return Err(denial);
    };
    // SAFETY: valid for this run; copied out.
    let stamp = unsafe { *stamp };
    let identity = identity_of(&stamp.key, stamp.key_valid);
    denial.src = identity;
    if identity == 0 {
        denial.reason = drop_reason::NO_IDENTITY;
        return Err(denial);
    }
    if !stamp_is_current(&stamp) {
        denial.reason = drop_reason::STALE_SOCKET;
        return Err(denial);
    }
    let dport = u16::from_be(dport_be);
    let local = is_loopback(daddr) || (saddr != 0 && saddr == daddr);
    // SAFETY: the value is copied out at once.
    let bound = unsafe { BOUND.get(PortKey { port: dport, _pad: 0, proto }) }.copied();
    let allowed = match bound {
        Some(b) if local => {
            let dst = identity_of(&b.key, b.key_valid);
            denial.dst = dst;
            dst != 0 && flow_allowed(cfg.generation, identity, dst, dport, proto)
        }
        _ => egress_allowed(cfg.generation, identity, proto, dport, daddr),
    };
    if allowed {
        Ok(())
    } else {
        denial.reason = drop_reason::POLICY;
        Err(denial)
    }
}

// ---------------------------------------------------------------------------------------
// cgroup/post_bind4

/// Records who serves the port (the binder's stamp key; its identity is looked up when a
/// packet or connect needs it). A binder without identity keeps the listener protected
/// (nothing reaches it) rather than taken for the port's former owner, or left open.
#[cgroup_sock(post_bind4)]
pub fn enforce_post_bind4(ctx: SockContext) -> i32 {
    match try_post_bind4(&ctx) {
        Ok(()) => ALLOW,
        Err(d) => {
            warn!(&ctx, "post_bind4: BOUND is full; bind refused");
            let cfg = config();
            // SAFETY: plain helper call.
            record_drop(&d, unsafe { bpf_get_current_cgroup_id() }, cfg.audit_interval_ns);
            DENY
        }
    }
}

fn try_post_bind4(ctx: &SockContext) -> Result<(), Denial> {
    let sk = ctx.sock;
    // SAFETY: ctx fields of a cgroup/sock program.
    let (port, proto, saddr) = unsafe { ((*sk).src_port as u16, (*sk).protocol, (*sk).src_ip4) };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Ok(());
    }
    let key = PortKey { port, _pad: 0, proto };
    // SAFETY: for cgroup/sock programs the ctx is the socket.
    // The binder's key, not its identity now: an identity published later applies, and a
    // socket whose creator has none keeps the listener unreachable rather than unprotected.
    let value = match unsafe { SOCK_STAMPS.get(sk as *mut c_void) } {
        // SAFETY: valid for this run.
        Some(stamp) => unsafe { BoundVal { key: (*stamp).key, key_valid: (*stamp).key_valid, _pad: 0 } },
        None => BoundVal::default(),
    };
    let identity = identity_of(&value.key, value.key_valid);
    BOUND.insert(key, value, 0).map_err(|_| Denial {
        reason: drop_reason::MAP_FULL,
        direction: direction::INGRESS,
        src: identity,
        dst: identity,
        tuple: TupleKey { saddr, daddr: 0, sport: port.to_be(), dport: 0, proto },
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
    })
}

// ---------------------------------------------------------------------------------------
// sockops

/// At TCP connect (in the connecting task, before the SYN) records the 4-tuple's identity
/// for the server side; deletes it when the connection closes, so a later socket reusing
/// the tuple is not taken for it.
#[sock_ops]
pub fn enforce_sock_ops(ctx: SockOpsContext) -> u32 {
    let _ = try_sock_ops(&ctx);
    1
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), ()> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB {
        return Ok(());
    }
    if ctx.family() != 2 {
        return Ok(()); // AF_INET only
    }
    let key = TupleKey {
        saddr: ctx.local_ip4(),
        daddr: ctx.remote_ip4(),
        // local_port is host order; remote_port is the network-order port shifted left 16.
        sport: (ctx.local_port() as u16).to_be(),
        dport: (ctx.remote_port() >> 16) as u16,
        proto: IPPROTO_TCP,
    };
    if op == BPF_SOCK_OPS_STATE_CB {
        if ctx.arg(1) == BPF_TCP_CLOSE {
            let _ = PEERS.remove(key);
        }
        return Ok(());
    }
    // SAFETY: the ctx's socket field; null-checked.
    let sk: *mut bpf_sock = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return Err(());
    }
    // SAFETY: a full socket at TCP_CONNECT_CB.
    let stamp = unsafe { SOCK_STAMPS.get(sk as *mut c_void) }.ok_or(())?;
    // SAFETY: valid for this run.
    let identity = unsafe { identity_of(&(*stamp).key, (*stamp).key_valid) };
    if identity == 0 {
        return Err(());
    }
    PEERS.insert(key, identity, 0).map_err(|_| ())?;
    ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32).map_err(|_| ())
}

// ---------------------------------------------------------------------------------------
// cgroup_skb/ingress

/// Packets to a protected listener (its port in BOUND): from a same-node identity (PEERS)
/// checked in FLOWS, from anyone else by source address in INGRESS. Packets to other ports
/// (replies to a protected client, unprotected listeners) pass.
#[cgroup_skb(ingress)]
pub fn enforce_ingress(ctx: SkBuffContext) -> i32 {
    let cfg = config();
    match try_ingress(&ctx, &cfg) {
        Ok(()) => ALLOW,
        Err(d) => {
            // SAFETY: the program's own skb.
            let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
            record_drop(&d, cgroup_id, cfg.audit_interval_ns);
            DENY
        }
    }
}

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

fn try_ingress(ctx: &SkBuffContext, cfg: &EnforceConfig) -> Result<(), Denial> {
    // Not IPv4 TCP/UDP (or too short to tell): not ours to judge.
    let Some(tuple) = parse_ipv4(ctx) else {
        return Ok(());
    };
    let dport = u16::from_be(tuple.dport);
    // SAFETY: copied out at once.
    let Some(bound) = unsafe { BOUND.get(PortKey { port: dport, _pad: 0, proto: tuple.proto }) }.copied() else {
        return Ok(());
    };
    let dst = identity_of(&bound.key, bound.key_valid);
    let mut denial = Denial { reason: 0, direction: direction::INGRESS, src: 0, dst, tuple, tgid: 0 };
    if cfg.node_attested != 1 {
        denial.reason = drop_reason::NODE_UNATTESTED;
        return Err(denial);
    }
    if dst == 0 {
        denial.reason = drop_reason::NO_IDENTITY;
        return Err(denial);
    }
    // SAFETY: copied out at once.
    match unsafe { PEERS.get(tuple) }.copied() {
        Some(src) => {
            denial.src = src;
            if flow_allowed(cfg.generation, src, dst, dport, tuple.proto) {
                return Ok(());
            }
            denial.reason = drop_reason::POLICY;
        }
        None => {
            if ingress_allowed(cfg.generation, dst, tuple.proto, dport, tuple.saddr) {
                return Ok(());
            }
            denial.reason = drop_reason::UNAUTHENTICATED_PEER;
        }
    }
    Err(denial)
}

// ---------------------------------------------------------------------------------------
// cgroup_skb/egress

/// Drops packets of sockets whose creator has exec'd since it made them (or exited more than
/// the grace period ago): a connection established under one identity does not carry the
/// next image's traffic.
/// And every packet while the node is unattested. Everything else was decided at
/// connect/sendmsg; this runs per packet, so it stays small.
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

/// The stamp of the packet's socket, if it is a full socket with one.
#[inline(always)]
fn skb_stamp(ctx: &SkBuffContext) -> Option<SockStamp> {
    // SAFETY: the ctx's socket field.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a socket pointer from the skb; request and timewait sockets give null.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return None;
    }
    // SAFETY: a full socket; the value is copied out at once.
    unsafe { SOCK_STAMPS.get(full as *mut c_void).map(|p| *p) }
}

fn try_egress(ctx: &SkBuffContext, cfg: &EnforceConfig) -> Result<(), Denial> {
    let stamp = skb_stamp(ctx);
    let reason = match stamp {
        _ if cfg.node_attested != 1 => drop_reason::NODE_UNATTESTED,
        Some(s) if !stamp_may_send(&s) => drop_reason::STALE_SOCKET,
        _ => return Ok(()),
    };
    let (src, tgid) = stamp.map(|s| (identity_of(&s.key, s.key_valid), s.tgid)).unwrap_or((0, 0));
    Err(Denial { reason, direction: direction::EGRESS, src, dst: 0, tuple: TupleKey::default(), tgid })
}

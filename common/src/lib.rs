//! Types shared by the kernel programs (`agent-ebpf`) and the agent (`agent::ebpf`).
//!
//! Everything here is `#[repr(C)]` plain data with explicit padding, so both sides agree on
//! layout byte for byte. No logic lives here.
#![no_std]

/// Length of `task_struct::comm` (TASK_COMM_LEN).
pub const COMM_LEN: usize = 16;

/// Names of the maps in the eBPF object, as the agent looks them up.
pub mod maps {
    /// Array with one [`super::PeerQuery`] at index 0 (the caller check's answer).
    pub const PEER_QUERY: &str = "PEER_QUERY";
    /// SOCKMAP with one slot: the accepted socket the caller check looks at.
    pub const PEER_SOCK: &str = "PEER_SOCK";
    /// RingBuf of [`super::ExecEvent`].
    pub const EXEC_EVENTS: &str = "EXEC_EVENTS";
    /// Array with one [`super::TraceFilter`] at index 0.
    pub const TRACE_FILTER: &str = "TRACE_FILTER";
    /// Task storage of [`super::ProcRecord`], one per task.
    pub const TASK_RECORDS: &str = "TASK_RECORDS";
    /// HashMap [`super::FileKey`] -> [`super::Measurement`].
    pub const MEASUREMENTS: &str = "MEASUREMENTS";

    // Enforcement. Every map below is pinned by name under the agent's bpffs directory, so
    // enforcement outlives the agent and a new agent re-adopts it.
    /// HashMap [`super::IdentityKey`] -> [`super::IdentityVal`]: who a process is, by what
    /// the kernel recorded of it (written by the agent from registration entries).
    pub const IDENTITIES: &str = "IDENTITIES";
    /// Socket storage of [`super::SockState`]: who made the socket, and the verdict of its
    /// connection with the epoch it was decided at.
    pub const SOCK_STATE: &str = "SOCK_STATE";
    /// HashMap tgid (u32) -> [`super::ExecGen`]: the current exec of each process that has
    /// stamped a socket, so a socket stamped before an exec (or by a dead process whose PID
    /// was reused) stops working. [`super::EXEC_GEN_EXITED`] is set when the process exits:
    /// its sockets may still drain what was written (and close), but start nothing new. The
    /// entry is removed [`super::EXEC_GEN_EXIT_GRACE_NS`] after the exit.
    pub const EXEC_GEN: &str = "EXEC_GEN";
    /// Queue of [`super::ExecGenExit`]: exits whose EXEC_GEN entry is still to be removed.
    pub const EXEC_GEN_EXITS: &str = "EXEC_GEN_EXITS";
    /// Array with one u64, moved by the process programs whenever an EXEC_GEN entry changes.
    pub const EXEC_EPOCH: &str = "EXEC_EPOCH";
    /// HashMap protected root cgroup id (u64) -> [`super::Quota`]: the EXEC_GEN entries held
    /// by processes under each protected root, so no root's churn can fill the map for the
    /// others.
    pub const EXEC_GEN_QUOTA: &str = "EXEC_GEN_QUOTA";
    /// Array of [`super::ProtectedRoot`]: the protected cgroups, for quotas.
    pub const PROTECTED_ROOTS: &str = "PROTECTED_ROOTS";
    /// HashMap IPv4 address (network order, u32) -> u32: every address of this node's network
    /// namespaces (kept by the agent). A packet from one of them that did not come over
    /// loopback is from another namespace of this node: never judged by address rules.
    pub const LOCAL_ADDRS: &str = "LOCAL_ADDRS";
    /// Two generations of each policy map; [`super::EnforceConfig::generation`] picks one, so a
    /// reload is one write (never a mix of old and new rules, never none).
    pub const FLOWS: [&str; 2] = ["FLOWS_0", "FLOWS_1"];
    pub const EGRESS: [&str; 2] = ["EGRESS_0", "EGRESS_1"];
    pub const INGRESS: [&str; 2] = ["INGRESS_0", "INGRESS_1"];
    /// Array with one [`super::EnforceConfig`].
    pub const ENFORCE_CONFIG: &str = "ENFORCE_CONFIG";
    /// RingBuf of [`super::DropEvent`].
    pub const DROP_EVENTS: &str = "DROP_EVENTS";
    /// PerCpuArray u64 indexed by [`super::drop_reason`]: every drop counted.
    pub const DROP_COUNTS: &str = "DROP_COUNTS";
    /// LRU HashMap source (identity or address, u64) -> last report ktime (its low 16 bits
    /// hold the count of events suppressed since): events are rate-limited per source;
    /// counts are not.
    pub const AUDIT_LIMIT: &str = "AUDIT_LIMIT";

    // Tunnels between nodes (kept by the agent's tunnel from the server's view of the
    // other nodes; pinned like the rest).
    /// HashMap [`super::ServiceKey`] -> [`super::ServiceVal`]: the protected workloads other
    /// Tether nodes serve, by address and port. A connect() from a protected workload to one
    /// of them is judged by identity and captured into the local tunnel listener.
    pub const TUNNEL_SERVICES: &str = "TUNNEL_SERVICES";
    /// Array with one [`super::TunnelConfig`]: where captured connections go.
    pub const TUNNEL_CONFIG: &str = "TUNNEL_CONFIG";
    /// Socket storage of [`super::TunnelSock`]: a captured socket's original destination
    /// (what getpeername() shows, and what its connection is judged against again).
    pub const TUNNEL_SOCK: &str = "TUNNEL_SOCK";
    /// LRU HashMap [`super::TupleKey`] (a captured connection to the tunnel listener, as the
    /// client socket sees it) -> [`super::TunnelConn`]: written when the connection's SYN
    /// leaves (before the listener can accept it), taken by the agent at accept.
    pub const TUNNEL_CONNS: &str = "TUNNEL_CONNS";
}

/// Names of the programs in the eBPF object.
pub mod programs {
    /// `tp_btf/sched_process_exec`.
    pub const EXEC: &str = "sched_process_exec";
    /// `tp_btf/sched_process_fork`.
    pub const FORK: &str = "sched_process_fork";
    /// `tp_btf/sched_process_exit`.
    pub const EXIT: &str = "sched_process_exit";
    /// `tp_btf/cgroup_attach_task`.
    pub const CGROUP_ATTACH: &str = "cgroup_attach_task";
    /// `iter/task`: seeds records of processes that predate the programs.
    pub const SEED_TASKS: &str = "seed_tasks";
    /// `iter/sockmap` over PEER_SOCK: answers a [`super::PeerQuery`].
    pub const PEER_CREDS: &str = "check_peer_creds";
    // Enforcement programs, attached to protected cgroups.
    pub const SOCK_CREATE: &str = "enforce_sock_create";
    pub const CONNECT4_ENFORCE: &str = "enforce_connect4";
    pub const SENDMSG4: &str = "enforce_sendmsg4";
    pub const POST_BIND4: &str = "enforce_post_bind4";
    pub const SKB_INGRESS: &str = "enforce_ingress";
    pub const SKB_EGRESS: &str = "enforce_egress";
    /// `cgroup/getpeername4`: a captured socket shows the address it dialled.
    pub const GETPEERNAME4: &str = "enforce_getpeername4";
}

/// Names of load-time globals (`volatile const` in C terms) the agent fills in from the
/// running kernel's BTF, so no struct offset of the build machine's kernel is baked in.
pub mod globals {
    /// `struct kernel_offsets`, see [`super::KernelOffsets`].
    pub const KERNEL_OFFSETS: &str = "KERNEL_OFFSETS";
}

/// Byte offsets of the kernel struct members the programs read, taken from the running
/// kernel's BTF at load time. `valid == 0` means "not resolved": the programs then record no
/// executable identity rather than reading at a wrong offset.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_real_parent: u32,
    /// `task_struct.start_boottime`: what /proc/<pid>/stat's start time is derived from.
    pub task_start_boottime: u32,
    pub task_cred: u32,
    pub task_mm: u32,
    pub task_cgroups: u32,
    pub task_comm: u32,
    pub cred_uid: u32,
    pub cred_gid: u32,
    pub cred_euid: u32,
    pub cred_egid: u32,
    pub mm_exe_file: u32,
    pub bprm_file: u32,
    pub file_inode: u32,
    pub inode_ino: u32,
    pub inode_sb: u32,
    pub inode_ctime_sec: u32,
    pub inode_ctime_nsec: u32,
    pub sb_dev: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
    /// 1 when every offset above was found.
    pub valid: u32,
    // For the Workload API's check that a caller still holds the credentials it connected
    // with (the `iter/sockmap` program): `sock_common.skc_cookie`, `sock.sk_peer_pid`,
    // `sock.sk_peer_cred`, `pid.tasks`, `task_struct.pid_links`, `task_struct.real_cred`.
    pub sock_cookie: u32,
    pub sock_peer_pid: u32,
    pub sock_peer_cred: u32,
    pub pid_tasks: u32,
    pub task_pid_links: u32,
    pub task_real_cred: u32,
    /// 1 when the six offsets above were found.
    pub peer_valid: u32,
    // The thread list: `task_struct.signal`, `signal_struct.thread_head`,
    // `task_struct.thread_node`.
    pub task_signal: u32,
    pub signal_thread_head: u32,
    pub task_thread_node: u32,
    /// 1 when the three offsets above were found (else only the thread group leader is
    /// compared).
    pub threads_valid: u32,
}

/// The question the agent puts to the `iter/sockmap` program about one of its accepted Unix
/// sockets (by socket cookie), and the answer it writes back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerQuery {
    pub cookie: u64,
    /// One of [`peer_creds`]; 0 while no socket with that cookie was seen.
    pub verdict: u32,
    pub _pad: u32,
}

/// Whether the process at the other end of a Unix socket still holds the credentials it
/// connected with. The kernel keeps, on the accepted socket, a reference to the credentials
/// object the peer had at connect(); every exec (and every credential change) gives a
/// process a new one, and a kept reference keeps the old object alive, so its address cannot
/// be reused while the socket lives.
pub mod peer_creds {
    /// A live thread of the peer still has them: no exec and no credential change since.
    pub const HELD: u32 = 1;
    /// None of its threads has them: it exec'd (or changed credentials) after connecting.
    pub const CHANGED: u32 = 2;
    /// The peer process is gone.
    pub const EXITED: u32 = 3;
    /// Not decidable (no peer recorded, too many threads to walk, offsets unknown).
    pub const UNKNOWN: u32 = 4;
}

/// A file's identity as the kernel sees it: device, inode and a change indicator (ctime).
/// Replacing the file (new inode) or rewriting it in place (new ctime) gives a new key, so a
/// measurement can never be attributed to content it was not taken from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub ino: u64,
    pub ctime_sec: i64,
    pub ctime_nsec: u32,
    /// Kernel encoding: `major << 20 | minor`.
    pub dev: u32,
}

/// Flags of a [`ProcRecord`].
pub mod record_flags {
    /// `exe` was read (offsets known and every read succeeded).
    pub const EXE_VALID: u32 = 1;
    /// Written by the start-up task iterator: the process predates the programs, so its
    /// record was read from its task, not observed at its exec.
    pub const SEEDED: u32 = 2;
    /// Inherited at fork: the process has not exec'd since its parent's record was copied.
    pub const FORKED: u32 = 4;
}

/// What the kernel recorded about a process: kept in task storage, written at exec, copied
/// at fork, updated on cgroup migration, deleted at exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcRecord {
    pub exe: FileKey,
    /// Nanoseconds since boot (incl. suspend) at process start, as in task_struct.
    pub start_boottime_ns: u64,
    /// `bpf_ktime_get_ns` at the exec that produced this record; 0 if seeded.
    pub exec_ktime_ns: u64,
    pub cgroup_id: u64,
    pub tgid: u32,
    /// Thread-group id of the parent at fork (or at seeding).
    pub ppid: u32,
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
    /// [`record_flags`].
    pub flags: u32,
    pub _pad: u32,
    pub comm: [u8; COMM_LEN],
}

/// Result of measuring an executable, written by the agent, keyed by [`FileKey`], so kernel
/// hooks can see "measured as H" synchronously.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measurement {
    pub sha256: [u8; 32],
    /// [`measurement_state`].
    pub state: u32,
    pub _pad: u32,
}

pub mod measurement_state {
    pub const MEASURED: u32 = 1;
    /// Not hashed (over the size cap, deleted, replaced before it could be read).
    pub const UNMEASURABLE: u32 = 2;
}

/// Which execs are sent as [`ExecEvent`]s: none unless `enabled`; then those whose cgroup has
/// `ancestor_id` as its ancestor at `level` (the cgroup itself included), or every exec when
/// `ancestor_id == 0`. Records are kept for every process either way.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceFilter {
    pub ancestor_id: u64,
    pub level: u32,
    /// 0: no events; 1: execs under `ancestor_id` (everywhere when 0);
    /// [`TRACE_PROTECTED_ROOTS`]: execs under any protected root of the enforcement programs.
    pub enabled: u32,
}

/// [`TraceFilter::enabled`]: execs under any cgroup in the enforcement's `PROTECTED_ROOTS`.
pub const TRACE_PROTECTED_ROOTS: u32 = 2;

/// One exec as the kernel saw it, sent from `tp_btf/sched_process_exec` for processes in
/// the traced scope: the record it wrote, and the thread that exec'd.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecEvent {
    pub record: ProcRecord,
    pub pid: u32,
    pub _pad: u32,
}

/// Who a process is for enforcement: the kernel-recorded facts the agent's entry matching
/// depends on (cgroup, executable, effective uid/gid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IdentityKey {
    pub cgroup_id: u64,
    pub exe: FileKey,
    pub euid: u32,
    pub egid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityVal {
    /// Nonzero; the policy compiler's numbering.
    pub identity: u32,
    pub _pad: u32,
}

/// In an [`maps::EXEC_GEN`] value: the process has exited.
pub const EXEC_GEN_EXITED: u64 = 1 << 63;

/// How long an exited process's sockets may keep sending what they had queued (and their
/// FIN) before its [`maps::EXEC_GEN`] entry goes.
pub const EXEC_GEN_EXIT_GRACE_NS: u64 = 60_000_000_000;

/// An exit awaiting the removal of its [`maps::EXEC_GEN`] entry (kernel-side bookkeeping).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecGenExit {
    pub tgid: u32,
    pub _pad: u32,
    pub exit_ktime_ns: u64,
    /// The entry's exec as the exit left it; removed only if still so (not reused since).
    pub value: u64,
}

/// Value of [`maps::EXEC_GEN`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecGen {
    /// Exec ktime of the process's current image; [`EXEC_GEN_EXITED`] set once it exited.
    pub exec: u64,
    /// The protected root whose quota the entry counts against.
    pub root: u64,
}

/// A protected cgroup (the root of a protected subtree), for per-root quotas.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtectedRoot {
    pub cgroup_id: u64,
    pub level: u32,
    pub _pad: u32,
}

/// Most protected roots a node has.
pub const MAX_PROTECTED_ROOTS: u32 = 16;

/// EXEC_GEN entries held under one protected root, and its limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quota {
    pub used: u64,
    pub limit: u64,
}

/// Kept on every socket of a protected cgroup (socket storage, cloned onto accepted
/// sockets): who made it, as the kernel recorded that process, and the verdict of its
/// connection. The identity number is looked up from `key` in [`maps::IDENTITIES`] when the
/// connection is judged, so an identity the agent publishes after the socket was made applies
/// to it, and one the agent withdraws stops applying at the next epoch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    pub key: IdentityKey,
    /// The creator's exec (see [`maps::EXEC_GEN`]).
    pub exec_ktime_ns: u64,
    /// [`maps::EXEC_EPOCH`] + 1 when the creator was last found running that exec (0: never
    /// checked): the exec table is looked up again only once that counter has moved.
    pub exec_seen: u64,
    pub tgid: u32,
    /// [`key_kind`]: whether `key` names a process record, or the identity was asserted.
    pub key_valid: u32,
    /// [`EnforceConfig::epoch`] the verdict was decided at; 0: not decided (listeners,
    /// unconnected sockets, and accepted sockets until their first packet).
    pub epoch: u32,
    /// 0: allowed; otherwise the [`drop_reason`] the connection is refused with.
    pub verdict: u32,
    /// Identities the verdict was decided for (audit).
    pub src: u32,
    pub dst: u32,
    /// [`sock_role`].
    pub role: u32,
    /// The creator's identity number as of epoch `id_epoch` (looked up again at another).
    /// With [`key_kind::TUNNEL_PEER`], the identity itself (never looked up).
    pub id: u32,
    pub id_epoch: u32,
    /// [`tunnel_state`]: whether connect() captured this socket into the tunnel.
    pub tunnel: u32,
}

/// What a [`SockState`]'s `key` is.
pub mod key_kind {
    /// The creator had no record with an executable: no identity can ever apply.
    pub const NONE: u32 = 0;
    /// The creator's process record: its identity is looked up in `IDENTITIES`.
    pub const RECORD: u32 = 1;
    /// Stamped from user space by the agent (only root, writing the map, can): a socket the
    /// agent's tunnel opens to a local workload on behalf of a remote peer whose X.509-SVID
    /// it verified. `id` is that peer's identity number; no kernel program ever writes this.
    pub const TUNNEL_PEER: u32 = 2;
    /// Stamped by the agent on its capture listener: connect() captures a socket only into
    /// a listener carrying this (a process that took the port while no agent ran gets
    /// nothing). No identity.
    pub const TUNNEL_LISTENER: u32 = 3;
}

/// [`SockState::tunnel`].
pub mod tunnel_state {
    pub const NONE: u32 = 0;
    /// connect() redirected the socket to the tunnel listener; its connection's entry in
    /// [`super::maps::TUNNEL_CONNS`] is written by its first packet (the SYN).
    pub const PENDING: u32 = 1;
    /// The entry is written.
    pub const PUBLISHED: u32 = 2;
}

/// Key of [`maps::TUNNEL_SERVICES`]: a remote workload's address and TCP port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Value of [`maps::TUNNEL_SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceVal {
    /// The remote workload's identity number (the same numbering as local ones: derived
    /// from its SPIFFE ID).
    pub identity: u32,
    /// [`service_flags`].
    pub flags: u32,
}

pub mod service_flags {
    /// The node serving it is unreachable: new connections are refused at connect()
    /// (ECONNREFUSED) instead of being captured and reset later.
    pub const NODE_DOWN: u32 = 1;
}

/// Value of [`maps::TUNNEL_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelConfig {
    /// The network namespace whose sockets are captured (its cookie); others are not.
    pub netns_cookie: u64,
    /// The tunnel's capture listener (network order), in that namespace.
    pub listener_addr: u32,
    pub listener_port: u16,
    /// 0: nothing is captured.
    pub enabled: u16,
}

/// Value of [`maps::TUNNEL_SOCK`]: where a captured socket was really going.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelSock {
    /// Network byte order.
    pub daddr: u32,
    /// Network byte order.
    pub dport: u16,
    pub _pad: u16,
    /// The destination's identity number when it was captured.
    pub dst_identity: u32,
    pub _pad2: u32,
}

/// Value of [`maps::TUNNEL_CONNS`]: what the kernel knew of a captured connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelConn {
    /// The client socket's cookie (never reused while the kernel runs).
    pub cookie: u64,
    /// The original destination, network byte order.
    pub daddr: u32,
    pub dport: u16,
    pub _pad: u16,
    /// The client socket's identity, as judged at connect() (and the destination's).
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The process that made the client socket.
    pub tgid: u32,
    pub _pad2: u32,
}

/// What a socket does, as far as judging its connection goes.
pub mod sock_role {
    /// Created, not yet connected or bound.
    pub const NEW: u32 = 0;
    /// Connected by its owner: the flow goes out to the peer.
    pub const OUTBOUND: u32 = 1;
    /// Bound (a server); its accepted sockets inherit this role: the flow comes in.
    pub const INBOUND: u32 = 2;
}

/// An IPv4 flow as seen from the client: addresses and ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u32,
}

/// Identity to identity: `dport` host order, 0 = any port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: u32,
    pub dst: u32,
    pub dport: u16,
    pub _pad: u16,
    pub proto: u32,
}

/// LPM trie key: the identity, protocol and port are always matched in full (64 bits), then
/// `prefixlen - 64` bits of the address. `port` host order, 0 = any port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CidrKey {
    pub prefixlen: u32,
    pub identity: u32,
    pub proto: u16,
    pub port: u16,
    /// Network byte order.
    pub addr: [u8; 4],
}

/// Value of the policy maps: which rule allowed the flow (index into the compiled rules).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleRef {
    pub rule: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnforceConfig {
    /// Which of the two policy map generations is live (0 or 1).
    pub generation: u32,
    /// Bumped by the agent whenever identities, policy, local addresses or attestation
    /// change: a connection whose verdict is of another epoch is judged again at its next
    /// packet. Never 0 once the agent has written the config.
    pub epoch: u32,
    /// The node's attestation is a lease: protected flows pass only while
    /// `bpf_ktime_get_coarse_ns() < lease_until_ns` (CLOCK_MONOTONIC). The agent renews it
    /// while the server accepts the node; a dead agent or a refused node lets it run out.
    pub lease_until_ns: u64,
    /// Minimum interval between two drop events from the same source.
    pub audit_interval_ns: u64,
}

pub mod drop_reason {
    /// The process (or the socket's creator) matches no entry.
    pub const NO_IDENTITY: u32 = 1;
    /// The socket was made before its creator exec'd (or its creator is gone).
    pub const STALE_SOCKET: u32 = 2;
    /// The node's attestation lease ran out (a dead agent, or the server refused the node).
    pub const NODE_UNATTESTED: u32 = 3;
    /// No rule allows this flow.
    pub const POLICY: u32 = 4;
    /// Inbound from a peer that is neither a same-node identity nor an allowed remote range
    /// (a process of this node without identity, or one in another namespace of this node).
    pub const UNAUTHENTICATED_PEER: u32 = 5;
    /// A map (or the protected root's quota in it) was full: denied, and alerted.
    pub const MAP_FULL: u32 = 6;
    /// An IPv6 socket in a protected cgroup: only IPv4 is enforced, so IPv6 is refused at
    /// socket creation rather than left unchecked.
    pub const IPV6: u32 = 7;
    /// A raw socket: its packets pass no connect or sendmsg hook.
    pub const RAW_SOCKET: u32 = 8;
    /// An ICMP datagram ("ping") socket: no connect or sendmsg hook judges it.
    pub const ICMP_SOCKET: u32 = 9;
    /// Any other protocol (SCTP, UDP-Lite, MPTCP, ...): only TCP and UDP are judged.
    pub const PROTOCOL: u32 = 10;
    /// A socket of a protected cgroup that carries no state: made before enforcement was
    /// attached; it carries nothing until the agent stamps it.
    pub const UNSTAMPED_SOCKET: u32 = 11;
    pub const COUNT: u32 = 12;

    /// The name the audit log and metrics give a reason.
    pub fn name(r: u32) -> &'static str {
        match r {
            NO_IDENTITY => "no_identity",
            STALE_SOCKET => "stale_socket",
            NODE_UNATTESTED => "node_unattested",
            POLICY => "policy",
            UNAUTHENTICATED_PEER => "unauthenticated_peer",
            MAP_FULL => "map_full",
            IPV6 => "ipv6_not_enforced",
            RAW_SOCKET => "raw_socket",
            ICMP_SOCKET => "icmp_socket",
            PROTOCOL => "protocol_not_enforced",
            UNSTAMPED_SOCKET => "unstamped_socket",
            _ => "unknown",
        }
    }
}

pub mod direction {
    pub const EGRESS: u32 = 1;
    pub const INGRESS: u32 = 2;
}

/// One drop, for the audit log.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    pub ktime_ns: u64,
    pub cgroup_id: u64,
    pub reason: u32,
    pub direction: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub tuple: TupleKey,
    /// The process, when the hook runs in its context (0 otherwise).
    pub tgid: u32,
    /// Events from this source not reported since the last one (rate limit).
    pub suppressed: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), no implicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::IdentityKey {}
    unsafe impl aya::Pod for super::IdentityVal {}
    unsafe impl aya::Pod for super::SockState {}
    unsafe impl aya::Pod for super::TupleKey {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::CidrKey {}
    unsafe impl aya::Pod for super::RuleRef {}
    unsafe impl aya::Pod for super::EnforceConfig {}
    unsafe impl aya::Pod for super::DropEvent {}
    unsafe impl aya::Pod for super::ExecGenExit {}
    unsafe impl aya::Pod for super::ExecGen {}
    unsafe impl aya::Pod for super::ProtectedRoot {}
    unsafe impl aya::Pod for super::Quota {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceVal {}
    unsafe impl aya::Pod for super::TunnelConfig {}
    unsafe impl aya::Pod for super::TunnelSock {}
    unsafe impl aya::Pod for super::PeerQuery {}
    unsafe impl aya::Pod for super::TunnelConn {}
    // SAFETY: all of these are repr(C) with no implicit padding and every bit pattern valid.
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::TraceFilter {}
    unsafe impl aya::Pod for super::ExecEvent {}
    unsafe impl aya::Pod for super::FileKey {}
    unsafe impl aya::Pod for super::ProcRecord {}
    unsafe impl aya::Pod for super::Measurement {}
}

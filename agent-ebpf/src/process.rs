//! Process records: what the kernel knows about every process, kept in task storage so any
//! later hook (socket enforcement, the agent's pidfd lookups) reads it synchronously.
//!
//! exec writes the record, fork copies it to the child, cgroup migration updates it, exit
//! deletes it, and a task iterator seeds processes that predate the programs. Struct
//! members are read at offsets the agent takes from the running kernel's BTF.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{task_struct, BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
        generated::{bpf_task_storage_delete, bpf_task_storage_get},
    },
    macros::{btf_map, btf_tracepoint, map},
    maps::{Array, HashMap, RingBuf, SockMap},
    programs::BtfTracePointContext,
};
use aya_log_ebpf::warn;
use tether_common::{
    peer_creds, record_flags, ExecEvent, FileKey, KernelOffsets, Measurement, PeerQuery, ProcRecord, TraceFilter,
    COMM_LEN,
};

/// Filled in by the agent from the running kernel's BTF before load.
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    task_pid: 0,
    task_tgid: 0,
    task_real_parent: 0,
    task_start_boottime: 0,
    task_cred: 0,
    task_mm: 0,
    task_cgroups: 0,
    task_comm: 0,
    cred_uid: 0,
    cred_gid: 0,
    cred_euid: 0,
    cred_egid: 0,
    mm_exe_file: 0,
    bprm_file: 0,
    file_inode: 0,
    inode_ino: 0,
    inode_sb: 0,
    inode_ctime_sec: 0,
    inode_ctime_nsec: 0,
    sb_dev: 0,
    css_set_dfl_cgrp: 0,
    cgroup_kn: 0,
    kernfs_node_id: 0,
    valid: 0,
    sock_cookie: 0,
    sock_peer_pid: 0,
    sock_peer_cred: 0,
    pid_tasks: 0,
    task_pid_links: 0,
    task_real_cred: 0,
    peer_valid: 0,
    task_signal: 0,
    signal_thread_head: 0,
    task_thread_node: 0,
    threads_valid: 0,
};

/// Task storage (BPF_MAP_TYPE_TASK_STORAGE), which aya-ebpf 0.2 has no wrapper for. The
/// layout is the BTF map definition convention: each field's type encodes one attribute.
#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: placeholder pointers the loader patches; never dereferenced from Rust.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        TaskStorage {
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

    /// The task's value, or None.
    ///
    /// # Safety
    /// `task` must be a task pointer the verifier trusts (a tp_btf or iterator argument).
    #[inline(always)]
    pub unsafe fn get(&self, task: *mut task_struct) -> Option<*mut T> {
        let p = unsafe { bpf_task_storage_get(self.as_ptr(), task, core::ptr::null_mut(), 0) };
        (!p.is_null()).then_some(p as *mut T)
    }

    /// The task's value, created from `init` if absent.
    ///
    /// # Safety
    /// As [`Self::get`].
    #[inline(always)]
    pub unsafe fn get_or_insert(&self, task: *mut task_struct, init: &mut T) -> Option<*mut T> {
        let p = unsafe {
            bpf_task_storage_get(
                self.as_ptr(),
                task,
                init as *mut T as *mut c_void,
                BPF_LOCAL_STORAGE_GET_F_CREATE as u64,
            )
        };
        (!p.is_null()).then_some(p as *mut T)
    }

    /// # Safety
    /// As [`Self::get`].
    #[inline(always)]
    pub unsafe fn delete(&self, task: *mut task_struct) {
        unsafe { bpf_task_storage_delete(self.as_ptr(), task) };
    }
}

/// Read by the enforcement hooks (enforce.rs) for the current task.
#[btf_map]
pub(crate) static TASK_RECORDS: TaskStorage<ProcRecord> = TaskStorage::new();

/// Written by the agent after hashing an executable.
#[map]
static MEASUREMENTS: HashMap<FileKey, Measurement> = HashMap::with_max_entries(65536, 0);

#[map]
static EXEC_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map]
static TRACE_FILTER: Array<TraceFilter> = Array::with_max_entries(1, 0);

/// The agent's question to [`check_peer_creds`], and its answer.
#[map]
static PEER_QUERY: Array<PeerQuery> = Array::with_max_entries(1, 0);

/// The one accepted socket [`check_peer_creds`] looks at (the agent puts it in, runs the
/// iterator, takes it out).
#[map]
static PEER_SOCK: SockMap = SockMap::with_max_entries(1, 0);

#[inline(always)]
fn offsets() -> KernelOffsets {
    // SAFETY: a `volatile const` global: the volatile read keeps the compiler from folding the
    // build-time zeros into the code, so the loader's values are used.
    unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) }
}

/// Reads a `T` at `base + off` through bpf_probe_read_kernel (fails cleanly on bad memory).
#[inline(always)]
fn read<T>(base: *const u8, off: u32) -> Option<T> {
    if base.is_null() {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel validates the address.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T).ok() }
}

const CTIME_NSEC_MASK: u32 = 0x7fff_ffff;

/// `file->f_inode`: device, inode and ctime.
#[inline(always)]
fn file_key(file: *const u8, off: &KernelOffsets) -> Option<FileKey> {
    let inode: *const u8 = read(file, off.file_inode)?;
    let sb: *const u8 = read(inode, off.inode_sb)?;
    Some(FileKey {
        ino: read(inode, off.inode_ino)?,
        ctime_sec: read(inode, off.inode_ctime_sec)?,
        // Since 6.13 the top bit of i_ctime_nsec flags "ctime queried" (multigrain
        // timestamps); nanoseconds never reach it.
        ctime_nsec: read::<u32>(inode, off.inode_ctime_nsec)? & CTIME_NSEC_MASK,
        dev: read(sb, off.sb_dev)?,
    })
}

/// `task->cgroups->dfl_cgrp->kn->id`: the task's cgroup v2 id.
#[inline(always)]
fn task_cgroup_id(task: *const u8, off: &KernelOffsets) -> Option<u64> {
    let css_set: *const u8 = read(task, off.task_cgroups)?;
    let cgroup: *const u8 = read(css_set, off.css_set_dfl_cgrp)?;
    let kn: *const u8 = read(cgroup, off.cgroup_kn)?;
    read(kn, off.kernfs_node_id)
}

/// Every field that can be read from a task; `exe` is left to the caller.
#[inline(always)]
fn record_from_task(task: *const u8, off: &KernelOffsets) -> Option<ProcRecord> {
    let cred: *const u8 = read(task, off.task_cred)?;
    let parent: *const u8 = read(task, off.task_real_parent)?;
    Some(ProcRecord {
        exe: FileKey::default(),
        start_boottime_ns: read(task, off.task_start_boottime)?,
        exec_ktime_ns: 0,
        cgroup_id: task_cgroup_id(task, off)?,
        tgid: read(task, off.task_tgid)?,
        ppid: read(parent, off.task_tgid)?,
        uid: read(cred, off.cred_uid)?,
        euid: read(cred, off.cred_euid)?,
        gid: read(cred, off.cred_gid)?,
        egid: read(cred, off.cred_egid)?,
        flags: 0,
        _pad: 0,
        comm: read(task, off.task_comm)?,
    })
}

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`
#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    if try_exec(&ctx).is_err() {
        warn!(&ctx, "exec: no record written (kernel read or storage failed)");
    }
    0
}

fn try_exec(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let off = offsets();
    if off.valid == 0 {
        return Err(());
    }
    let task: *mut task_struct = ctx.arg(0);
    let bprm: *const u8 = ctx.arg(2);
    let mut record = record_from_task(task as *const u8, &off).ok_or(())?;
    let file: *const u8 = read(bprm, off.bprm_file).ok_or(())?;
    // The file the kernel is executing, not whatever mm->exe_file may later be set to.
    record.exe = file_key(file, &off).ok_or(())?;
    record.flags = record_flags::EXE_VALID;
    // SAFETY: plain helper calls.
    record.exec_ktime_ns = unsafe { bpf_ktime_get_ns() };
    record.comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    // SAFETY: `task` is the tracepoint's trusted task argument.
    let slot = unsafe { TASK_RECORDS.get_or_insert(task, &mut record) }.ok_or(())?;
    // An exec replaces the record of a process that had one (exec after exec, or after fork).
    // SAFETY: slot points into this task's storage, valid for the program's run.
    unsafe { *slot = record };
    // Sockets made before this exec stop carrying the process's traffic.
    crate::enforce::note_exec(record.tgid, record.exec_ktime_ns);

    if in_trace_scope() {
        if let Some(mut entry) = EXEC_EVENTS.reserve::<ExecEvent>(0) {
            entry.write(ExecEvent { record, pid: bpf_get_current_pid_tgid() as u32, _pad: 0 });
            entry.submit(0);
        }
        // A full ring: nobody is reading (e.g. the agent died and its pinned links stay).
        // Records are kept regardless; the reader rescans when it returns.
    }
    Ok(())
}

fn in_trace_scope() -> bool {
    let Some(f) = TRACE_FILTER.get(0) else {
        return false;
    };
    if f.enabled == 0 {
        return false;
    }
    if f.enabled == tether_common::TRACE_PROTECTED_ROOTS {
        return crate::enforce::current_root() != 0;
    }
    if f.ancestor_id == 0 {
        return true;
    }
    // SAFETY: plain helper call; returns 0 when the level is deeper than the cgroup.
    let at_level = unsafe { bpf_get_current_ancestor_cgroup_id(f.level as i32) };
    at_level == f.ancestor_id
}

/// `sched_process_fork(struct task_struct *parent, struct task_struct *child)`: fires for
/// processes and threads before the child first runs, so no child is ever without its
/// parent's record.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    let off = offsets();
    let parent: *mut task_struct = ctx.arg(0);
    let child: *mut task_struct = ctx.arg(1);
    // SAFETY: trusted tracepoint arguments.
    let Some(parent_record) = (unsafe { TASK_RECORDS.get(parent) }) else {
        return 0; // no record to inherit: the child stays unidentified (fail closed)
    };
    // SAFETY: the pointer is valid for this run; copied out at once.
    let mut record = unsafe { *parent_record };
    let child_ptr = child as *const u8;
    let (Some(tgid), Some(start), Some(real_parent)) = (
        read::<u32>(child_ptr, off.task_tgid),
        read::<u64>(child_ptr, off.task_start_boottime),
        read::<*const u8>(child_ptr, off.task_real_parent),
    ) else {
        warn!(&ctx, "fork: child fields unreadable; child left without a record");
        return 0;
    };
    record.tgid = tgid;
    record.start_boottime_ns = start;
    if let Some(ppid) = read::<u32>(real_parent, off.task_tgid) {
        record.ppid = ppid;
    }
    // clone3(CLONE_INTO_CGROUP) starts the child in another cgroup.
    if let Some(cg) = task_cgroup_id(child_ptr, &off) {
        record.cgroup_id = cg;
    }
    record.flags |= record_flags::FORKED;
    // SAFETY: trusted tracepoint argument.
    if let Some(slot) = unsafe { TASK_RECORDS.get_or_insert(child, &mut record) } {
        // SAFETY: valid for this run.
        unsafe { *slot = record };
        // A new process runs its parent's image: if its PID still names a dead process's
        // entry, that process's sockets become stale (for a thread this rewrites the same
        // value).
        crate::enforce::note_exec(tgid, record.exec_ktime_ns);
    }
    0
}

/// `sched_process_exit(struct task_struct *p, ...)`: an exited process has no identity, even
/// as a zombie.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    let task: *mut task_struct = ctx.arg(0);
    // SAFETY: trusted tracepoint argument.
    unsafe { TASK_RECORDS.delete(task) };
    let off = offsets();
    let task_ptr = task as *const u8;
    if off.valid == 0 {
        return 0;
    }
    if let (Some(pid), Some(tgid)) = (read::<u32>(task_ptr, off.task_pid), read::<u32>(task_ptr, off.task_tgid)) {
        if pid == tgid {
            crate::enforce::note_exit(tgid);
        }
    }
    0
}

/// `cgroup_attach_task(struct cgroup *dst, const char *path, struct task_struct *task, bool)`
#[btf_tracepoint(function = "cgroup_attach_task")]
pub fn cgroup_attach_task(ctx: BtfTracePointContext) -> i32 {
    let off = offsets();
    let dst: *const u8 = ctx.arg(0);
    let task: *mut task_struct = ctx.arg(2);
    // SAFETY: trusted tracepoint argument.
    if let Some(slot) = unsafe { TASK_RECORDS.get(task) } {
        let id = read::<*const u8>(dst, off.cgroup_kn).and_then(|kn| read::<u64>(kn, off.kernfs_node_id));
        // SAFETY: valid for this run.
        unsafe {
            match id {
                Some(id) => (*slot).cgroup_id = id,
                // Unknown destination: drop the record rather than keep a stale cgroup.
                None => TASK_RECORDS.delete(task),
            }
        }
    }
    0
}

/// `iter/task`: run once by the agent after the tracepoints are attached. Every user task
/// without a record gets one from its task (exe from `mm->exe_file`), marked SEEDED.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
pub extern "C" fn seed_tasks(ctx: *mut c_void) -> i32 {
    // struct bpf_iter__task { struct bpf_iter_meta *meta; struct task_struct *task; }
    // SAFETY: the iterator context has this layout; the verifier checks the access.
    let task: *mut task_struct = unsafe { *(ctx as *const *mut task_struct).add(1) };
    if task.is_null() {
        return 0;
    }
    let off = offsets();
    if off.valid == 0 {
        return 0;
    }
    // SAFETY: trusted iterator argument, null-checked.
    if unsafe { TASK_RECORDS.get(task) }.is_some() {
        return 0;
    }
    let task_ptr = task as *const u8;
    // Kernel threads have no mm and no identity.
    let Some(mm) = read::<*const u8>(task_ptr, off.task_mm).filter(|mm| !mm.is_null()) else {
        return 0;
    };
    let Some(mut record) = record_from_task(task_ptr, &off) else {
        return 0;
    };
    record.flags = record_flags::SEEDED;
    if let Some(exe) = read::<*const u8>(mm, off.mm_exe_file).and_then(|f| file_key(f, &off)) {
        record.exe = exe;
        record.flags |= record_flags::EXE_VALID;
    }
    // SAFETY: trusted iterator argument.
    unsafe { TASK_RECORDS.get_or_insert(task, &mut record) };
    0
}

/// `PIDTYPE_TGID` in `enum pid_type`: `pid.tasks[PIDTYPE_TGID]` lists the thread group
/// leader, linked through its `pid_links[PIDTYPE_TGID]` (an `hlist_node`, 16 bytes).
const PIDTYPE_TGID: u32 = 1;
/// Threads compared before the answer is UNKNOWN (fail closed).
const MAX_THREADS: u32 = 512;

/// `iter/sockmap` over PEER_SOCK, run by the agent for one of its accepted Workload API
/// sockets (put alone in the map; its cookie in PEER_QUERY): does a live thread of the
/// process that connected still hold the credentials object it connected with? The socket
/// keeps a reference to that object (`sk_peer_cred`, taken at connect), so its address is
/// not reused while the socket lives; an exec always installs a new one (and kills every
/// other thread), so after an exec no thread holds it. This is what tells "exec'd after
/// connect()" from "exec'd before" when the agent's accept comes after both.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/sockmap")]
pub extern "C" fn check_peer_creds(ctx: *mut c_void) -> i32 {
    // struct bpf_iter__sockmap { struct bpf_iter_meta *meta; struct bpf_map *map; void *key;
    // struct sock *sk; }
    // SAFETY: the iterator context has this layout; the verifier checks the access.
    let sk: *const u8 = unsafe { *(ctx as *const *const u8).add(3) };
    if sk.is_null() {
        return 0;
    }
    let off = offsets();
    let Some(query) = PEER_QUERY.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: the map's single slot, valid for this run.
    let want = unsafe { (*query).cookie };
    if want == 0 || off.peer_valid == 0 {
        return 0;
    }
    // `struct sock` starts with `sock_common`: the socket must be the one asked about.
    if read::<u64>(sk, off.sock_cookie) != Some(want) {
        return 0;
    }
    let verdict = peer_verdict(sk, &off);
    // SAFETY: as above.
    unsafe { (*query).verdict = verdict };
    0
}

/// The task's credentials are `cred`: its own (`real_cred`) or the ones it acts with now
/// (`cred`, what connect() recorded; the two differ only while the kernel acts for it under
/// other credentials).
#[inline(always)]
fn holds(task: *const u8, cred: *const u8, off: &KernelOffsets) -> bool {
    read::<*const u8>(task, off.task_real_cred) == Some(cred) || read::<*const u8>(task, off.task_cred) == Some(cred)
}

#[inline(always)]
fn peer_verdict(sk: *const u8, off: &KernelOffsets) -> u32 {
    let (Some(cred), Some(pid)) = (read::<*const u8>(sk, off.sock_peer_cred), read::<*const u8>(sk, off.sock_peer_pid))
    else {
        return peer_creds::UNKNOWN;
    };
    if cred.is_null() || pid.is_null() {
        return peer_creds::UNKNOWN;
    }
    let Some(first) = read::<*const u8>(pid, off.pid_tasks + 8 * PIDTYPE_TGID) else {
        return peer_creds::UNKNOWN;
    };
    if first.is_null() {
        return peer_creds::EXITED;
    }
    let leader = first.wrapping_sub((off.task_pid_links + 16 * PIDTYPE_TGID) as usize);
    if holds(leader, cred, off) {
        return peer_creds::HELD;
    }
    if off.threads_valid == 0 {
        return peer_creds::CHANGED;
    }
    // Threads may hold credentials objects of their own (a setuid applied thread by
    // thread): any live one holding the object the peer connected with will do.
    let Some(signal) = read::<*const u8>(leader, off.task_signal) else {
        return peer_creds::UNKNOWN;
    };
    let head = signal.wrapping_add(off.signal_thread_head as usize);
    let Some(mut node) = read::<*const u8>(head, 0) else {
        return peer_creds::UNKNOWN;
    };
    for _ in 0..MAX_THREADS {
        if node == head || node.is_null() {
            return peer_creds::CHANGED;
        }
        let thread = node.wrapping_sub(off.task_thread_node as usize);
        if holds(thread, cred, off) {
            return peer_creds::HELD;
        }
        match read::<*const u8>(node, 0) {
            Some(next) => node = next,
            None => return peer_creds::UNKNOWN,
        }
    }
    peer_creds::UNKNOWN
}

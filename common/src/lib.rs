//! Types shared by the kernel programs (`agent-ebpf`) and the agent (`agent::ebpf`).
//!
//! Everything here is `#[repr(C)]` plain data with explicit padding, so both sides agree on
//! layout byte for byte. No logic lives here.
#![no_std]

/// Length of `task_struct::comm` (TASK_COMM_LEN).
pub const COMM_LEN: usize = 16;

/// Names of the maps in the eBPF object, as the agent looks them up.
pub mod maps {
    /// RingBuf of [`super::ExecEvent`].
    pub const EXEC_EVENTS: &str = "EXEC_EVENTS";
    /// Array with one [`super::TraceFilter`] at index 0.
    pub const TRACE_FILTER: &str = "TRACE_FILTER";
    /// Task storage of [`super::ProcRecord`], one per task.
    pub const TASK_RECORDS: &str = "TASK_RECORDS";
    /// HashMap [`super::FileKey`] -> [`super::Measurement`].
    pub const MEASUREMENTS: &str = "MEASUREMENTS";
    /// HashMap cgroup id (u64) -> u8: connect4 refuses callers in these cgroups.
    pub const DENY_CGROUPS: &str = "DENY_CGROUPS";
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
    /// `cgroup/connect4`.
    pub const CONNECT4: &str = "connect4";
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
    pub enabled: u32,
}

/// One exec as the kernel saw it, sent from `tp_btf/sched_process_exec` for processes in
/// the traced scope: the record it wrote, and the thread that exec'd.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecEvent {
    pub record: ProcRecord,
    pub pid: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C) with no implicit padding and every bit pattern valid.
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::TraceFilter {}
    unsafe impl aya::Pod for super::ExecEvent {}
    unsafe impl aya::Pod for super::FileKey {}
    unsafe impl aya::Pod for super::ProcRecord {}
    unsafe impl aya::Pod for super::Measurement {}
}

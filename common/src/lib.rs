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
    /// HashMap cgroup id (u64) -> u8: connect4 refuses callers in these cgroups.
    pub const DENY_CGROUPS: &str = "DENY_CGROUPS";
}

/// Names of the programs in the eBPF object.
pub mod programs {
    /// `tp_btf/sched_process_exec`.
    pub const EXEC: &str = "sched_process_exec";
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
/// kernel's BTF at load time. `valid == 0` means "not resolved": the programs then report
/// no executable identity rather than reading at a wrong offset.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `linux_binprm.file`
    pub bprm_file: u32,
    /// `file.f_inode`
    pub file_inode: u32,
    /// `inode.i_ino`
    pub inode_ino: u32,
    /// `inode.i_sb`
    pub inode_sb: u32,
    /// `super_block.s_dev`
    pub sb_dev: u32,
    /// 1 when every offset above was found.
    pub valid: u32,
}

/// Which processes the exec tracer reports: those whose cgroup has `ancestor_id` as its
/// ancestor at `level` (the cgroup itself included). `ancestor_id == 0` reports every exec.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceFilter {
    pub ancestor_id: u64,
    pub level: u32,
    pub _pad: u32,
}

/// One exec as the kernel saw it, sent from `tp_btf/sched_process_exec`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecEvent {
    /// `CLOCK_MONOTONIC` nanoseconds at exec (bpf_ktime_get_ns).
    pub ktime_ns: u64,
    pub cgroup_id: u64,
    /// Inode number of the executed file.
    pub exe_ino: u64,
    /// Device of the executed file in the kernel's encoding (`major << 20 | minor`).
    pub exe_dev: u32,
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// 1 when `exe_dev`/`exe_ino` were read; 0 when the kernel offsets were unknown or a
    /// read failed.
    pub exe_valid: u32,
    pub comm: [u8; COMM_LEN],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C) with no implicit padding and every bit pattern valid.
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::TraceFilter {}
    unsafe impl aya::Pod for super::ExecEvent {}
}

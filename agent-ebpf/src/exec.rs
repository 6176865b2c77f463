//! Exec observation: `tp_btf/sched_process_exec` reports who executed what, as the kernel
//! knows it at that moment.

use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, map},
    maps::{Array, RingBuf},
    programs::BtfTracePointContext,
};
use aya_log_ebpf::warn;
use tether_common::{ExecEvent, KernelOffsets, TraceFilter};

/// Filled in by the agent from the running kernel's BTF before load.
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets =
    KernelOffsets { bprm_file: 0, file_inode: 0, inode_ino: 0, inode_sb: 0, sb_dev: 0, valid: 0 };

#[map]
static EXEC_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map]
static TRACE_FILTER: Array<TraceFilter> = Array::with_max_entries(1, 0);

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`
#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    match try_exec(&ctx) {
        Ok(()) => 0,
        Err(()) => {
            warn!(&ctx, "exec event dropped: ring buffer full");
            0
        }
    }
}

fn try_exec(ctx: &BtfTracePointContext) -> Result<(), ()> {
    // SAFETY: plain helper call.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if let Some(filter) = TRACE_FILTER.get(0) {
        if filter.ancestor_id != 0 {
            // SAFETY: plain helper call; returns 0 when the level is deeper than the cgroup.
            let at_level = unsafe { bpf_get_current_ancestor_cgroup_id(filter.level as i32) };
            if at_level != filter.ancestor_id {
                return Ok(());
            }
        }
    }

    let Some(mut entry) = EXEC_EVENTS.reserve::<ExecEvent>(0) else {
        return Err(());
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let bprm: *const u8 = ctx.arg(2);
    let (exe_dev, exe_ino, exe_valid) = match exe_identity(bprm) {
        Some((dev, ino)) => (dev, ino, 1),
        None => (0, 0, 0),
    };
    entry.write(ExecEvent {
        // SAFETY: plain helper call.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id,
        exe_ino,
        exe_dev,
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        exe_valid,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    entry.submit(0);
    Ok(())
}

/// `bprm->file->f_inode->{i_sb->s_dev, i_ino}`, at offsets from the running kernel's BTF.
fn exe_identity(bprm: *const u8) -> Option<(u32, u64)> {
    // SAFETY: a `volatile const` global: the volatile read keeps the compiler from folding
    // the build-time zeros into the code, so the loader's values are the ones used.
    let off = unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) };
    if off.valid == 0 || bprm.is_null() {
        return None;
    }
    // SAFETY: every dereference goes through bpf_probe_read_kernel, which fails cleanly on
    // a bad address instead of faulting.
    unsafe {
        let file: *const u8 = bpf_probe_read_kernel(bprm.add(off.bprm_file as usize) as *const _).ok()?;
        let inode: *const u8 = bpf_probe_read_kernel(file.add(off.file_inode as usize) as *const _).ok()?;
        let ino: u64 = bpf_probe_read_kernel(inode.add(off.inode_ino as usize) as *const _).ok()?;
        let sb: *const u8 = bpf_probe_read_kernel(inode.add(off.inode_sb as usize) as *const _).ok()?;
        let dev: u32 = bpf_probe_read_kernel(sb.add(off.sb_dev as usize) as *const _).ok()?;
        Some((dev, ino))
    }
}

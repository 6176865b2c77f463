//! Everything that touches aya: loading the embedded object, filling in kernel offsets,
//! forwarding kernel-side logs, attaching programs, reading maps and ring buffers.
//! Nothing else in the agent imports aya.

mod btf;
mod enforce;
mod floor;
mod monitor;
mod probe;
mod tunnel;

use aya::{Ebpf, EbpfLoader};
use tether_common::{globals, KernelOffsets};
use thiserror::Error;

pub use btf::{Btf, BtfError};
pub use enforce::{DropEvents, Enforcer, PinnedLinkStatus, EXEC_TABLE};
pub use floor::Floor;
pub use monitor::{ExecEvents, Monitor, PeerCheck, TraceScope};
pub use probe::{probe_kernel, EnforcementPath, KernelSupport};
pub use tunnel::TunnelMaps;

/// The kernel programs, built from `agent-ebpf` by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tether.bpf.o"));

/// Failures of the kernel side.
#[derive(Debug, Error)]
pub enum EbpfError {
    #[error("loading the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("kernel BTF")]
    Btf(#[from] BtfError),
    #[error("aya's view of kernel BTF")]
    AyaBtf(#[from] aya::BtfError),
    #[error("program {name}: {op}")]
    Program {
        name: &'static str,
        op: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {op}")]
    Map {
        name: &'static str,
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{0} not found in the eBPF object")]
    Missing(&'static str),
    #[error("{op}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// An insert was refused for lack of room: what the agent meant to enforce is not
    /// (entirely) in the kernel, and someone must be told.
    #[error("map {name} is full")]
    MapFull { name: &'static str },
    #[error("invalid entry for map {name}: {what}")]
    InvalidEntry { name: &'static str, what: &'static str },
}

/// Reads the offsets the programs dereference from the running kernel's BTF. Members that
/// were renamed across kernel versions are tried under each name.
pub fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    // inode ctime: i_ctime_sec/i_ctime_nsec since 6.11, a timespec64 `__i_ctime` in 6.6-6.10,
    // `i_ctime` before that (tv_sec at +0, tv_nsec at +8).
    let (ctime_sec, ctime_nsec) =
        match (btf.member_offset("inode", "i_ctime_sec"), btf.member_offset("inode", "i_ctime_nsec")) {
            (Ok(sec), Ok(nsec)) => (sec, nsec),
            _ => {
                let ts = btf.member_offset("inode", "__i_ctime").or_else(|_| btf.member_offset("inode", "i_ctime"))?;
                (ts, ts + 8)
            }
        };
    // The peer-credentials check (Workload API) and its thread walk: found or reported
    // missing (the check then fails closed), never a reason not to load.
    let peer = [
        btf.member_offset("sock_common", "skc_cookie"),
        btf.member_offset("sock", "sk_peer_pid"),
        btf.member_offset("sock", "sk_peer_cred"),
        btf.member_offset("pid", "tasks"),
        btf.member_offset("task_struct", "pid_links"),
        btf.member_offset("task_struct", "real_cred"),
    ];
    let threads = [
        btf.member_offset("task_struct", "signal"),
        btf.member_offset("signal_struct", "thread_head"),
        btf.member_offset("task_struct", "thread_node"),
    ];
    let peer_valid = peer.iter().all(Result::is_ok);
    let threads_valid = threads.iter().all(Result::is_ok);
    let [sock_cookie, sock_peer_pid, sock_peer_cred, pid_tasks, task_pid_links, task_real_cred] =
        peer.map(|r| r.unwrap_or(0));
    let [task_signal, signal_thread_head, task_thread_node] = threads.map(|r| r.unwrap_or(0));
    Ok(KernelOffsets {
        sock_cookie,
        sock_peer_pid,
        sock_peer_cred,
        pid_tasks,
        task_pid_links,
        task_real_cred,
        peer_valid: u32::from(peer_valid),
        task_signal,
        signal_thread_head,
        task_thread_node,
        threads_valid: u32::from(threads_valid),
        task_pid: btf.member_offset("task_struct", "pid")?,
        task_tgid: btf.member_offset("task_struct", "tgid")?,
        task_real_parent: btf.member_offset("task_struct", "real_parent")?,
        task_start_boottime: btf.member_offset("task_struct", "start_boottime")?,
        task_cred: btf.member_offset("task_struct", "cred")?,
        task_mm: btf.member_offset("task_struct", "mm")?,
        task_cgroups: btf.member_offset("task_struct", "cgroups")?,
        task_comm: btf.member_offset("task_struct", "comm")?,
        cred_uid: btf.member_offset("cred", "uid")?,
        cred_gid: btf.member_offset("cred", "gid")?,
        cred_euid: btf.member_offset("cred", "euid")?,
        cred_egid: btf.member_offset("cred", "egid")?,
        mm_exe_file: btf.member_offset("mm_struct", "exe_file")?,
        bprm_file: btf.member_offset("linux_binprm", "file")?,
        file_inode: btf.member_offset("file", "f_inode")?,
        inode_ino: btf.member_offset("inode", "i_ino")?,
        inode_sb: btf.member_offset("inode", "i_sb")?,
        inode_ctime_sec: ctime_sec,
        inode_ctime_nsec: ctime_nsec,
        sb_dev: btf.member_offset("super_block", "s_dev")?,
        css_set_dfl_cgrp: btf.member_offset("css_set", "dfl_cgrp")?,
        cgroup_kn: btf.member_offset("cgroup", "kn")?,
        kernfs_node_id: btf.member_offset("kernfs_node", "id")?,
        valid: 1,
    })
}

/// The loaded object (programs not yet attached) and the thread forwarding its kernel-side
/// log records. Both live as long as whatever is built from it.
pub struct Loaded {
    pub(crate) ebpf: Ebpf,
    /// The offsets the programs were loaded with.
    pub(crate) offsets: KernelOffsets,
    _logs: Option<LogForwarder>,
}

/// Loads the object into the kernel (no program attached yet) with offsets for this kernel,
/// and starts forwarding the programs' aya-log messages to `tracing`.
pub fn load() -> Result<Loaded, EbpfError> {
    load_with_pins(None, &[])
}

/// As [`load`], but the maps named in `pinned` live in `pin_dir` (one file per map, by name):
/// reused if already pinned there, created and pinned otherwise. The object declares no map
/// pinned, so plain [`load`]s (trace-exec, ps) never share maps with anything.
pub(crate) fn load_with_pins(pin_dir: Option<&std::path::Path>, pinned: &[&'static str]) -> Result<Loaded, EbpfError> {
    let offsets = kernel_offsets(&Btf::from_kernel()?)?;
    tracing::debug!(?offsets, "kernel struct offsets from BTF");
    let mut loader = EbpfLoader::new();
    loader
        .override_global(globals::KERNEL_OFFSETS, &offsets, true)
        // aya 0.14 has no type for task storage; it is used through its fd (monitor.rs).
        .allow_unsupported_maps();
    if let Some(dir) = pin_dir {
        for name in pinned {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    let mut ebpf = loader.load(OBJECT).map_err(|e| EbpfError::Load(Box::new(e)))?;
    let logs = LogForwarder::start(&mut ebpf);
    Ok(Loaded { ebpf, offsets, _logs: logs })
}

/// aya-log records arrive through a ring buffer; aya-log hands them to the `log` crate,
/// which tracing-subscriber's log bridge turns into tracing events. A plain thread does the
/// reading so it works with or without an async runtime.
struct LogForwarder {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl LogForwarder {
    fn start(ebpf: &mut Ebpf) -> Option<Self> {
        use std::os::fd::AsRawFd;
        let mut logger = match aya_log::EbpfLogger::init(ebpf) {
            Ok(logger) => logger,
            Err(e) => {
                tracing::debug!("no kernel-side log buffer: {e}");
                return None;
            }
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let spawned = std::thread::Builder::new().name("bpf-logs".into()).spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let mut pfd = libc::pollfd { fd: logger.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd; the timeout lets the thread notice `stop`.
                if unsafe { libc::poll(&mut pfd, 1, 200) } > 0 {
                    logger.flush();
                }
            }
            logger.flush();
        });
        match spawned {
            Ok(_) => Some(LogForwarder { stop }),
            Err(e) => {
                tracing::warn!("kernel-side logs not forwarded: {e}");
                None
            }
        }
    }
}

impl Drop for LogForwarder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Turns on the kernel's per-program run time accounting until the returned fd is dropped
/// (`BPF_ENABLE_STATS`, the same as `kernel.bpf_stats_enabled` but scoped to its holder).
pub fn enable_run_stats() -> Result<std::os::fd::OwnedFd, EbpfError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| EbpfError::Io { op: "enabling BPF run-time stats", source: std::io::Error::other(e.to_string()) })
}

/// Run time and run count of every loaded program of `ebpf`, by name.
fn program_stats(ebpf: &Ebpf) -> Vec<(String, std::time::Duration, u64)> {
    let mut out: Vec<_> = ebpf
        .programs()
        .filter_map(|(name, prog)| prog.info().ok().map(|info| (name.to_owned(), info.run_time(), info.run_count())))
        .collect();
    out.sort();
    out
}

fn program_err(name: &'static str, op: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> EbpfError {
    move |source| EbpfError::Program { name, op, source }
}

fn map_err(name: &'static str, op: &'static str) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map { name, op, source }
}

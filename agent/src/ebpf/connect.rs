//! `cgroup/connect4`: refuses IPv4 connect() from processes in denied cgroups. The first
//! enforcement hook; the enforcement issue grows it into identity policy.

use std::fs::File;

use aya::{
    maps::{HashMap, MapData},
    programs::{links::CgroupAttachMode, CgroupSockAddr},
};
use tether_common::{maps, programs};

use super::{map_err, program_err, EbpfError, Loaded};
use crate::cgroup::Cgroup;

/// connect4 attached to one cgroup. Dropping it detaches the program.
pub struct ConnectHook {
    deny: HashMap<MapData, u64, u8>,
    loaded: Loaded,
}

impl ConnectHook {
    /// Attaches connect4 to `cgroup` — a cgroup the caller owns; never the root cgroup.
    pub fn attach(mut loaded: Loaded, cgroup: &Cgroup) -> Result<Self, EbpfError> {
        let ebpf = &mut loaded.ebpf;
        if cgroup.level == 0 {
            return Err(EbpfError::Io {
                op: "refusing to attach to the root cgroup",
                source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            });
        }
        let dir = File::open(&cgroup.path).map_err(|source| EbpfError::Io { op: "opening the cgroup", source })?;
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(programs::CONNECT4)
            .ok_or(EbpfError::Missing(programs::CONNECT4))?
            .try_into()
            .map_err(program_err(programs::CONNECT4, "type"))?;
        prog.load().map_err(program_err(programs::CONNECT4, "load"))?;
        prog.attach(&dir, CgroupAttachMode::Single).map_err(program_err(programs::CONNECT4, "attach"))?;
        let deny = HashMap::try_from(ebpf.take_map(maps::DENY_CGROUPS).ok_or(EbpfError::Missing(maps::DENY_CGROUPS))?)
            .map_err(map_err(maps::DENY_CGROUPS, "open"))?;
        Ok(ConnectHook { deny, loaded })
    }

    /// connect() from processes in `cgroup` (exactly that cgroup) now fails with EPERM.
    pub fn deny(&mut self, cgroup: &Cgroup) -> Result<(), EbpfError> {
        self.deny.insert(cgroup.id, 1, 0).map_err(map_err(maps::DENY_CGROUPS, "insert"))
    }

    /// Total run time and run count of the program, meaningful while
    /// [`enable_run_stats`] is held.
    pub fn run_stats(&self) -> Result<(std::time::Duration, u64), EbpfError> {
        let prog: &CgroupSockAddr = self
            .loaded
            .ebpf
            .program(programs::CONNECT4)
            .ok_or(EbpfError::Missing(programs::CONNECT4))?
            .try_into()
            .map_err(program_err(programs::CONNECT4, "type"))?;
        let info = prog.info().map_err(program_err(programs::CONNECT4, "info"))?;
        Ok((info.run_time(), info.run_count()))
    }
}

/// Turns on the kernel's per-program run time accounting until the returned fd is dropped
/// (`BPF_ENABLE_STATS`, the same as `kernel.bpf_stats_enabled` but scoped to its holder).
pub fn enable_run_stats() -> Result<std::os::fd::OwnedFd, EbpfError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| EbpfError::Io { op: "enabling BPF run-time stats", source: std::io::Error::other(e.to_string()) })
}

//! What this kernel lets us load, probed at start-up so the agent can say which path it uses.

use std::fmt;

use aya::{
    maps::MapType,
    programs::{LsmAttachType, ProgramType},
    sys::{is_map_supported, is_program_supported},
};
use serde::Serialize;
use tether_common::programs;

/// Which mechanism enforcement and identity use on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnforcementPath {
    /// BPF LSM hooks (bprm_check, socket_*) on top of the cgroup hooks.
    BpfLsm,
    /// tp_btf tracepoints for identity, cgroup sock_addr/sock_ops/skb hooks for enforcement.
    CgroupHooks,
}

impl fmt::Display for EnforcementPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EnforcementPath::BpfLsm => "bpf-lsm + cgroup hooks",
            EnforcementPath::CgroupHooks => "tp_btf + cgroup hooks (no BPF LSM)",
        })
    }
}

/// Result of probing the running kernel.
#[derive(Clone, Debug, Serialize)]
pub struct KernelSupport {
    pub kernel: String,
    /// Tether's own `tp_btf/sched_process_exec` program passed the verifier.
    pub tp_btf: bool,
    /// Trampoline-based tracing (fentry) loads; BPF LSM needs the same trampolines.
    pub fentry: bool,
    pub cgroup_sock_addr: bool,
    pub cgroup_skb: bool,
    pub sock_ops: bool,
    pub ringbuf: bool,
    pub task_storage: bool,
    pub sk_storage: bool,
    /// The kernel knows the LSM program type.
    pub lsm_program_type: bool,
    /// `bpf` is in /sys/kernel/security/lsm; None when securityfs is not mounted.
    pub lsm_active: Option<bool>,
    /// BPF LSM usable: program type known, trampolines work and the `bpf` LSM is active.
    pub bpf_lsm: bool,
    pub path: EnforcementPath,
}

fn yes(r: Result<bool, impl fmt::Display>, what: &str) -> bool {
    r.unwrap_or_else(|e| {
        tracing::debug!("probing {what}: {e}");
        false
    })
}

/// Probes program and map types with minimal loads. Nothing is attached.
pub fn probe_kernel() -> KernelSupport {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default();
    let fentry = yes(is_program_supported(ProgramType::Tracing), "fentry");
    let lsm_program_type = yes(is_program_supported(ProgramType::Lsm(LsmAttachType::Mac)), "lsm");
    let lsm_active =
        std::fs::read_to_string("/sys/kernel/security/lsm").ok().map(|list| list.split(',').any(|l| l.trim() == "bpf"));
    let bpf_lsm = lsm_program_type && fentry && lsm_active == Some(true);
    KernelSupport {
        kernel,
        tp_btf: exec_program_loads(),
        fentry,
        cgroup_sock_addr: yes(is_program_supported(ProgramType::CgroupSockAddr), "cgroup_sock_addr"),
        cgroup_skb: yes(is_program_supported(ProgramType::CgroupSkb), "cgroup_skb"),
        sock_ops: yes(is_program_supported(ProgramType::SockOps), "sock_ops"),
        ringbuf: yes(is_map_supported(MapType::RingBuf), "ringbuf"),
        task_storage: yes(is_map_supported(MapType::TaskStorage), "task_storage"),
        sk_storage: yes(is_map_supported(MapType::SkStorage), "sk_storage"),
        lsm_program_type,
        lsm_active,
        bpf_lsm,
        path: if bpf_lsm { EnforcementPath::BpfLsm } else { EnforcementPath::CgroupHooks },
    }
}

/// The definitive test for tp_btf: our exec program through the verifier, not attached.
fn exec_program_loads() -> bool {
    let result = (|| -> Result<(), super::EbpfError> {
        let mut loaded = super::load()?;
        let ebpf = &mut loaded.ebpf;
        let btf = aya::Btf::from_sys_fs()?;
        let prog: &mut aya::programs::BtfTracePoint = ebpf
            .program_mut(programs::EXEC)
            .ok_or(super::EbpfError::Missing(programs::EXEC))?
            .try_into()
            .map_err(super::program_err(programs::EXEC, "type"))?;
        prog.load("sched_process_exec", &btf).map_err(super::program_err(programs::EXEC, "load"))
    })();
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("tp_btf exec program does not load: {e:#}");
            false
        }
    }
}

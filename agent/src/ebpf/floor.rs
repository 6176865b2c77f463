//! Floors (`agent-ebpf/src/floor.rs`, a separate object the agent never loads): the
//! enforcement hook set with programs that only allow, and a connect4 that only refuses.
//! They tell a benchmark what the hooks cost by themselves and what the cheapest in-kernel
//! refusal costs, so Tether's own logic is measured against them in the same run. A logging
//! variant of the refusal lets a test watch kernel-side logs arrive in tracing.
//!
//! Attached only to cgroups the caller owns, never the root cgroup; not pinned: dropping a
//! [`Floor`] detaches everything it attached.

use std::fs::File;

use aya::{Ebpf, EbpfLoader};

use super::{
    enforce::{attach_hook, load_hook, Hook},
    EbpfError,
};
use crate::cgroup::Cgroup;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tether-floor.bpf.o"));

/// The enforcement hooks, in the same order, each with an allow-only program.
const ALLOW_ALL: [(&str, Hook); 6] = [
    ("floor_sock_create", Hook::Sock),
    ("floor_post_bind4", Hook::Sock),
    ("floor_egress", Hook::SkbEgress),
    ("floor_ingress", Hook::SkbIngress),
    ("floor_sendmsg4", Hook::SockAddr),
    ("floor_connect4", Hook::SockAddr),
];

const DENY_CONNECT: [(&str, Hook); 1] = [("deny_connect4", Hook::SockAddr)];
const DENY_CONNECT_LOGGED: [(&str, Hook); 1] = [("deny_connect4_logged", Hook::SockAddr)];

/// Floor programs attached to some cgroups; detached when dropped.
pub struct Floor {
    // Dropped in field order: the links go, then the programs, then the log thread.
    _links: Vec<aya::programs::links::FdLink>,
    ebpf: Ebpf,
    _logs: Option<super::LogForwarder>,
}

impl Floor {
    /// Every enforcement hook, with programs that return "allow" and do nothing else.
    pub fn allow_all(cgroups: &[Cgroup]) -> Result<Self, EbpfError> {
        Self::attach(&ALLOW_ALL, cgroups)
    }

    /// connect4 only, refusing every connect() with EPERM.
    pub fn deny_connect(cgroups: &[Cgroup]) -> Result<Self, EbpfError> {
        Self::attach(&DENY_CONNECT, cgroups)
    }

    /// As [`Floor::deny_connect`], each refusal also logged through aya-log (a warning with
    /// the cgroup id), forwarded to `tracing` like the agent's own kernel-side logs.
    pub fn deny_connect_logged(cgroups: &[Cgroup]) -> Result<Self, EbpfError> {
        Self::attach(&DENY_CONNECT_LOGGED, cgroups)
    }

    fn attach(hooks: &[(&'static str, Hook)], cgroups: &[Cgroup]) -> Result<Self, EbpfError> {
        if cgroups.iter().any(|cg| cg.level == 0) {
            return Err(EbpfError::Io {
                op: "refusing to attach to the root cgroup",
                source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            });
        }
        let mut ebpf = EbpfLoader::new().load(OBJECT).map_err(|e| EbpfError::Load(Box::new(e)))?;
        let logs = super::LogForwarder::start(&mut ebpf);
        let mut links = Vec::new();
        for (name, hook) in hooks {
            load_hook(&mut ebpf, name, *hook)?;
        }
        for cg in cgroups {
            let dir = File::open(&cg.path).map_err(|source| EbpfError::Io { op: "opening the cgroup", source })?;
            for (name, hook) in hooks {
                links.push(attach_hook(&mut ebpf, name, *hook, &dir)?);
            }
        }
        Ok(Floor { _links: links, ebpf, _logs: logs })
    }

    /// Run time and run count of each program (meaningful while
    /// [`super::enable_run_stats`] is held).
    pub fn program_stats(&self) -> Vec<(String, std::time::Duration, u64)> {
        super::program_stats(&self.ebpf)
    }
}

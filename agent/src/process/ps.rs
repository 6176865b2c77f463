//! `tether-agent ps`: every process in a cgroup subtree, with its kernel-observed identity.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{
    caller::{IdentityError, ProcessIdentity, Resolver},
    pidfd::PidFd,
};

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum PsRow {
    Identified(Box<ProcessIdentity>),
    Failed { pid: u32, error: String },
}

fn cgroups_below(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut subdirs: Vec<PathBuf> =
            entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect();
        subdirs.sort();
        for sub in subdirs {
            cgroups_below(&sub, out);
        }
    }
}

/// Identifies every process in `cgroup` and its descendants. A PID read from cgroup.procs is
/// only a starting point: the pidfd opened for it is what is identified, so a PID reused in
/// between yields that new process's own record, never a mix.
pub fn ps(resolver: &Resolver, cgroup: &Path) -> Vec<PsRow> {
    let mut dirs = Vec::new();
    cgroups_below(cgroup, &mut dirs);
    let mut rows = Vec::new();
    for dir in dirs {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            let result =
                PidFd::open(pid).map_err(|e| e.to_string()).and_then(|pidfd| match resolver.identify(&pidfd) {
                    Ok(identity) => Ok(identity),
                    Err(IdentityError::Exited) => Err("exited".into()),
                    Err(e) => Err(e.to_string()),
                });
            rows.push(match result {
                Ok(identity) => PsRow::Identified(Box::new(identity)),
                Err(error) => PsRow::Failed { pid, error },
            });
        }
    }
    rows
}

//! Identifying a process — in particular the caller on an accepted Unix socket — from the
//! kernel's record of it, with no step that trusts a bare PID.
//!
//! The chain: `SO_PEERPIDFD` gives a pidfd for the process that connected (a handle that
//! cannot be recycled); the kernel's record is looked up *by that pidfd*; anything read
//! through /proc/<pid> (the executable to hash, the cgroup path) is cross-checked against
//! the record and counted only if the pidfd's process is still alive afterwards; finally the
//! record is read again and must be unchanged (an exec in between restarts the resolution).

use std::{
    ffi::CStr,
    os::fd::{AsFd, BorrowedFd},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::Serialize;
use thiserror::Error;

use super::{
    measure::{hex, Measurer, Outcome, Unmeasurable, Wait},
    pidfd::PidFd,
    selectors::{cgroup_selectors, provenance, Selector},
    FileId, Record,
};
use crate::{
    config::SelectorConfig,
    ebpf::{EbpfError, Monitor},
};

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("cannot get the peer's pidfd (SO_PEERPIDFD needs Linux 6.5; or the peer is gone)")]
    PeerPidfd(#[source] std::io::Error),
    #[error("the process has exited")]
    Exited,
    #[error("the kernel has no record of this process")]
    NoRecord,
    #[error("the process kept changing (exec) while being identified")]
    Unstable,
    #[error("kernel record lookup failed")]
    Kernel(#[from] EbpfError),
    #[error("its executable is still being hashed")]
    Measuring,
}

/// Everything the agent knows about a process, all of it anchored in the kernel's record.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessIdentity {
    pub pid: u32,
    pub record: Record,
    /// None when the kernel recorded no executable.
    pub measurement: Option<Outcome>,
    /// The executable's current path, only if it is still the recorded file.
    pub path: Option<PathBuf>,
    /// cgroup path relative to the cgroup2 root, only if it matches the recorded cgroup id.
    pub cgroup: Option<String>,
    pub selectors: Vec<Selector>,
}

/// What the Workload API needs: the selectors of whoever is on the other end of a socket.
pub trait CallerAttestor: Send + Sync {
    fn attest_caller(&self, socket: BorrowedFd<'_>) -> Result<ProcessIdentity, IdentityError>;
}

/// Resolves processes against a running [`Monitor`].
pub struct Resolver {
    monitor: Mutex<Monitor>,
    /// The Workload API's caller check, under its own lock (a check runs a BPF iterator:
    /// record lookups do not wait for it).
    peer_check: Mutex<Option<crate::ebpf::PeerCheck>>,
    measurer: Measurer,
    cgroup_root: PathBuf,
    selector_config: SelectorConfig,
    /// Identities derived in the last [`REUSE_FOR`], keyed by PID and the exact kernel
    /// record they were derived from: a later call that finds the very same record (same
    /// exec, cgroup, ids) reuses the derived selectors instead of re-reading /proc and NSS.
    recent: Mutex<std::collections::HashMap<u32, (std::time::Instant, ProcessIdentity)>>,
}

const ATTEMPTS: usize = 3;
/// How long a derived identity is reused for an unchanged record. The record itself is
/// always looked up fresh and the executable's path re-checked; only user and group names
/// (NSS) and the cgroup path of an unchanged cgroup id may be this old.
const REUSE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

impl Resolver {
    pub fn new(monitor: Monitor, measurer: Measurer, cgroup_root: PathBuf) -> Self {
        Self::with_selectors(monitor, measurer, cgroup_root, SelectorConfig::default())
    }

    /// As [`Resolver::new`], with the runtimes' cgroup roots from the agent config.
    pub fn with_selectors(
        mut monitor: Monitor,
        measurer: Measurer,
        cgroup_root: PathBuf,
        selector_config: SelectorConfig,
    ) -> Self {
        let peer_check = Mutex::new(monitor.take_peer_check());
        Resolver {
            monitor: Mutex::new(monitor),
            peer_check,
            measurer,
            cgroup_root,
            selector_config,
            recent: Mutex::default(),
        }
    }

    pub fn measurer(&self) -> &Measurer {
        &self.measurer
    }

    /// The kernel's record of the process behind `pidfd` now (one map lookup).
    pub fn record(&self, pidfd: &PidFd) -> Result<Option<Record>, IdentityError> {
        self.lookup(pidfd)
    }

    fn lookup(&self, pidfd: &PidFd) -> Result<Option<Record>, IdentityError> {
        let monitor = self.monitor.lock().unwrap_or_else(|p| p.into_inner());
        Ok(monitor.lookup(pidfd.as_fd())?.as_ref().map(Record::from))
    }

    /// Whether the process at the other end of `socket` (a Unix socket accepted here) still
    /// holds the credentials it connected with (see [`crate::ebpf::PeerCheck`]).
    pub fn peer_creds(&self, socket: BorrowedFd<'_>) -> Result<u32, IdentityError> {
        let mut check = self.peer_check.lock().unwrap_or_else(|p| p.into_inner());
        let check = check.as_mut().ok_or(EbpfError::Missing("the Workload API caller check (see the start-up log)"))?;
        Ok(check.check(socket)?)
    }

    /// What kernel hooks currently see for `exe` in the measurement map.
    pub fn kernel_measurement(&self, exe: &FileId) -> Option<tether_common::Measurement> {
        self.monitor.lock().unwrap_or_else(|p| p.into_inner()).measurement(&exe.key())
    }

    /// Measures a recorded executable (once per file identity) and publishes the result to
    /// the kernel map.
    pub fn measure(&self, pidfd: &PidFd, pid: u32, exe: &FileId, wait: Wait) -> Outcome {
        let outcome = self.measurer.measure_process(pidfd, pid, exe, wait);
        // Only final answers reach the kernel: not "exited", nor "still hashing".
        if !matches!(
            outcome,
            Outcome::Unmeasurable(Unmeasurable::ProcessGone | Unmeasurable::Pending | Unmeasurable::Overdue { .. })
        ) {
            let mut monitor = self.monitor.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = monitor.set_measurement(exe.key(), outcome.to_kernel()) {
                tracing::warn!("measurement not published to the kernel: {e}");
            }
        }
        outcome
    }

    /// Measures the executable of a process the kernel just reported exec'ing, so the cache
    /// is warm before the workload first asks for an identity. The PID from the event is
    /// only trusted once a pidfd for it shows the very record the event carried.
    pub fn on_exec(&self, record: &tether_common::ProcRecord, pid: u32) -> Option<Outcome> {
        let pidfd = PidFd::open(pid).ok()?;
        let current = self.monitor.lock().unwrap_or_else(|p| p.into_inner()).lookup(pidfd.as_fd()).ok()??;
        if current != *record {
            return None; // exited and reused, or exec'd again: a later event covers it
        }
        let exe = Record::from(record).exe?;
        Some(self.measure(&pidfd, pid, &exe, Wait::No))
    }

    /// The identity of the process behind `pidfd` if one derived from its current record is
    /// still fresh: a few syscalls, no hashing, so callers may run it on an async thread.
    pub fn identify_cached(&self, pidfd: &PidFd) -> Option<ProcessIdentity> {
        let pid = pidfd.pid()?;
        let record = self.lookup(pidfd).ok()??;
        self.reuse(pidfd, pid, &record)
    }

    /// A recently derived identity for exactly this record, if its executable path still
    /// holds (re-checked every time, two syscalls: a rename must take effect at once).
    fn reuse(&self, pidfd: &PidFd, pid: u32, record: &Record) -> Option<ProcessIdentity> {
        let id = self
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pid)
            .filter(|(at, id)| at.elapsed() < REUSE_FOR && id.record == *record)
            .map(|(_, id)| id.clone())?;
        // A path was only derived on a filesystem the agent may touch (same record, same file).
        let path = match &id.path {
            Some(_) => record.exe.and_then(|exe| exe_path(pid, &exe)),
            None => None,
        };
        (path == id.path && pidfd.is_alive()).then_some(id)
    }

    /// The identity of the process behind `pidfd`, as of now, waiting for its binary's
    /// measurement up to the measurement deadline.
    pub fn identify(&self, pidfd: &PidFd) -> Result<ProcessIdentity, IdentityError> {
        self.identify_with(pidfd, Wait::Deadline)
    }

    /// As [`Resolver::identify`], waiting for a measurement as `wait` says. With
    /// [`Wait::No`], a binary still being hashed (deadline not yet reached) gives
    /// [`IdentityError::Measuring`]: ask again when [`Measurer::finished`] changes.
    pub fn identify_with(&self, pidfd: &PidFd, wait: Wait) -> Result<ProcessIdentity, IdentityError> {
        for _ in 0..ATTEMPTS {
            let pid = pidfd.pid().ok_or(IdentityError::Exited)?;
            let Some(record) = self.lookup(pidfd)? else {
                return Err(if pidfd.is_alive() { IdentityError::NoRecord } else { IdentityError::Exited });
            };
            if let Some(id) = self.reuse(pidfd, pid, &record) {
                return Ok(id);
            }
            let measurement = record.exe.map(|exe| self.measure(pidfd, pid, &exe, wait));
            if matches!(measurement, Some(Outcome::Unmeasurable(Unmeasurable::Pending))) {
                return Err(IdentityError::Measuring);
            }
            let path = record.exe.filter(|exe| on_kernel_fs(pid, exe)).and_then(|exe| exe_path(pid, &exe));
            let cgroup = cgroup_path(pid, record.cgroup_id, &self.cgroup_root);
            // Whatever /proc said belongs to this process only if it was alive throughout.
            if !pidfd.is_alive() {
                return Err(IdentityError::Exited);
            }
            // An exec (or cgroup move) in between makes all of the above stale: start over.
            if self.lookup(pidfd)?.as_ref() != Some(&record) {
                continue;
            }
            // Who made each directory of the cgroup path decides what its names vouch for.
            let cgroup_facts = cgroup.as_deref().map(|cg| (cg, provenance(&self.cgroup_root, cg)));
            let selectors = selectors(
                &record,
                measurement.as_ref(),
                path.as_deref(),
                cgroup_facts.map(|(cg, prov)| (cg, prov, &self.selector_config)),
            );
            let identity = ProcessIdentity { pid, record, measurement, path, cgroup, selectors };
            // An overdue measurement may be in by the next call: not reused.
            if !matches!(identity.measurement, Some(Outcome::Unmeasurable(Unmeasurable::Overdue { .. }))) {
                let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
                recent.retain(|_, (at, _)| at.elapsed() < REUSE_FOR);
                recent.insert(pid, (std::time::Instant::now(), identity.clone()));
            }
            return Ok(identity);
        }
        Err(IdentityError::Unstable)
    }
}

impl CallerAttestor for Resolver {
    fn attest_caller(&self, socket: BorrowedFd<'_>) -> Result<ProcessIdentity, IdentityError> {
        let pidfd = PidFd::from_peer(socket).map_err(IdentityError::PeerPidfd)?;
        self.identify(&pidfd)
    }
}

/// /proc/<pid>/exe's path, if that path still names the recorded file. The path is looked
/// up with `AT_STATX_DONT_SYNC` (cached attributes: a network or FUSE filesystem is not
/// asked); callers only come here for files on filesystems the agent reads
/// ([`on_kernel_fs`]).
fn exe_path(pid: u32, exe: &FileId) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let link = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let c = std::ffi::CString::new(link.as_os_str().as_bytes()).ok()?;
    // SAFETY: all-zero is a valid statx buffer to be filled in.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated and st is a valid buffer.
    let rc = unsafe {
        libc::statx(libc::AT_FDCWD, c.as_ptr(), libc::AT_STATX_DONT_SYNC, libc::STATX_INO | libc::STATX_CTIME, &mut st)
    };
    if rc != 0 {
        return None;
    }
    let now = FileId {
        dev_major: st.stx_dev_major,
        dev_minor: st.stx_dev_minor,
        ino: st.stx_ino,
        ctime_sec: st.stx_ctime.tv_sec,
        ctime_nsec: st.stx_ctime.tv_nsec,
    };
    (now == *exe).then_some(link)
}

/// The executable is on a filesystem the agent may touch (not FUSE, not a user namespace's
/// mount): see [`super::mounts`].
fn on_kernel_fs(pid: u32, exe: &FileId) -> bool {
    matches!(super::mounts::filesystem_of(exe.dev_major, exe.dev_minor, pid), super::mounts::Filesystem::Kernel { .. })
}

/// The process's cgroup v2 path, if its directory's id is the recorded one.
fn cgroup_path(pid: u32, cgroup_id: u64, root: &Path) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = root.join(rel.trim_start_matches('/'));
    (std::fs::metadata(dir).ok()?.ino() == cgroup_id).then(|| rel.to_owned())
}

fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: all-zero is a valid passwd to be filled in.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    // SAFETY: buffers are valid for the sizes given; result is checked before use.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
    // SAFETY: on success pw_name points into buf, NUL-terminated.
    (rc == 0 && !result.is_null()).then(|| unsafe { CStr::from_ptr(pwd.pw_name) }.to_string_lossy().into_owned())
}

fn group_name(gid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: all-zero is a valid group to be filled in.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    // SAFETY: as above.
    let rc = unsafe { libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
    // SAFETY: on success gr_name points into buf, NUL-terminated.
    (rc == 0 && !result.is_null()).then(|| unsafe { CStr::from_ptr(grp.gr_name) }.to_string_lossy().into_owned())
}

/// Selectors from the kernel record and what was verified against it. uid/gid are the
/// effective ids (what the process acts as), as in SPIRE's unix attestor.
pub fn selectors(
    record: &Record,
    measurement: Option<&Outcome>,
    path: Option<&Path>,
    cgroup: Option<(&str, super::selectors::Provenance, &SelectorConfig)>,
) -> Vec<Selector> {
    let mut out = vec![
        Selector::new("unix", format!("uid:{}", record.euid)),
        Selector::new("unix", format!("gid:{}", record.egid)),
    ];
    if let Some(name) = user_name(record.euid) {
        out.push(Selector::new("unix", format!("user:{name}")));
    }
    if let Some(name) = group_name(record.egid) {
        out.push(Selector::new("unix", format!("group:{name}")));
    }
    if let Some(path) = path {
        out.push(Selector::new("unix", format!("path:{}", path.display())));
    }
    if let Some(sha) = measurement.and_then(Outcome::sha256) {
        out.push(Selector::new("unix", format!("sha256:{}", hex(&sha))));
    }
    if let Some((cg, prov, cfg)) = cgroup {
        out.extend(cgroup_selectors(cg, &prov, cfg));
    }
    out.sort();
    out.dedup();
    out
}

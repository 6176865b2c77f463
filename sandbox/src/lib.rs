//! Kernel objects that a test, benchmark or demo creates for itself and removes when done —
//! also when it panics. Nothing here touches a cgroup or interface it did not create.
//!
//! Ordinary std + libc only (no aya), so `xtask` can use it before the eBPF toolchain exists.

use std::{
    fs::{self, File},
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub mod swtpm;

/// Prefix of every cgroup and namespace this crate creates, so leftovers are recognisable.
pub const PREFIX: &str = "tether-test";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("this needs root (it creates cgroups and network namespaces); run it as root")]
    NotRoot,
    #[error("no cgroup2 file system in /proc/mounts")]
    NoCgroup2,
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
}

/// Fails loudly unless running as root: privileged tests must never pass by skipping.
pub fn require_root() -> Result<(), SandboxError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        Ok(())
    } else {
        Err(SandboxError::NotRoot)
    }
}

/// Mount point of the cgroup2 hierarchy (e.g. `/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
pub fn cgroup2_root() -> Result<PathBuf, SandboxError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(|source| SandboxError::Io {
        op: "reading",
        path: "/proc/mounts".into(),
        source,
    })?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .ok_or(SandboxError::NoCgroup2)
}

fn unique_name(kind: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{PREFIX}-{kind}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A cgroup created under the cgroup2 root, removed on drop (its processes are killed first:
/// only processes placed there by the owner of the guard can be in it).
#[derive(Debug)]
pub struct CgroupGuard {
    path: PathBuf,
}

impl CgroupGuard {
    /// Creates `<cgroup2 root>/tether-test-<name>-<pid>-<n>`.
    pub fn new(name: &str) -> Result<Self, SandboxError> {
        require_root()?;
        let path = cgroup2_root()?.join(unique_name(name));
        fs::create_dir(&path).map_err(|source| SandboxError::Io {
            op: "creating cgroup",
            path: path.clone(),
            source,
        })?;
        Ok(CgroupGuard { path })
    }

    /// A child cgroup, removed with (before) its parent.
    pub fn child(&self, name: &str) -> Result<CgroupGuard, SandboxError> {
        let path = self.path.join(name);
        fs::create_dir(&path).map_err(|source| SandboxError::Io {
            op: "creating cgroup",
            path: path.clone(),
            source,
        })?;
        Ok(CgroupGuard { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Kernel cgroup id (inode number of the directory).
    pub fn id(&self) -> Result<u64, SandboxError> {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&self.path).map(|m| m.ino()).map_err(|source| SandboxError::Io {
            op: "stat",
            path: self.path.clone(),
            source,
        })
    }

    /// Makes `cmd` join this cgroup between fork and exec, so its exec already happens inside.
    pub fn place(&self, cmd: &mut Command) -> Result<(), SandboxError> {
        let procs = self.path.join("cgroup.procs");
        let file = File::options().write(true).open(&procs).map_err(|source| SandboxError::Io {
            op: "opening",
            path: procs,
            source,
        })?;
        // SAFETY: the closure only calls write(2) on an fd opened before fork, which is
        // async-signal-safe; writing "0" moves the calling process.
        unsafe {
            cmd.pre_exec(move || {
                let fd = file.as_raw_fd();
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// Runs `cmd` to completion inside this cgroup.
    pub fn run(&self, cmd: &mut Command) -> Result<Output, SandboxError> {
        self.place(cmd)?;
        cmd.output().map_err(|source| SandboxError::Io { op: "running a command in", path: self.path.clone(), source })
    }

    /// Every cgroup below `path`, parents before children.
    fn below(path: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(path) else { return };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(e.path());
                Self::below(&e.path(), out);
            }
        }
    }

    fn pids(path: &Path) -> Vec<i32> {
        fs::read_to_string(path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        // cgroup.kill (5.14+) ends everything in the subtree; fall back to the listed PIDs.
        if fs::write(self.path.join("cgroup.kill"), "1").is_err() {
            for pid in Self::pids(&self.path) {
                // SAFETY: kill has no memory-safety preconditions; these PIDs were placed in
                // a cgroup only this guard's owner uses.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        // Child cgroups made inside it (a delegated user's, in the attack tests) go first,
        // deepest first: a cgroup with children cannot be removed.
        let mut dirs = Vec::new();
        Self::below(&self.path, &mut dirs);
        for dir in dirs.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
        let gone = |r: std::io::Result<()>| r.is_ok() || r.is_err_and(|e| e.kind() == io::ErrorKind::NotFound);
        while !gone(fs::remove_dir(&self.path)) && Instant::now() < deadline {
            for dir in dirs.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.path.exists() {
            eprintln!("sandbox: could not remove cgroup {}", self.path.display());
        }
    }
}

/// A network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct NetnsGuard {
    name: String,
}

fn run_cmd(cmd: &mut Command) -> Result<String, SandboxError> {
    let out = cmd.output().map_err(|source| SandboxError::Io {
        op: "running",
        path: PathBuf::from(cmd.get_program()),
        source,
    })?;
    if !out.status.success() {
        return Err(SandboxError::Command {
            cmd: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl NetnsGuard {
    pub fn new(name: &str) -> Result<Self, SandboxError> {
        require_root()?;
        let name = unique_name(name);
        run_cmd(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetnsGuard { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace and returns its stdout.
    pub fn exec(&self, argv: &[&str]) -> Result<String, SandboxError> {
        run_cmd(Command::new("ip").args(["netns", "exec", &self.name]).args(argv))
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a thread that has joined this namespace: sockets it creates live there.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, SandboxError> {
        let path = PathBuf::from("/run/netns").join(&self.name);
        let ns = File::open(&path).map_err(|source| SandboxError::Io { op: "opening", path: path.clone(), source })?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid namespace fd affects only this (scoped) thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(SandboxError::Io { op: "setns into", path, source: io::Error::last_os_error() });
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Joins two namespaces with a veth pair, addressing each end (`10.x.y.z/24`-style CIDRs
    /// private to the pair; no host interface is involved).
    pub fn link(&self, self_addr: &str, peer: &NetnsGuard, peer_addr: &str) -> Result<(), SandboxError> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let a = format!("tt{}a{n}", std::process::id() % 100000);
        let b = format!("tt{}b{n}", std::process::id() % 100000);
        run_cmd(
            Command::new("ip").args([
                "link", "add", &a, "netns", &self.name, "type", "veth", "peer", "name", &b, "netns", &peer.name,
            ]),
        )?;
        for (ns, dev, addr) in [(self, &a, self_addr), (peer, &b, peer_addr)] {
            ns.exec(&["ip", "addr", "add", addr, "dev", dev])?;
            ns.exec(&["ip", "link", "set", dev, "up"])?;
        }
        Ok(())
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // Deleting the namespace removes its veth ends (and their peers) with it.
        if let Err(e) = run_cmd(Command::new("ip").args(["netns", "delete", &self.name])) {
            eprintln!("sandbox: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_recognisable() {
        let a = unique_name("x");
        let b = unique_name("x");
        assert_ne!(a, b);
        assert!(a.starts_with("tether-test-x-"));
    }
}

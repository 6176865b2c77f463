//! Privileged integration tests: real programs in the real kernel, run as root, against
//! cgroups and namespaces the tests create themselves (see the `sandbox` crate).
//! The tests are in `tests/`; this library holds what several of them share.

pub mod hosts;
pub mod plane;
pub mod tunnels;
pub mod vm;

use std::{path::PathBuf, process::Command};

/// The `tether-agent` binary built beside these tests (`cargo xtask test` builds it first).
pub fn agent_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/tether-agent
    let bin = exe.parent().and_then(|d| d.parent()).map(|d| d.join("tether-agent")).unwrap_or_default();
    assert!(bin.exists(), "{} not built: run `cargo build -p tether-agent` (cargo xtask test does)", bin.display());
    bin
}

/// A bash that connects to 127.0.0.1:`port` and exits 0 on success, or prints the error.
pub fn bash_connect(port: u16) -> Command {
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{port}")]);
    cmd
}

/// A TCP listener made with listen() and no bind(): the kernel picks its port, and no bind
/// hook runs (what the enforcement tests' unbound listeners are).
pub fn listener_without_bind() -> std::io::Result<std::net::TcpListener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket calls; the fd is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: listen on our own socket.
    if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&fd), 16) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(std::net::TcpListener::from(fd))
}

/// A child process killed (by its PID, which we own) and reaped when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `argv` as a new process with exactly PID `pid` (clone3 with `set_tid`, which needs
/// CAP_SYS_ADMIN: the tests run as root), placed in the cgroup whose directory is `cgroup`.
/// This is how the PID-reuse test gives an impostor its victim's PID without waiting for
/// the PID space to wrap.
pub fn spawn_with_pid(pid: u32, argv: &[&str], cgroup: &std::path::Path) -> std::io::Result<u32> {
    use std::{ffi::CString, os::fd::AsRawFd};

    #[repr(C)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

    let cg = std::fs::File::open(cgroup)?;
    let c_args: Vec<CString> =
        argv.iter().map(|a| CString::new(*a).map_err(std::io::Error::other)).collect::<Result<_, _>>()?;
    let mut c_argv: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
    c_argv.push(std::ptr::null());
    let tids = [pid as libc::pid_t];
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: 0,
        stack_size: 0,
        tls: 0,
        set_tid: tids.as_ptr() as u64,
        set_tid_size: 1,
        cgroup: cg.as_raw_fd() as u64,
    };
    // SAFETY: fork-like clone3 (no CLONE_VM); the child only calls execv and _exit, both
    // async-signal-safe, on memory prepared before the call.
    let ret = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, size_of::<CloneArgs>()) };
    match ret {
        0 => unsafe {
            libc::execv(c_argv[0], c_argv.as_ptr());
            libc::_exit(127)
        },
        r if r < 0 => Err(std::io::Error::last_os_error()),
        r => Ok(r as u32),
    }
}

/// Reaps a child started with [`spawn_with_pid`] (by PID, which we own).
pub fn kill_and_reap(pid: u32) {
    // SAFETY: kill/waitpid on our own child.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
        libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
    }
}

/// Spawns `cmd`, retrying on ETXTBSY: a binary the test has just written may still be open
/// for writing in a child that another test thread forked and has not yet exec'd.
pub fn spawn_retrying(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Polls `f` until it yields a value (every 10 ms, 30 s at most; then the test fails naming
/// `what`).
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// sha256 by an independent implementation (coreutils), as hex.
pub fn sha256sum(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap_or_else(|e| panic!("sha256sum: {e}"));
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned()
}

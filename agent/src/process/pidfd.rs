//! pidfds: handles to one process that, unlike a PID, can never come to mean another.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

/// `SO_PEERPIDFD` (Linux 6.5): a pidfd for the process at the other end of a Unix socket, as
/// of its connect().
const SO_PEERPIDFD: libc::c_int = 77;

#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// `pidfd_open(pid)`. Whoever holds PID `pid` now: pair it with a check that this is the
    /// expected process (e.g. its kernel record) — never trust the PID alone.
    pub fn open(pid: u32) -> io::Result<Self> {
        // SAFETY: plain syscall; the returned fd is owned below.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd owned by nobody else.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// Another handle to the same process.
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(PidFd)
    }

    /// A pidfd for one thread (PIDFD_THREAD, Linux 6.9): its task, not its thread group.
    pub fn open_thread(tid: u32) -> io::Result<Self> {
        const PIDFD_THREAD: libc::c_uint = libc::O_EXCL as libc::c_uint;
        // SAFETY: plain syscall; the returned fd is owned below.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tid as libc::pid_t, PIDFD_THREAD) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd owned by nobody else.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// The peer of a connected Unix socket, as of its connect(). Fails (never falls back to a
    /// PID) when the kernel lacks SO_PEERPIDFD or the peer has already been reaped.
    pub fn from_peer(socket: BorrowedFd<'_>) -> io::Result<Self> {
        let mut fd: libc::c_int = -1;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: fd and len point to valid storage of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERPIDFD,
                (&mut fd as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new fd that we now own.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The process's PID now, or None once it has exited and been reaped.
    pub fn pid(&self) -> Option<u32> {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", self.0.as_raw_fd())).ok()?;
        let pid: i64 = info.lines().find_map(|l| l.strip_prefix("Pid:"))?.trim().parse().ok()?;
        u32::try_from(pid).ok().filter(|&p| p > 0)
    }

    /// False once the process has exited (a pidfd polls readable at exit, zombie or not).
    pub fn is_alive(&self) -> bool {
        let mut pfd = libc::pollfd { fd: self.0.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        rc == 0
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_a_child_through_exit() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let pidfd = PidFd::open(child.id()).unwrap();
        assert_eq!(pidfd.pid(), Some(child.id()));
        assert!(pidfd.is_alive());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!pidfd.is_alive());
        assert_eq!(pidfd.pid(), None, "a reaped process has no PID");
    }

    #[test]
    fn peer_of_a_socket_pair_is_ourselves() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let pidfd = PidFd::from_peer(a.as_fd()).unwrap();
        assert_eq!(pidfd.pid(), Some(std::process::id()));
    }
}

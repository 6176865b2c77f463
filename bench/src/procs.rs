//! Processes a benchmark starts (ended by PID when dropped) and what /proc says about them.

use std::{
    path::Path,
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

/// A child process killed and reaped when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Makes the kernel kill `cmd` if the benchmark dies first (killed, or interrupted): its
/// servers and agents never outlive it.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Polls `ok` every 100 ms, for two minutes at most.
pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ok() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Resident set size, KiB (0 when the process is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.split_whitespace().next()?.parse().ok()))
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) the processes of a cgroup have used, exited threads and
/// processes included, to the microsecond (cgroup v2 `cpu.stat`, present with or without the
/// cpu controller).
pub fn cgroup_cpu_seconds(cgroup: &Path) -> f64 {
    std::fs::read_to_string(cgroup.join("cpu.stat"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse::<u64>().ok()))
        .map(|us| us as f64 / 1e6)
        .unwrap_or(0.0)
}

/// The `p` quantile (0..=1) of `xs`, nearest rank.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Sends `bytes` on a new connection to `addr`, half-closes, and checks the count the
/// server answers with: every byte arrived.
pub fn send_counted(addr: std::net::SocketAddrV4, bytes: u64) -> Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| anyhow::anyhow!("connect {addr}: {e}"))?;
    let buf = vec![7u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut got = String::new();
    s.read_to_string(&mut got)?;
    if got.trim().parse::<u64>().ok() != Some(bytes) {
        bail!("bulk: the server read {got:?} of {bytes} bytes");
    }
    Ok(())
}

/// A TCP listener on `addr` with a deep backlog: the default (128) overflows under a connect
/// loop and adds 1 s SYN retransmits to whichever arm it happens in.
pub fn listen_deep(addr: std::net::SocketAddrV4) -> Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&std::net::SocketAddr::V4(addr).into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_stat_is_read() {
        let dir = std::env::temp_dir().join(format!("procs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cpu.stat"), "usage_usec 2500000\nuser_usec 2000000\n").unwrap();
        assert_eq!(cgroup_cpu_seconds(&dir), 2.5);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(cgroup_cpu_seconds(&dir), 0.0);
        assert!(rss_kib(std::process::id()) > 0);
    }

    #[test]
    fn percentiles() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.5), 51.0);
        assert_eq!(percentile(&xs, 0.99), 99.0);
    }
}

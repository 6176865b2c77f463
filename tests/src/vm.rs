//! A throwaway KVM guest booting another kernel than the host's, with the agent in its
//! initramfs: the way to show that the one built eBPF object loads on other kernels.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

/// Where `cargo xtask setup` unpacks guest kernels (Debian packages, not installed).
pub fn kernels_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/vm-kernels")
}

/// The unpacked guest kernel images, e.g. `.../boot/vmlinuz-6.1.0-56-cloud-amd64`.
pub fn guest_kernels() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(pkgs) = std::fs::read_dir(kernels_dir()) {
        for pkg in pkgs.flatten() {
            if let Ok(files) = std::fs::read_dir(pkg.path().join("boot")) {
                out.extend(
                    files
                        .flatten()
                        .map(|f| f.path())
                        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))),
                );
            }
        }
    }
    out.sort();
    out
}

/// A newc-format cpio archive (what the kernel unpacks as initramfs).
#[derive(Default)]
pub struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            body.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), b"");
    }

    pub fn file(&mut self, name: &str, mode: u32, body: &[u8]) {
        self.entry(name, 0o100000 | mode, (0, 0), body);
    }

    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), b"");
    }

    /// Adds a host file and its parent directories at the same path.
    pub fn host_file(&mut self, path: &Path, mode: u32) -> std::io::Result<()> {
        let body = std::fs::read(path)?;
        let name = path.to_string_lossy().trim_start_matches('/').to_owned();
        let mut dir = String::new();
        for part in name.split('/').collect::<Vec<_>>().split_last().map(|(_, d)| d.to_vec()).unwrap_or_default() {
            dir = if dir.is_empty() { part.to_owned() } else { format!("{dir}/{part}") };
            self.dir(&dir);
        }
        self.file(&name, mode, &body);
        Ok(())
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), b"");
        self.data
    }
}

/// Shared libraries a dynamically linked binary needs, per `ldd`.
pub fn shared_libs(binary: &Path) -> std::io::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')).map(PathBuf::from))
        .collect())
}

/// Boots `kernel` with `initramfs` under plain emulation (TCG) and returns the serial console
/// output. KVM is not used: on these (nested) machines /dev/kvm exists but qemu fails to set
/// up the guest CPU with it, while TCG boots the Debian kernel in about 2 s. The guest has no
/// network device.
pub fn boot(kernel: &Path, initramfs: &Path, timeout: Duration) -> std::io::Result<String> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-cpu", "max", "-m", "1024", "-smp", "2", "-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 rdinit=/init quiet lsm=lockdown,capability,bpf"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn()?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => {
            let out = out?;
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            Ok(text)
        }
        Err(_) => {
            // SAFETY: kill on the PID of the qemu we started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "guest did not finish in time"))
        }
    }
}

/// Writes `bytes` to a new file in `dir`.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::File::create(&path)?.write_all(bytes)?;
    Ok(path)
}

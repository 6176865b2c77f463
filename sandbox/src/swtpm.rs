//! A private software TPM per test (or benchmark, or demo). One TPM is manufactured per test process (swtpm_setup
//! with a private swtpm-localca: an RSA-2048 and an ECC P-384 EK, each with a certificate
//! chained to a root and an intermediate CA); each test copies that state and starts its own
//! swtpm on its own ports, killed by PID when the guard drops. Never one TPM for two tests.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// The swtpm process, killed (by its PID, which we own) and reaped on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The manufactured template: TPM state and the CA directory that vouches for its EKs.
struct Template {
    _dir: tempfile::TempDir,
    state: PathBuf,
    ca_dir: PathBuf,
}

/// Two manufacturers: each its own CA and its own TPM (different endorsement seeds).
fn template(vendor: Vendor) -> &'static Template {
    static A: OnceLock<Template> = OnceLock::new();
    static B: OnceLock<Template> = OnceLock::new();
    let cell = match vendor {
        Vendor::A => &A,
        Vendor::B => &B,
    };
    cell.get_or_init(|| manufacture().unwrap_or_else(|e| panic!("manufacturing a swtpm: {e}")))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// The manufacturer the test servers trust.
    A,
    /// Another one, with its own CA: unknown to those servers.
    B,
}

fn manufacture() -> std::io::Result<Template> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let (state, ca, ca_dir) = (root.join("state"), root.join("localca"), root.join("ek-cas"));
    for d in [&state, &ca, &ca_dir] {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(
        root.join("swtpm-localca.conf"),
        format!(
            "statedir = {0}\nsigningkey = {0}/signkey.pem\nissuercert = {0}/issuercert.pem\ncertserial = {0}/certserial\n",
            ca.display()
        ),
    )?;
    std::fs::write(
        root.join("swtpm-localca.options"),
        "--platform-manufacturer Tether\n--platform-version 2.1\n--platform-model test\n",
    )?;
    std::fs::write(
        root.join("swtpm_setup.conf"),
        format!(
            "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {0}/swtpm-localca.conf\ncreate_certs_tool_options = {0}/swtpm-localca.options\n",
            root.display()
        ),
    )?;
    let out = Command::new("swtpm_setup")
        .args(["--tpm2", "--create-ek-cert", "--create-platform-cert", "--pcr-banks", "sha1,sha256", "--overwrite"])
        .arg("--tpmstate")
        .arg(&state)
        .arg("--config")
        .arg(root.join("swtpm_setup.conf"))
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "swtpm_setup failed (is swtpm-tools installed? `cargo xtask setup`): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    // The manufacturer CA directory a server trusts: root and intermediate.
    std::fs::copy(ca.join("swtpm-localca-rootca-cert.pem"), ca_dir.join("root.pem"))?;
    std::fs::copy(ca.join("issuercert.pem"), ca_dir.join("intermediate.pem"))?;
    Ok(Template { _dir: dir, state, ca_dir })
}

/// A running private swtpm.
pub struct Swtpm {
    pub port: u16,
    pub state: PathBuf,
    _dir: tempfile::TempDir,
    child: Option<KillOnDrop>,
}

fn copy_state(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{e}"));
    for f in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{e}")).flatten() {
        if f.file_name() != ".lock" {
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap_or_else(|e| panic!("copying TPM state: {e}"));
        }
    }
}

/// Two free consecutive TCP ports on loopback (swtpm's TCTI takes the control port as data + 1).
fn free_pair() -> u16 {
    loop {
        let Ok(l) = std::net::TcpListener::bind("127.0.0.1:0") else { continue };
        let p = l.local_addr().map(|a| a.port()).unwrap_or(0);
        if p == 0 || p == u16::MAX {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

impl Swtpm {
    /// A fresh copy of vendor A's manufactured TPM, started.
    pub fn start() -> Swtpm {
        Self::start_vendor(Vendor::A)
    }

    /// A fresh copy of `vendor`'s manufactured TPM, started.
    pub fn start_vendor(vendor: Vendor) -> Swtpm {
        let t = template(vendor);
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let state = dir.path().join("state");
        copy_state(&t.state, &state);
        let mut tpm = Swtpm { port: 0, state, _dir: dir, child: None };
        tpm.power_on();
        tpm
    }

    /// A TPM started from a copy of `state` (e.g. a snapshot taken before a reboot).
    pub fn start_from_state(state: &Path) -> Swtpm {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let copy = dir.path().join("state");
        copy_state(state, &copy);
        let mut tpm = Swtpm { port: 0, state: copy, _dir: dir, child: None };
        tpm.power_on();
        tpm
    }

    /// Copies this TPM's current state to `to`, after an orderly shutdown so it is on disk;
    /// the TPM is powered on again after (a reboot: its reset count goes up).
    pub fn snapshot_and_reboot(&mut self, to: &Path) {
        self.shutdown();
        copy_state(&self.state, to);
        self.power_on();
    }

    /// An orderly power cycle: TPM2_Shutdown, stop, start (TPM2_Startup(CLEAR)).
    pub fn reboot(&mut self) {
        self.shutdown();
        self.power_on();
    }

    fn shutdown(&mut self) {
        // TPM2_Shutdown(CLEAR) through the tools, then swtpm's own stop (it saves its state).
        let _ = self.tool("tpm2_shutdown").arg("-c").output();
        let _ = Command::new("swtpm_ioctl").args(["--tcp", &format!("127.0.0.1:{}", self.port + 1), "-s"]).output();
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(c.0.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn power_on(&mut self) {
        for _ in 0..5 {
            let port = free_pair();
            let child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .arg("--tpmstate")
                .arg(format!("dir={}", self.state.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting swtpm: {e}"));
            let mut child = KillOnDrop(child);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.0.try_wait() {
                    break; // lost the port race: try another pair
                }
                // The control port opens last: once it answers, the TPM is ready.
                if TcpStream::connect(("127.0.0.1", port + 1)).is_ok() {
                    self.port = port;
                    self.child = Some(child);
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        panic!("swtpm did not start");
    }

    /// The agent's `tcti` setting for this TPM.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Vendor A's manufacturer CA directory (root + intermediate) for a server's `ek_ca_dir`.
    pub fn ca_dir() -> &'static Path {
        &template(Vendor::A).ca_dir
    }

    /// A `tpm2-tools` command against this TPM.
    pub fn tool(&self, name: &str) -> Command {
        let mut c = Command::new(name);
        c.env("TPM2TOOLS_TCTI", self.tcti());
        c
    }
}

//! Privileged integration tests: real programs in the real kernel, run as root, against
//! cgroups and namespaces the tests create themselves (see the `sandbox` crate).
//! The tests are in `tests/`; this library holds what several of them share.

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

/// A child process killed (by its PID, which we own) and reaped when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

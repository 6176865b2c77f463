//! A private software TPM per test (sandbox::swtpm: manufactured with its own CA, on a random
//! loopback port, killed by PID when dropped), driven with tpm2-tools in a work directory.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

pub struct Swtpm {
    tpm: sandbox::swtpm::Swtpm,
    dir: tempfile::TempDir,
}

pub const EK_RSA: &str = "0x81010001";
pub const EK_ECC: &str = "0x81010016";

impl Swtpm {
    /// RSA-2048 and ECC P-384 EKs with certificates from a private root + intermediate CA,
    /// sha1 and sha256 PCR banks.
    pub fn start() -> Swtpm {
        Swtpm { tpm: sandbox::swtpm::Swtpm::start(), dir: tempfile::tempdir().unwrap() }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The manufacturer CA directory: root and intermediate, as an operator would configure.
    pub fn ca_dir(&self) -> PathBuf {
        sandbox::swtpm::Swtpm::ca_dir().to_owned()
    }

    /// Runs a tpm2-tools command against this TPM in its directory; panics with its stderr.
    pub fn tool(&self, tool: &str, args: &[&str]) -> Output {
        let out = self.try_tool(tool, args);
        assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    pub fn try_tool(&self, tool: &str, args: &[&str]) -> Output {
        let mut cmd: Command = self.tpm.tool(tool);
        cmd.args(args).current_dir(self.dir.path()).output().unwrap()
    }

    pub fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).unwrap()
    }
}

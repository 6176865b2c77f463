//! A private PostgreSQL server for the tests: initialised in a temporary directory, listening
//! on loopback only, stopped and removed when the guard drops.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
}

fn bin_dir() -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("/usr/lib/postgresql missing: install postgresql (cargo xtask setup)")?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop().context("no PostgreSQL server binaries under /usr/lib/postgresql")
}

fn as_postgres(cmd: &Path, args: &[&str]) -> Result<()> {
    // initdb and the server refuse to run as root; Debian's package creates the user.
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {}", cmd.display()))?;
    if !out.status.success() {
        bail!(
            "{} {args:?}: {}{}",
            cmd.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Postgres {
    pub fn start() -> Result<Self> {
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(format!("tether-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let status = Command::new("chown").args(["postgres:postgres"]).arg(&dir).status()?;
        if !status.success() {
            bail!("chown postgres {}", dir.display());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let data = dir.join("data");
        let d = data.to_string_lossy().to_string();
        as_postgres(&bin.join("initdb"), &["-D", &d, "--auth=trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])?;
        let opts = format!("-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off", dir.display());
        let log = dir.join("log").to_string_lossy().to_string();
        as_postgres(&bin.join("pg_ctl"), &["-D", &d, "-o", &opts, "-l", &log, "-w", "start"])?;
        println!("postgres: private server on 127.0.0.1:{port} ({})", dir.display());
        Ok(Postgres { dir, bin, port })
    }

    pub fn conninfo(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.join("data").to_string_lossy().to_string();
        if let Err(e) = as_postgres(&self.bin.join("pg_ctl"), &["-D", &data, "-m", "fast", "-w", "stop"]) {
            eprintln!("postgres: stopping: {e}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

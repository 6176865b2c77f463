//! A real tether-server and tether-agent (the built binaries), on loopback and temporary
//! directories, for end-to-end tests of the identity plane. Both are ended by PID on drop.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use crate::KillOnDrop;

fn bin(name: &str) -> PathBuf {
    let bin = crate::agent_bin().with_file_name(name);
    assert!(bin.exists(), "{} not built (cargo xtask test builds it)", bin.display());
    bin
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    crate::wait_for(what, || ok().then_some(()))
}

pub struct Plane {
    pub dir: tempfile::TempDir,
    pub trust_domain: String,
    pub node_id: String,
    pub port: u16,
    server: Option<KillOnDrop>,
    agent: Option<KillOnDrop>,
    /// Extra environment for the next server start (e.g. fault injection).
    pub server_env: Vec<(String, String)>,
    /// Tables appended to the agent's config by [`Plane::write_agent_config`] (e.g.
    /// `[selectors]`).
    pub agent_extra: String,
}

impl Plane {
    pub fn server_config(&self) -> PathBuf {
        self.dir.path().join("server.toml")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// Starts a server, registers a join token for `node_id`, starts an agent with it.
    pub fn start(sync_seconds: u64) -> Plane {
        Self::start_with(sync_seconds, "")
    }

    /// As [`Plane::start`], with extra lines for the server's TOML config.
    pub fn start_with(sync_seconds: u64, server_extra: &str) -> Plane {
        Self::start_in("example.org", sync_seconds, server_extra)
    }

    /// As [`Plane::start`], with `agent_extra` tables (e.g. `[selectors]`) in the agent's
    /// config.
    pub fn start_with_agent(sync_seconds: u64, agent_extra: &str) -> Plane {
        let mut plane = Self::server_only_in("example.org", "");
        plane.agent_extra = agent_extra.to_owned();
        let token = plane.token(&plane.node_id);
        plane.write_agent_config(sync_seconds, &format!("join_token = \"{token}\"\n"));
        plane.start_agent();
        plane
    }

    /// As [`Plane::start_with`], for another trust domain.
    pub fn start_in(trust_domain: &str, sync_seconds: u64, server_extra: &str) -> Plane {
        let mut plane = Self::server_only_in(trust_domain, server_extra);
        let token = plane.token(&plane.node_id);
        plane.write_agent_config(sync_seconds, &format!("join_token = \"{token}\"\n"));
        plane.start_agent();
        plane
    }

    /// A server trusting `tpm`'s manufacturer CAs with the golden policies in `policy_dir`,
    /// and an agent attesting with that TPM (re-attesting every `reattest_seconds`). The
    /// node ID is the one the server derives from the EK.
    pub fn start_tpm(
        sync_seconds: u64,
        tpm: &sandbox::swtpm::Swtpm,
        policy_dir: &Path,
        ek: &str,
        reattest_seconds: u64,
    ) -> Plane {
        Self::start_tpm_with(sync_seconds, tpm, policy_dir, ek, reattest_seconds, "")
    }

    /// As [`Plane::start_tpm`], with extra lines for the server's `[tpm]` table.
    pub fn start_tpm_with(
        sync_seconds: u64,
        tpm: &sandbox::swtpm::Swtpm,
        policy_dir: &Path,
        ek: &str,
        reattest_seconds: u64,
        server_tpm_extra: &str,
    ) -> Plane {
        Self::start_tpm_server(sync_seconds, tpm, policy_dir, ek, reattest_seconds, "", server_tpm_extra)
    }

    /// As [`Plane::start_tpm_with`], with top-level lines for the server's config too (e.g.
    /// `ca_ttl_seconds`).
    pub fn start_tpm_server(
        sync_seconds: u64,
        tpm: &sandbox::swtpm::Swtpm,
        policy_dir: &Path,
        ek: &str,
        reattest_seconds: u64,
        server_top: &str,
        server_tpm_extra: &str,
    ) -> Plane {
        let mut plane = Self::server_only(&format!(
            "{server_top}[tpm]\nek_ca_dir = \"{}\"\npolicy_dir = \"{}\"\n{server_tpm_extra}",
            sandbox::swtpm::Swtpm::ca_dir().display(),
            policy_dir.display()
        ));
        plane.write_agent_config(
            sync_seconds,
            &format!(
                "[tpm]\ntcti = \"{}\"\nek = \"{ek}\"\nreattest_interval_seconds = {reattest_seconds}\n",
                tpm.tcti()
            ),
        );
        plane.start_agent();
        let log = plane.log("agent");
        plane.node_id = log
            .lines()
            .find(|l| l.contains("node attested"))
            .and_then(|l| l.split("node=").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no node ID in the agent log:\n{log}"))
            .to_owned();
        plane
    }

    /// A running server (SQLite) with `server_extra` in its config; no agent yet.
    pub fn server_only(server_extra: &str) -> Plane {
        Self::server_only_in("example.org", server_extra)
    }

    fn server_only_in(trust_domain: &str, server_extra: &str) -> Plane {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let trust_domain = trust_domain.to_string();
        std::fs::write(
            dir.path().join("server.toml"),
            format!(
                "trust_domain = \"{trust_domain}\"\ndata_dir = \"{}\"\nbind_address = \"127.0.0.1:{port}\"\n{server_extra}",
                dir.path().join("server").display()
            ),
        )
        .unwrap();
        let mut plane = Plane {
            dir,
            node_id: format!("spiffe://{trust_domain}/node/test"),
            trust_domain,
            port,
            server: None,
            agent: None,
            server_env: Vec::new(),
            agent_extra: String::new(),
        };
        plane.start_server();
        plane
    }

    /// agent.toml; `credential` is the join_token line or a [tpm] table (it goes last).
    pub fn write_agent_config(&self, sync_seconds: u64, credential: &str) {
        std::fs::write(
            self.dir.path().join("agent.toml"),
            format!(
                "trust_domain = \"{}\"\nserver_address = \"127.0.0.1:{}\"\ntrust_bundle_path = \"{}\"\ndata_dir = \"{}\"\nsocket_path = \"{}\"\nsync_interval_seconds = {sync_seconds}\n{credential}\n{}",
                self.trust_domain,
                self.port,
                self.dir.path().join("server/bundle.pem").display(),
                self.dir.path().join("agent").display(),
                self.socket().display(),
                self.agent_extra
            ),
        )
        .unwrap();
    }

    pub fn start_server(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        let child = Command::new(bin("tether-server"))
            .arg("run")
            .arg("-c")
            .arg(self.server_config())
            .envs(self.server_env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.server = Some(KillOnDrop(child));
        let admin = self.dir.path().join("server/admin.sock");
        let port = self.port;
        wait_until("the server", || admin.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    }

    pub fn stop_server(&mut self) {
        self.server = None;
    }

    pub fn start_agent(&mut self) {
        if self.agent.is_some() {
            self.stop_agent();
        }
        let log = std::fs::File::create(self.dir.path().join("agent.log")).unwrap();
        let child = Command::new(crate::agent_bin())
            .arg("run")
            .arg("-c")
            .arg(self.dir.path().join("agent.toml"))
            // Accepted Workload API connections are logged at debug: tests count them.
            .env("RUST_LOG", "info,tether_agent::workload_api=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agent = Some(KillOnDrop(child));
        let socket = self.socket();
        wait_until("the agent's Workload API socket", || socket.exists());
    }

    /// Ends the agent (by its PID) and removes the socket it leaves, so the next
    /// [`Plane::start_agent`] waits for a fresh one.
    pub fn stop_agent(&mut self) {
        self.agent = None;
        let _ = std::fs::remove_file(self.socket());
    }

    pub fn log(&self, which: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{which}.log"))).unwrap_or_default()
    }

    /// `tether-server -c <config> ARGS`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("tether-server")).arg("-c").arg(self.server_config()).args(args).output().unwrap()
    }

    /// `tether-server -c <config> ARGS`, which must succeed; its standard output.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "tether-server {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A join token for `node_id`.
    pub fn token(&self, node_id: &str) -> String {
        let out = self.cli_ok(&["token", "generate", "--node-id", node_id]);
        out.trim().strip_prefix("Token: ").unwrap_or_else(|| panic!("no token in {out:?}")).to_owned()
    }

    /// Registers an entry under this node; returns its id.
    pub fn entry(&self, spiffe_id: &str, selectors: &[&str], extra: &[&str]) -> String {
        self.entry_under(&self.node_id, spiffe_id, selectors, extra)
    }

    /// Registers an entry under `parent`; returns its id.
    pub fn entry_under(&self, parent: &str, spiffe_id: &str, selectors: &[&str], extra: &[&str]) -> String {
        let mut args = vec!["entry", "create", "--spiffe-id", spiffe_id, "--parent-id", parent];
        for s in selectors {
            args.extend(["--selector", s]);
        }
        args.extend(extra);
        let text = self.cli_ok(&args);
        text.lines().find_map(|l| l.strip_prefix("Entry ID      : ")).unwrap().to_owned()
    }

    /// Waits until the agent has issued an X.509-SVID for `spiffe_id` (its log says so).
    pub fn wait_issued(&self, spiffe_id: &str) {
        let needle = format!("X.509-SVID issued spiffe_id={spiffe_id}");
        wait_until(&needle, || self.log("agent").contains(&needle));
    }

    /// A command with SPIFFE_ENDPOINT_SOCKET pointing at this agent.
    pub fn workload(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SPIFFE_ENDPOINT_SOCKET", format!("unix://{}", self.socket().display()));
        cmd
    }
}

//! `bench spire`: Tether and SPIRE v1.13.3 side by side on loopback, in the same run.
//!
//! Each system runs as its own server + agent (SQLite store, join token) with the same
//! registrations: `--entries` workloads, each selected by `unix:uid` + `unix:sha256` (the
//! same selector kinds in both), one of which is the workload the bench runs. The workload is
//! one binary for both: `spiffe-go-client`, go-spiffe v2.9.0's Workload API client, started
//! in a bench cgroup. Timed metrics run in interleaved rounds (Tether, SPIRE, SPIRE,
//! Tether, ...); the ratio of each round is oriented in Tether's favour (peer / Tether for
//! times, memory and CPU; Tether / peer for rates), so >= 1 means Tether did better.
//!
//! Measured:
//! - B5: FetchX509SVID (first message of the stream) and FetchJWTSVID latency p50/p99 with 1
//!   and 16 concurrent callers, and the calls/s they reach, through each agent's socket.
//! - B10: a new entry -> the waiting workload holding its SVID; a workload's exec -> its first
//!   X.509-SVID (the same binary again, and a fresh copy of it: a new inode Tether has not
//!   measured yet).
//! - B9: X.509-SVIDs issued per server CPU-second through each server's own signing path for
//!   agents: the agent is restarted (its workload keys live in memory, so it has every SVID
//!   signed again) and the server's CPU time is counted until the agent holds them all.
//! - Memory: agent RSS per cached SVID (growth from `--entries` to `--entries-large`
//!   registrations) and server RSS at both sizes.
//! - CPU: agent and server CPU seconds over a rotation window with short X.509 TTLs, both
//!   systems running at once (fresh deployments).

use std::{
    collections::BTreeMap,
    io::Read,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use sandbox::{require_root, CgroupGuard};

use crate::{
    procs::{cgroup_cpu_seconds, die_with_parent, percentile, rss_kib, wait_for, Proc},
    report::{median, Better, Metric},
};

const TRUST_DOMAIN: &str = "bench.example.org";
const NODE_ID: &str = "spiffe://bench.example.org/node";
const SPIRE_VERSION: &str = "1.13.3";

#[derive(clap::Args)]
pub struct Args {
    /// Interleaved rounds per timed metric.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Timed calls per caller per round.
    #[arg(long, default_value_t = 100)]
    calls: usize,
    /// Registered workloads on each node.
    #[arg(long, default_value_t = 1000)]
    entries: usize,
    /// Registered workloads for the second memory measurement.
    #[arg(long, default_value_t = 10_000)]
    entries_large: usize,
    /// X.509-SVID TTL (seconds) in the rotation window.
    #[arg(long, default_value_t = 60)]
    rotation_ttl: u64,
    /// Length of the rotation window (seconds).
    #[arg(long, default_value_t = 120)]
    rotation_seconds: u64,
    /// Leave out the diagnostic run against SPIRE with uid-only selectors.
    #[arg(long)]
    skip_uid_only: bool,
    /// Directory holding spire-server, spire-agent and spiffe-go-client (default:
    /// target/peers/bin, where `cargo xtask bench spire` builds them).
    #[arg(long)]
    peers: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Tether,
    Spire,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Tether => "tether",
            Kind::Spire => "spire",
        }
    }
}

/// Round r runs Tether first when r % 4 is 0 or 3: T S S T T S S T ...
fn order(round: usize) -> [Kind; 2] {
    if matches!(round % 4, 0 | 3) {
        [Kind::Tether, Kind::Spire]
    } else {
        [Kind::Spire, Kind::Tether]
    }
}

/// The programs: ours (beside this binary) and the peers.
struct Bins {
    tether_server: PathBuf,
    tether_agent: PathBuf,
    spire_server: PathBuf,
    spire_agent: PathBuf,
    /// The workload, copied into the bench directory (readable by the test uids).
    client: PathBuf,
    client_sha256: String,
}

/// A registration entry: SPIFFE ID path, selected by uid + the sha256 of the binary.
#[derive(Clone)]
struct Spec {
    path: String,
    uid: u32,
    sha256: String,
    x509_ttl: u64,
}

impl Spec {
    fn spiffe_id(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/{}", self.path)
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` workloads that never run: uids nobody uses, digests of no file.
fn dummies(n: usize, prefix: &str, x509_ttl: u64) -> Vec<Spec> {
    (0..n)
        .map(|i| Spec {
            path: format!("{prefix}/w{i}"),
            uid: 100_000 + i as u32,
            sha256: sha256_hex(format!("{prefix} workload {i}").as_bytes()),
            x509_ttl,
        })
        .collect()
}

/// `n` registered workloads: `n - 1` dummies and the bench's client (uid 0, its sha256).
fn specs(n: usize, prefix: &str, bins: &Bins, x509_ttl: u64) -> Vec<Spec> {
    let mut v = dummies(n.saturating_sub(1), prefix, x509_ttl);
    v.push(Spec { path: format!("{prefix}/client"), uid: 0, sha256: bins.client_sha256.clone(), x509_ttl });
    v
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn output_ok(what: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!("{what}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One trust domain's server and agent, each in a cgroup of its own (its CPU time is read
/// from there, to the microsecond and counting every thread).
struct System {
    kind: Kind,
    dir: PathBuf,
    port: u16,
    server: Option<Proc>,
    agent: Option<Proc>,
    server_cg: CgroupGuard,
    agent_cg: CgroupGuard,
    agent_starts: u32,
    /// Entries registered under the node.
    registered: usize,
    /// Whether entries select `unix:sha256` too (always for Tether; SPIRE's agent then
    /// discovers the workload's path and hashes it).
    sha256: bool,
    join_token: Option<String>,
}

impl System {
    fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    fn server_socket(&self) -> PathBuf {
        self.dir.join("server/api.sock")
    }

    fn agent_log(&self) -> PathBuf {
        self.dir.join(format!("agent-{}.log", self.agent_starts))
    }

    fn server_pid(&self) -> u32 {
        self.server.as_ref().map(Proc::pid).unwrap_or(0)
    }

    fn agent_pid(&self) -> u32 {
        self.agent.as_ref().map(Proc::pid).unwrap_or(0)
    }

    fn server_cpu(&self) -> f64 {
        cgroup_cpu_seconds(self.server_cg.path())
    }

    fn agent_cpu(&self) -> f64 {
        cgroup_cpu_seconds(self.agent_cg.path())
    }

    /// Starts the server with its data under `root/<kind>`, issues the join token.
    fn start(kind: Kind, root: &Path, bins: &Bins, svid_cache: usize, sha256: bool) -> Result<System> {
        let name = if sha256 { kind.name().to_owned() } else { format!("{}-uid-only", kind.name()) };
        let dir = root.join(&name);
        std::fs::create_dir_all(dir.join("server"))?;
        std::fs::create_dir_all(dir.join("agent"))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let mut sys = System {
            kind,
            dir,
            port: free_port()?,
            server: None,
            agent: None,
            server_cg: CgroupGuard::new(&format!("bench-{name}-server"))?,
            agent_cg: CgroupGuard::new(&format!("bench-{name}-agent"))?,
            agent_starts: 0,
            registered: 0,
            sha256: sha256 || kind == Kind::Tether,
            join_token: None,
        };
        let log = std::fs::File::create(sys.dir.join("server.log"))?;
        let (program, args, config) = match kind {
            Kind::Tether => {
                let config = sys.dir.join("server.toml");
                std::fs::write(
                    &config,
                    format!(
                        "trust_domain = \"{TRUST_DOMAIN}\"\ndata_dir = \"{}\"\nbind_address = \"127.0.0.1:{}\"\nadmin_socket = \"{}\"\n",
                        sys.dir.join("server").display(),
                        sys.port,
                        sys.server_socket().display()
                    ),
                )?;
                (&bins.tether_server, ["run", "-c"], config)
            }
            Kind::Spire => {
                let config = sys.dir.join("server.conf");
                std::fs::write(&config, spire_server_conf(&sys))?;
                (&bins.spire_server, ["run", "-config"], config)
            }
        };
        let mut cmd = Command::new(program);
        cmd.args(args).arg(&config).stdout(log.try_clone()?).stderr(log);
        sys.server_cg.place(&mut cmd)?;
        die_with_parent(&mut cmd);
        sys.server = Some(Proc(cmd.spawn().with_context(|| format!("starting {}", program.display()))?));
        let socket = sys.server_socket();
        let port = sys.port;
        wait_for(&format!("the {} server", kind.name()), || {
            socket.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .with_context(|| std::fs::read_to_string(sys.dir.join("server.log")).unwrap_or_default())?;
        let token = match kind {
            Kind::Tether => sys.tether_cli(bins, &["token", "generate", "--node-id", NODE_ID])?,
            Kind::Spire => {
                // The alias entry -spiffeID makes: workloads name the node as their parent.
                sys.spire_cli(bins, &["token", "generate", "-spiffeID", NODE_ID, "-ttl", "600"])?
            }
        };
        sys.join_token = Some(token.trim().trim_start_matches("Token: ").trim().to_owned());
        match kind {
            Kind::Tether => {
                std::fs::write(
                    sys.dir.join("agent.toml"),
                    format!(
                        "trust_domain = \"{TRUST_DOMAIN}\"\nserver_address = \"127.0.0.1:{}\"\ntrust_bundle_path = \"{}\"\njoin_token = \"{}\"\ndata_dir = \"{}\"\nsocket_path = \"{}\"\n",
                        sys.port,
                        sys.dir.join("server/bundle.pem").display(),
                        sys.join_token.as_deref().unwrap_or_default(),
                        sys.dir.join("agent").display(),
                        sys.socket().display()
                    ),
                )?;
            }
            Kind::Spire => {
                let bundle = sys.spire_cli(bins, &["bundle", "show"])?;
                std::fs::write(sys.dir.join("bundle.pem"), bundle)?;
                std::fs::write(sys.dir.join("agent.conf"), spire_agent_conf(&sys, svid_cache))?;
            }
        }
        Ok(sys)
    }

    fn tether_cli(&self, bins: &Bins, args: &[&str]) -> Result<String> {
        output_ok(
            &format!("tether-server {args:?}"),
            Command::new(&bins.tether_server).arg("-c").arg(self.dir.join("server.toml")).args(args),
        )
    }

    fn spire_cli(&self, bins: &Bins, args: &[&str]) -> Result<String> {
        let (sub, rest) = args.split_at(2.min(args.len()));
        output_ok(
            &format!("spire-server {args:?}"),
            Command::new(&bins.spire_server).args(sub).arg("-socketPath").arg(self.server_socket()).args(rest),
        )
    }

    /// Registers `specs` in bulk: Tether through its admin API, SPIRE with batch files.
    fn register(&mut self, bins: &Bins, specs: &[Spec]) -> Result<()> {
        match self.kind {
            Kind::Tether => {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async {
                    let mut admin = tether_server::admin_client::connect(&self.server_socket()).await?;
                    for s in specs {
                        admin
                            .create_entry(tether_proto::node::Entry {
                                spiffe_id: s.spiffe_id(),
                                parent_id: NODE_ID.into(),
                                selectors: vec![format!("unix:uid:{}", s.uid), format!("unix:sha256:{}", s.sha256)],
                                x509_ttl_seconds: s.x509_ttl as i64,
                                namespace: "default".into(),
                                ..Default::default()
                            })
                            .await
                            .with_context(|| format!("creating {}", s.spiffe_id()))?;
                    }
                    anyhow::Ok(())
                })?;
            }
            Kind::Spire => {
                for (i, chunk) in specs.chunks(1000).enumerate() {
                    let entries: Vec<_> = chunk
                        .iter()
                        .map(|s| {
                            let mut selectors =
                                vec![serde_json::json!({"type": "unix", "value": format!("uid:{}", s.uid)})];
                            if self.sha256 {
                                selectors
                                    .push(serde_json::json!({"type": "unix", "value": format!("sha256:{}", s.sha256)}));
                            }
                            let mut e = serde_json::json!({
                                "spiffe_id": s.spiffe_id(),
                                "parent_id": NODE_ID,
                                "selectors": selectors,
                            });
                            if s.x509_ttl > 0 {
                                e["x509_svid_ttl"] = s.x509_ttl.into();
                            }
                            e
                        })
                        .collect();
                    let file = self.dir.join(format!("entries-{}-{i}.json", self.registered));
                    std::fs::write(&file, serde_json::to_vec(&serde_json::json!({ "entries": entries }))?)?;
                    let out = self.spire_cli(bins, &["entry", "create", "-data", &file.to_string_lossy()])?;
                    let created = out.matches("Entry ID").count();
                    if created != chunk.len() {
                        bail!("spire-server entry create made {created} of {} entries:\n{out}", chunk.len());
                    }
                }
            }
        }
        self.registered += specs.len();
        Ok(())
    }

    /// One entry through the operator's CLI, as a person would add it.
    fn create_entry_cli(&mut self, bins: &Bins, s: &Spec) -> Result<()> {
        let (uid, sha) = (format!("unix:uid:{}", s.uid), format!("unix:sha256:{}", s.sha256));
        let id = s.spiffe_id();
        match self.kind {
            Kind::Tether => self.tether_cli(
                bins,
                &[
                    "entry",
                    "create",
                    "--spiffe-id",
                    &id,
                    "--parent-id",
                    NODE_ID,
                    "--selector",
                    &uid,
                    "--selector",
                    &sha,
                ],
            )?,
            Kind::Spire => self.spire_cli(
                bins,
                &["entry", "create", "-spiffeID", &id, "-parentID", NODE_ID, "-selector", &uid, "-selector", &sha],
            )?,
        };
        self.registered += 1;
        Ok(())
    }

    /// Starts the agent (the join token on its first start; its stored node SVID later),
    /// logging to a fresh file.
    fn start_agent(&mut self, bins: &Bins) -> Result<()> {
        self.agent_starts += 1;
        let log = std::fs::File::create(self.agent_log())?;
        let _ = std::fs::remove_file(self.socket());
        let mut cmd = match self.kind {
            Kind::Tether => {
                let mut c = Command::new(&bins.tether_agent);
                c.arg("run").arg("-c").arg(self.dir.join("agent.toml"));
                c
            }
            Kind::Spire => {
                let mut c = Command::new(&bins.spire_agent);
                c.arg("run").arg("-config").arg(self.dir.join("agent.conf"));
                if self.agent_starts == 1 {
                    c.arg("-joinToken").arg(self.join_token.as_deref().unwrap_or_default());
                }
                c
            }
        };
        cmd.stdout(log.try_clone()?).stderr(log);
        self.agent_cg.place(&mut cmd)?;
        die_with_parent(&mut cmd);
        self.agent = Some(Proc(cmd.spawn()?));
        let socket = self.socket();
        wait_for(&format!("the {} agent's socket", self.kind.name()), || socket.exists())
            .with_context(|| std::fs::read_to_string(self.agent_log()).unwrap_or_default())
    }

    fn stop_agent(&mut self) {
        self.agent = None;
    }

    /// X.509-SVIDs the current agent has had signed (issued or renewed), from its log at the
    /// level both run at (info).
    fn issued(&self) -> usize {
        let log = std::fs::read_to_string(self.agent_log()).unwrap_or_default();
        match self.kind {
            Kind::Tether => log.matches("X.509-SVID issued").count(),
            Kind::Spire => {
                log.matches("msg=\"Creating X509-SVID\"").count() + log.matches("msg=\"Renewing X509-SVID\"").count()
            }
        }
    }

    /// Waits until the current agent has had `n` SVIDs signed and both processes are idle
    /// again (the SVIDs are then in the agent's cache).
    fn wait_issued(&self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.issued() < n {
            if Instant::now() > deadline {
                bail!(
                    "{} agent had {} of {n} SVIDs signed after {timeout:?}; log: {}",
                    self.kind.name(),
                    self.issued(),
                    self.agent_log().display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.settle();
        Ok(())
    }

    /// Waits (10 s at most) until server and agent used less than 10 ms of CPU in half a
    /// second.
    fn settle(&self) {
        settle(&[self.server_cg.path(), self.agent_cg.path()]);
    }
}

fn settle(cgroups: &[&Path]) {
    let total = || cgroups.iter().map(|p| cgroup_cpu_seconds(p)).sum::<f64>();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = total();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let now = total();
        if now - last < 0.01 {
            return;
        }
        last = now;
    }
}

/// SPIRE's sample server.conf with what this bench needs: its own directory, ports and
/// socket, and INFO logging (the level Tether runs at).
fn spire_server_conf(sys: &System) -> String {
    let data = sys.dir.join("server");
    format!(
        r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = "{socket}"
    trust_domain = "{TRUST_DOMAIN}"
    data_dir = "{data}"
    log_level = "INFO"
}}

plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{data}/datastore.sqlite3"
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "memory" {{
        plugin_data = {{}}
    }}
}}
"#,
        port = sys.port,
        socket = sys.server_socket().display(),
        data = data.display(),
    )
}

/// SPIRE's sample agent.conf plus: the unix attestor discovering the workload's path (which
/// is what gives it `unix:sha256`), and an SVID cache holding every registered workload's
/// SVID (by default it keeps 1,000 and fetches the rest on demand; Tether holds all).
fn spire_agent_conf(sys: &System, svid_cache: usize) -> String {
    let data = sys.dir.join("agent");
    format!(
        r#"agent {{
    data_dir = "{data}"
    log_level = "INFO"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = "{socket}"
    trust_bundle_path = "{bundle}"
    trust_domain = "{TRUST_DOMAIN}"
    x509_svid_cache_max_size = {svid_cache}
}}

plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "disk" {{
        plugin_data {{
            directory = "{data}"
        }}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{
            discover_workload_path = {discover}
        }}
    }}
}}
"#,
        data = data.display(),
        port = sys.port,
        socket = sys.socket().display(),
        bundle = sys.dir.join("bundle.pem").display(),
        discover = sys.sha256,
    )
}

/// The go-spiffe client as a workload of `sys`, in the bench cgroup.
fn client(bins: &Bins, cg: &CgroupGuard, sys: &System, args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new(&bins.client);
    cmd.args(args).env("SPIFFE_ENDPOINT_SOCKET", format!("unix://{}", sys.socket().display()));
    cg.place(&mut cmd)?;
    Ok(cmd)
}

/// Drops root for `uid` (and the same gid, no supplementary groups) after the command has
/// joined its cgroup: std's own `uid()` switches before the pre-exec hooks run, and an
/// unprivileged process may not move itself between cgroups.
fn become_uid(cmd: &mut Command, uid: u32) {
    // SAFETY: setgroups/setresgid/setresuid are async-signal-safe system calls on values
    // captured by copy.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(uid, uid, uid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn client_json(what: &str, cmd: &mut Command) -> Result<serde_json::Value> {
    let out = spawn_retrying(cmd)?.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{what}: go-spiffe client failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    }
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .next_back()
        .with_context(|| format!("{what}: no JSON from the client: {stdout}"))
}

/// Spawns with piped output, retrying on ETXTBSY (a copy just written may still be open in
/// a child another thread forked).
fn spawn_retrying(cmd: &mut Command) -> Result<std::process::Child> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    for _ in 0..50 {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => std::thread::sleep(Duration::from_millis(20)),
            other => return Ok(other?),
        }
    }
    bail!("{cmd:?}: text file busy")
}

fn unix_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

fn find_bins(args: &Args, dir: &Path) -> Result<Bins> {
    let here = std::env::current_exe()?.parent().context("exe dir")?.to_path_buf();
    let peers = match &args.peers {
        Some(p) => p.clone(),
        // target/release/tether-bench -> target/peers/bin
        None => here.parent().context("target dir")?.join("peers/bin"),
    };
    let need = |p: PathBuf| -> Result<PathBuf> {
        if !p.is_file() {
            bail!("{} missing: `cargo xtask bench spire` builds the peers (SPIRE, go-spiffe client)", p.display());
        }
        Ok(p)
    };
    let original = need(peers.join("spiffe-go-client"))?;
    let client = dir.join("spiffe-go-client");
    std::fs::copy(&original, &client)?;
    std::fs::set_permissions(&client, std::fs::Permissions::from_mode(0o755))?;
    let client_sha256 = sha256_hex(&std::fs::read(&client)?);
    Ok(Bins {
        tether_server: need(here.join("tether-server"))?,
        tether_agent: need(here.join("tether-agent"))?,
        spire_server: need(peers.join("spire-server"))?,
        spire_agent: need(peers.join("spire-agent"))?,
        client,
        client_sha256,
    })
}

fn versions(bins: &Bins) -> Result<(String, String, String)> {
    let out = Command::new(&bins.spire_server).arg("--version").output()?;
    // spire-server prints its version on stderr.
    let spire =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).trim().to_owned();
    if spire != SPIRE_VERSION {
        bail!("{} is version {spire:?}, this bench is for {SPIRE_VERSION}", bins.spire_server.display());
    }
    let v: serde_json::Value = serde_json::from_slice(&Command::new(&bins.client).arg("version").output()?.stdout)?;
    Ok((spire, v["go_spiffe"].as_str().unwrap_or("?").to_owned(), v["go"].as_str().unwrap_or("?").to_owned()))
}

pub fn run(args: &Args) -> Result<()> {
    require_root()?;
    let root = tempfile::Builder::new().prefix("tether-bench-spire-").tempdir()?;
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))?;
    let bins = find_bins(args, root.path())?;
    let (spire_version, go_spiffe, go) = versions(&bins)?;
    let client_size = std::fs::metadata(&bins.client)?.len();
    println!("Tether vs SPIRE {spire_version}: both with SQLite and a join token on loopback, {} registered workloads each (unix:uid + unix:sha256), log level info", args.entries);
    println!(
        "workload: spiffe-go-client (go-spiffe {go_spiffe}, {go}, {:.1} MB, the same binary against both agents)",
        client_size as f64 / 1e6
    );
    println!("SPIRE settings beyond its sample configs: own ports/paths, log_level INFO, WorkloadAttestor unix discover_workload_path = true (for unix:sha256), agent x509_svid_cache_max_size = {} (hold every registered SVID, as Tether does)", args.entries_large + 4 * args.rounds);
    println!("ratios: in Tether's favour (peer/Tether for times, memory, CPU; Tether/peer for rates): >= 1 means Tether did better; {} interleaved rounds (T S S T ...)\n", args.rounds);

    let cg = CgroupGuard::new("bench-spire")?;
    let mut metrics: Vec<Metric> = Vec::new();
    let svid_cache = args.entries_large + 4 * args.rounds;
    {
        let mut systems = BTreeMap::new();
        for kind in [Kind::Tether, Kind::Spire] {
            let mut sys = System::start(kind, root.path(), &bins, svid_cache, true)?;
            sys.register(&bins, &specs(args.entries, "w", &bins, 0))?;
            sys.start_agent(&bins)?;
            systems.insert(kind.name(), sys);
        }
        for sys in systems.values() {
            sys.wait_issued(args.entries, Duration::from_secs(120))?;
        }
        let get = |k: Kind| &systems[k.name()];

        println!("B5 Workload API through each agent's socket ({} timed calls per caller per round)", args.calls);
        workload_api(args, &bins, &cg, get(Kind::Tether), get(Kind::Spire), "B5-spire", &mut metrics)?;
        if !args.skip_uid_only {
            println!("\nB5 diagnostic, not the same work: SPIRE with uid selectors only (no discover_workload_path, so no per-call sha256) against the same Tether (uid + sha256)");
            let mut uid_only = System::start(Kind::Spire, root.path(), &bins, svid_cache, false)?;
            uid_only.register(&bins, &specs(args.entries, "w", &bins, 0))?;
            uid_only.start_agent(&bins)?;
            uid_only.wait_issued(args.entries, Duration::from_secs(120))?;
            workload_api(args, &bins, &cg, get(Kind::Tether), &uid_only, "B5-spire-uid-only", &mut metrics)?;
        }
        exec_to_first_fetch(args, &bins, &cg, &get, &mut metrics)?;
        let mut systems = systems;
        entry_to_svid(args, &bins, &cg, &mut systems, &mut metrics)?;
        issuance_and_memory(args, &bins, &mut systems, &mut metrics)?;
    }
    let note = rotation_cpu(args, &bins, root.path(), svid_cache, &mut metrics)?;

    println!("\nsummary (peer = SPIRE {spire_version}; ratio in Tether's favour, median (min-max))");
    println!("| bench | metric | unit | SPIRE | Tether | ratio | rounds |");
    println!("|---|---|---|---|---|---|---|");
    for m in &metrics {
        let (r, lo, hi) = m.summary();
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.2} ({:.2}-{:.2}) | {} |",
            m.bench,
            m.metric,
            m.unit,
            median(&m.baseline),
            median(&m.value),
            r,
            lo,
            hi,
            m.value.len()
        );
    }
    println!("{note}");
    Ok(())
}

type Get<'a> = dyn Fn(Kind) -> &'a System + 'a;

fn workload_api(
    args: &Args,
    bins: &Bins,
    cg: &CgroupGuard,
    tether: &System,
    peer: &System,
    bench: &'static str,
    metrics: &mut Vec<Metric>,
) -> Result<()> {
    for method in ["x509", "jwt"] {
        for callers in [1usize, 16] {
            let calls = args.calls.to_string();
            let callers_s = callers.to_string();
            let run = |sys: &System| -> Result<(f64, f64, f64)> {
                let v = client_json(
                    &format!("{} {method} x{callers}", sys.kind.name()),
                    &mut client(
                        bins,
                        cg,
                        sys,
                        &["bench", "-method", method, "-callers", &callers_s, "-calls", &calls],
                    )?,
                )?;
                let lat: Vec<f64> = serde_json::from_value(v["latencies_us"].clone())?;
                let wall = v["wall_s"].as_f64().context("wall_s")?;
                Ok((percentile(&lat, 0.5), percentile(&lat, 0.99), lat.len() as f64 / wall))
            };
            let name = if method == "x509" { "FetchX509SVID" } else { "FetchJWTSVID" };
            let mut p50 = Metric::versus(bench, format!("{name}_c{callers}_p50"), "us", Better::Lower);
            let mut p99 = Metric::versus(bench, format!("{name}_c{callers}_p99"), "us", Better::Lower);
            let mut rate = Metric::versus(bench, format!("{name}_c{callers}_calls_per_s"), "call/s", Better::Higher);
            // Warm-up: the JWT-SVID minted and cached by each agent, pages in.
            run(tether)?;
            run(peer)?;
            for r in 0..args.rounds {
                let mut got = BTreeMap::new();
                for kind in order(r) {
                    got.insert(kind, run(if kind == Kind::Tether { tether } else { peer })?);
                }
                let (t, s) = (got[&Kind::Tether], got[&Kind::Spire]);
                p50.push(s.0, t.0);
                p99.push(s.1, t.1);
                rate.push(s.2, t.2);
            }
            for m in [p50, p99, rate] {
                m.print();
                metrics.push(m);
            }
        }
    }
    Ok(())
}

fn exec_to_first_fetch(
    args: &Args,
    bins: &Bins,
    cg: &CgroupGuard,
    get: &Get<'_>,
    metrics: &mut Vec<Metric>,
) -> Result<()> {
    println!("\nB10 a workload's exec -> its first X.509-SVID (the client started in the bench cgroup, fetching every 5 ms until it has one); also the part after the client's main() began (the loader and Go runtime before it are the same for both)");
    let copies = bins.client.with_file_name("copies");
    std::fs::create_dir_all(&copies)?;
    for fresh in [false, true] {
        let suffix = if fresh { "_fresh_copy" } else { "" };
        let mut total = Metric::versus("B10-spire", format!("exec_to_first_svid{suffix}"), "ms", Better::Lower);
        let mut agent = Metric::versus("B10-spire", format!("main_to_first_svid{suffix}"), "ms", Better::Lower);
        let mut retries = BTreeMap::<&str, u64>::new();
        for r in 0..args.rounds {
            let mut got = BTreeMap::new();
            for kind in order(r) {
                let sys = get(kind);
                let program = if fresh {
                    // Same bytes (same sha256), new inode: Tether has not measured it yet.
                    let p = copies.join(format!("client-{r}-{}", kind.name()));
                    std::fs::copy(&bins.client, &p)?;
                    p
                } else {
                    bins.client.clone()
                };
                let mut cmd = Command::new(&program);
                cmd.args(["first-fetch", "-interval", "5ms"])
                    .env("SPIFFE_ENDPOINT_SOCKET", format!("unix://{}", sys.socket().display()));
                cg.place(&mut cmd)?;
                let t0 = unix_ns();
                let v = client_json(&format!("{} first fetch", kind.name()), &mut cmd)?;
                let done = v["fetched_unix_ns"].as_i64().context("fetched_unix_ns")? as i128;
                let main = v["main_unix_ns"].as_i64().context("main_unix_ns")? as i128;
                *retries.entry(kind.name()).or_default() += v["attempts"].as_u64().unwrap_or(1) - 1;
                got.insert(kind.name(), ((done - t0) as f64 / 1e6, (done - main) as f64 / 1e6));
            }
            total.push(got["spire"].0, got["tether"].0);
            agent.push(got["spire"].1, got["tether"].1);
        }
        for m in [total, agent] {
            m.print();
            metrics.push(m);
        }
        println!("  refused first attempts (retried): {retries:?}");
    }
    Ok(())
}

fn entry_to_svid(
    args: &Args,
    bins: &Bins,
    cg: &CgroupGuard,
    systems: &mut BTreeMap<&'static str, System>,
    metrics: &mut Vec<Metric>,
) -> Result<()> {
    println!("\nB10 a new entry (operator CLI) -> the waiting workload holding its SVID (it asks every 20 ms); both agents sync every 5 s (their defaults)");
    let mut m = Metric::versus("B10-spire", "new_entry_to_svid", "ms", Better::Lower);
    for r in 0..args.rounds {
        let mut got = BTreeMap::new();
        for kind in order(r) {
            let sys = systems.get_mut(kind.name()).context("system")?;
            // A uid no entry selects yet: the workload is refused until the entry arrives.
            let uid = 60_000 + 2 * r as u32 + (kind == Kind::Spire) as u32;
            let mut cmd = client(bins, cg, sys, &["first-fetch", "-interval", "20ms", "-timeout", "60s"])?;
            become_uid(&mut cmd, uid);
            let mut child = Proc(spawn_retrying(&mut cmd)?);
            std::thread::sleep(Duration::from_millis(500));
            let spec = Spec { path: format!("late/{r}"), uid, sha256: bins.client_sha256.clone(), x509_ttl: 0 };
            let t0 = unix_ns();
            sys.create_entry_cli(bins, &spec)?;
            let status = child.0.wait()?;
            let mut out = String::new();
            child.0.stdout.take().context("stdout")?.read_to_string(&mut out)?;
            if !status.success() {
                let mut err = String::new();
                child.0.stderr.take().context("stderr")?.read_to_string(&mut err)?;
                bail!("{} workload uid {uid} never got its SVID: {out}{err}", kind.name());
            }
            let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or_default())?;
            let done = v["fetched_unix_ns"].as_i64().context("fetched_unix_ns")? as i128;
            got.insert(kind.name(), (done - t0) as f64 / 1e6);
        }
        m.push(got["spire"], got["tether"]);
    }
    m.print();
    metrics.push(m);
    Ok(())
}

fn issuance_and_memory(
    args: &Args,
    bins: &Bins,
    systems: &mut BTreeMap<&'static str, System>,
    metrics: &mut Vec<Metric>,
) -> Result<()> {
    println!("\nB9 issuance through each server's signing path for agents: the agent restarts (workload keys live only in its memory) and has all its SVIDs signed again; server CPU counted until it holds them");
    let mut rate = Metric::versus("B9-spire", "svids_per_server_cpu_second", "svid/s", Better::Higher);
    let mut wall = Metric::versus("B9-spire", "agent_restart_to_all_svids", "ms", Better::Lower);
    for r in 0..args.rounds {
        let mut got = BTreeMap::new();
        for kind in order(r) {
            let sys = systems.get_mut(kind.name()).context("system")?;
            sys.stop_agent();
            settle(&[sys.server_cg.path()]);
            let cpu0 = sys.server_cpu();
            let t0 = Instant::now();
            sys.start_agent(bins)?;
            let n = sys.registered;
            let deadline = t0 + Duration::from_secs(120);
            while sys.issued() < n {
                if Instant::now() > deadline {
                    bail!("{} agent had {} of {n} SVIDs signed after a restart", kind.name(), sys.issued());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let held = t0.elapsed();
            sys.settle();
            let cpu = sys.server_cpu() - cpu0;
            got.insert(kind.name(), (n as f64 / cpu, held.as_secs_f64() * 1e3));
        }
        rate.push(got["spire"].0, got["tether"].0);
        wall.push(got["spire"].1, got["tether"].1);
    }
    for m in [rate, wall] {
        m.print();
        metrics.push(m);
    }

    println!(
        "\nmemory: agent RSS growth per cached SVID from {} to {} registered workloads; server RSS at both",
        args.entries, args.entries_large
    );
    let sample = |pid: u32| -> f64 {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(rss_kib(pid) as f64);
            std::thread::sleep(Duration::from_millis(500));
        }
        median(&v)
    };
    let mut small = BTreeMap::new();
    for (name, sys) in systems.iter() {
        std::thread::sleep(Duration::from_secs(2));
        small.insert(*name, (sample(sys.agent_pid()), sample(sys.server_pid()), sys.registered, sys.issued()));
    }
    for sys in systems.values_mut() {
        let more = args.entries_large.saturating_sub(sys.registered);
        sys.register(bins, &dummies(more, "big", 0))?;
    }
    let mut large = BTreeMap::new();
    for (name, sys) in systems.iter() {
        // Every SVID of the current agent: those of its last start plus the new ones.
        let (_, _, registered, issued) = small[name];
        sys.wait_issued(issued + sys.registered - registered, Duration::from_secs(300))?;
        std::thread::sleep(Duration::from_secs(2));
        large.insert(*name, (sample(sys.agent_pid()), sample(sys.server_pid()), sys.registered, sys.issued()));
    }
    let per_svid = |name: &str| {
        let (s, l) = (small[name], large[name]);
        (l.0 - s.0) * 1024.0 / (l.2 - s.2).max(1) as f64
    };
    let mut m = Metric::versus("B5-spire", "agent_rss_per_cached_svid", "bytes", Better::Lower);
    m.push(per_svid("spire"), per_svid("tether"));
    let mut agent_small =
        Metric::versus("B5-spire", format!("agent_rss_{}_entries", args.entries), "KiB", Better::Lower);
    agent_small.push(small["spire"].0, small["tether"].0);
    let mut agent_large =
        Metric::versus("B5-spire", format!("agent_rss_{}_entries", args.entries_large), "KiB", Better::Lower);
    agent_large.push(large["spire"].0, large["tether"].0);
    let mut server_small =
        Metric::versus("B9-spire", format!("server_rss_{}_entries", args.entries), "KiB", Better::Lower);
    server_small.push(small["spire"].1, small["tether"].1);
    let mut server_large =
        Metric::versus("B9-spire", format!("server_rss_{}_entries", args.entries_large), "KiB", Better::Lower);
    server_large.push(large["spire"].1, large["tether"].1);
    for m in [m, agent_small, agent_large, server_small, server_large] {
        m.print();
        metrics.push(m);
    }
    Ok(())
}

fn rotation_cpu(args: &Args, bins: &Bins, root: &Path, svid_cache: usize, metrics: &mut Vec<Metric>) -> Result<String> {
    let ttl = args.rotation_ttl;
    let window = args.rotation_seconds;
    println!(
        "\nCPU over rotations: fresh deployments, {} workloads with X.509 TTL {ttl} s, both systems running at once; window {window} s after the first issuance settles",
        args.entries
    );
    let k = 600.0 / window as f64;
    println!(
        "  (both renew at about half life: the window holds the renewals of a 10-minute window at TTL {:.0} s, time compressed {k:.1}x; idle work such as entry syncs is not scaled)",
        ttl as f64 * k
    );
    let dir = root.join("rotation");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let mut systems = Vec::new();
    for kind in [Kind::Tether, Kind::Spire] {
        let mut sys = System::start(kind, &dir, bins, svid_cache, true)?;
        sys.register(bins, &specs(args.entries, "r", bins, ttl))?;
        sys.start_agent(bins)?;
        systems.push(sys);
    }
    for sys in &systems {
        sys.wait_issued(args.entries, Duration::from_secs(120))?;
    }
    let snapshot = |s: &System| (s.agent_cpu(), s.server_cpu(), s.issued());
    let before: Vec<_> = systems.iter().map(snapshot).collect();
    std::thread::sleep(Duration::from_secs(window));
    let after: Vec<_> = systems.iter().map(snapshot).collect();
    let d = |i: usize| (after[i].0 - before[i].0, after[i].1 - before[i].1, (after[i].2 - before[i].2) as f64);
    let (t, s) = (d(0), d(1));
    let mut agent = Metric::versus("cpu-spire", format!("agent_cpu_s_{window}s_ttl{ttl}"), "s", Better::Lower);
    agent.push(s.0, t.0);
    let mut server = Metric::versus("cpu-spire", format!("server_cpu_s_{window}s_ttl{ttl}"), "s", Better::Lower);
    server.push(s.1, t.1);
    let mut both = Metric::versus("cpu-spire", format!("agent+server_cpu_s_{window}s_ttl{ttl}"), "s", Better::Lower);
    both.push(s.0 + s.1, t.0 + t.1);
    let mut per = Metric::versus("cpu-spire", "agent+server_cpu_ms_per_renewal", "ms", Better::Lower);
    per.push((s.0 + s.1) * 1e3 / s.2.max(1.0), (t.0 + t.1) * 1e3 / t.2.max(1.0));
    for m in [agent, server, both, per] {
        m.print();
        metrics.push(m);
    }
    // The work done, not a ratio: Tether renews at half life less up to a tenth of jitter,
    // SPIRE at half life as seen by its 5-second sync, so Tether renews somewhat more often.
    let note = format!("renewals in the {window} s window: SPIRE {}, Tether {} (work done, not compared)", s.2, t.2);
    println!("cpu-spire {note}");
    println!(
        "{}",
        serde_json::json!({"bench": "cpu-spire", "metric": format!("renewals_in_{window}s"), "unit": "svid", "baseline": s.2, "value": t.2, "rounds": 1})
    );
    Ok(note)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_alternate_who_goes_first() {
        let firsts: Vec<Kind> = (0..8).map(|r| order(r)[0]).collect();
        use Kind::{Spire as S, Tether as T};
        assert_eq!(firsts, [T, S, S, T, T, S, S, T]);
    }

    #[test]
    fn dummies_never_select_the_client() {
        let d = dummies(1000, "w", 0);
        assert!(d.iter().all(|s| s.uid >= 100_000 && s.sha256.len() == 64));
        let ids: std::collections::BTreeSet<_> = d.iter().map(Spec::spiffe_id).collect();
        assert_eq!(ids.len(), 1000);
    }
}

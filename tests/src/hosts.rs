//! Agent-level enforcement worlds: "hosts" (network namespaces joined by a veth pair), each
//! with its own agent protecting its own test cgroups, one server. Shared by the enforcement
//! and attack tests; every flow is asserted at the receiver.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sandbox::{cgroup2_root, require_root, CgroupGuard, NetnsGuard};

use crate::{plane::Plane, wait_for, KillOnDrop};

/// The network workload binary (tests/src/bin/tether-test-flow.rs).
pub fn flow_bin() -> PathBuf {
    crate::agent_bin().with_file_name("tether-test-flow")
}

pub const A_ADDR: &str = "10.77.0.1";
pub const B_ADDR: &str = "10.77.0.2";

pub fn sha256(path: &str) -> String {
    crate::sha256sum(Path::new(path))
}

/// A cgroup path as selectors name it (relative to the cgroup2 root).
pub fn rel(cg: &CgroupGuard) -> String {
    format!("/{}", cg.path().strip_prefix(cgroup2_root().unwrap()).unwrap().display())
}

/// One node: a network namespace (the node's only one: the other host's namespace is another
/// node), a protected cgroup subtree, an agent.
pub struct Host {
    pub name: &'static str,
    pub ns: NetnsGuard,
    pub root: CgroupGuard,
    /// Further protected cgroups ([`HostOptions::extra_roots`]).
    pub extra_roots: Vec<CgroupGuard>,
    pub dir: PathBuf,
    pub node_id: String,
    pub pin_dir: PathBuf,
    pub agent: Option<KillOnDrop>,
    /// Agents started so far; agent N logs to agent-N.log.
    starts: u32,
}

/// How a host's agent is configured beyond the defaults.
#[derive(Default)]
pub struct HostOptions {
    /// More protected cgroups besides `root` (created as `<root-name>-N` at the top level).
    pub extra_roots: usize,
    /// Lines appended to the `[enforcement]` table.
    pub enforcement: String,
}

impl Host {
    pub fn new(name: &'static str, plane: &Plane, ns: NetnsGuard) -> Host {
        Self::with_options(name, plane, ns, HostOptions::default())
    }

    pub fn with_options(name: &'static str, plane: &Plane, ns: NetnsGuard, opts: HostOptions) -> Host {
        let root = CgroupGuard::new(&format!("enf-{name}")).unwrap();
        let extra: Vec<CgroupGuard> =
            (0..opts.extra_roots).map(|i| CgroupGuard::new(&format!("enf-{name}-{i}")).unwrap()).collect();
        let dir = plane.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let node_id = format!("spiffe://example.org/node/{name}");
        let token = plane.token(&node_id);
        // Unique per host and test: tests run in parallel in one process.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/tether-test-{}-{name}{n}", std::process::id()));
        let protected: Vec<String> =
            std::iter::once(&root).chain(&extra).map(|cg| format!("\"{}\"", cg.path().display())).collect();
        std::fs::write(
            dir.join("agent.toml"),
            format!(
                "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1:{}\"\ntrust_bundle_path = \"{}\"\njoin_token = \"{token}\"\ndata_dir = \"{}\"\nsocket_path = \"{}\"\nsync_interval_seconds = 1\n[enforcement]\nprotected_cgroups = [{}]\npolicy = \"{}\"\npin_dir = \"{}\"\naudit_interval_ms = 100\nnode_network_namespaces = [\"/run/netns/{}\"]\n{}",
                plane.port,
                plane.dir.path().join("server/bundle.pem").display(),
                dir.join("data").display(),
                dir.join("agent.sock").display(),
                protected.join(", "),
                dir.join("policy.toml").display(),
                pin_dir.display(),
                ns.name(),
                opts.enforcement,
            ),
        )
        .unwrap();
        Host { name, ns, root, extra_roots: extra, dir, node_id, pin_dir, agent: None, starts: 0 }
    }

    pub fn policy(&self, text: &str) {
        let tmp = self.dir.join("policy.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.join("policy.toml")).unwrap();
    }

    /// The log of the agent started last (each start writes its own file).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("agent-{}.log", self.starts))).unwrap_or_default()
    }

    pub fn audit(&self) -> String {
        std::fs::read_to_string(self.dir.join("data/audit.jsonl")).unwrap_or_default()
    }

    /// `tether-agent run` on this host's config, logging to the next `agent-N.log`.
    fn spawn_agent(&mut self) -> std::process::Child {
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("agent-{}.log", self.starts))).unwrap();
        Command::new(crate::agent_bin())
            .arg("run")
            .arg("-c")
            .arg(self.dir.join("agent.toml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    pub fn start_agent(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("agent.sock"));
        let child = self.spawn_agent();
        self.agent = Some(KillOnDrop(child));
        let sock = self.dir.join("agent.sock");
        wait_for(&format!("agent {}", self.name), || sock.exists().then_some(()));
    }

    /// Starts an agent that is expected to fail, and waits for it to exit (30 s at most).
    pub fn run_agent_to_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.spawn_agent();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the agent did not exit; its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, as a crash would: nothing is cleaned up.
    pub fn kill_agent(&mut self) {
        self.agent = None;
    }

    /// A workload: `tether-test-net ARGS` in cgroup `cg`, inside this host's namespace.
    pub fn spawn(&self, cg: &CgroupGuard, args: &[&str]) -> Workload {
        let mut cmd = self.ns.command(flow_bin().to_str().unwrap());
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::null());
        cg.place(&mut cmd).unwrap();
        Workload::start(crate::spawn_retrying(&mut cmd).unwrap())
    }

    pub fn run(&self, cg: &CgroupGuard, args: &[&str]) -> String {
        let mut cmd = self.ns.command(flow_bin().to_str().unwrap());
        cmd.args(args);
        String::from_utf8_lossy(&cg.run(&mut cmd).unwrap().stdout).into_owned()
    }

    pub fn wait_identity(&self, spiffe_id: &str) {
        let needle = format!("identity={spiffe_id}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log().lines().any(|l| l.contains("enforcement identity published") && l.contains(&needle)) {
            assert!(Instant::now() < deadline, "{} never published {spiffe_id}; its log:\n{}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.agent = None;
        // Enforcement outlives agents by design: the test removes its pins itself.
        let _ = tether_agent::ebpf::Enforcer::detach_pinned(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// A running workload whose output lines are collected.
pub struct Workload {
    pub _child: KillOnDrop,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Workload {
    pub fn start(mut child: Child) -> Workload {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Workload { _child: KillOnDrop(child), lines }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn count(&self, prefix: &str) -> usize {
        self.lines().iter().filter(|l| l.starts_with(prefix)).count()
    }

    pub fn wait_line(&self, prefix: &str) -> String {
        wait_for(&format!("a line starting with {prefix:?}"), || {
            self.lines().into_iter().find(|l| l.starts_with(prefix))
        })
    }
}

pub struct World {
    pub plane: Plane,
    pub a: Host,
    pub b: Host,
}

/// Server, two hosts linked by veth, entries for web and db on A and api on B (each selected
/// by cgroup, uid and the workload binary's sha256), and the policies.
pub fn world() -> World {
    world_with(HostOptions::default())
}

/// As [`world`], host A configured with `a`.
pub fn world_with(a: HostOptions) -> World {
    require_root().unwrap();
    let plane = Plane::server_only("");
    let ns_a = NetnsGuard::new("enf-a").unwrap();
    let ns_b = NetnsGuard::new("enf-b").unwrap();
    ns_a.link(&format!("{A_ADDR}/24"), &ns_b, &format!("{B_ADDR}/24")).unwrap();
    let a = Host::with_options("a", &plane, ns_a, a);
    let b = Host::new("b", &plane, ns_b);
    World { plane, a, b }
}

/// web and db registered on host A, A's policy in place, its agent running, db serving 5432
/// and both identities published (web's through a warm-up process: the agent publishes an
/// identity within its scan interval after an exec, and a connect before that is refused).
pub struct WebDb {
    pub web: CgroupGuard,
    pub db: CgroupGuard,
    pub server: Workload,
    pub warm: Workload,
}

impl World {
    /// Sets up [`WebDb`] on host A with `policy`.
    pub fn web_and_db(&mut self, policy: &str) -> WebDb {
        let (web, db) = (self.a.root.child("web").unwrap(), self.a.root.child("db").unwrap());
        self.register(&self.a, &web, "spiffe://example.org/web");
        self.register(&self.a, &db, "spiffe://example.org/db");
        self.a.policy(policy);
        self.a.start_agent();
        let server = self.a.spawn(&db, &["serve", "5432"]);
        server.wait_line("listening");
        self.a.wait_identity("spiffe://example.org/db");
        let warm = self.a.spawn(&web, &["serve", "7001"]);
        warm.wait_line("listening");
        self.a.wait_identity("spiffe://example.org/web");
        WebDb { web, db, server, warm }
    }

    /// An entry for `spiffe_id` under `host`'s node: the workload in `cg`, as root, running
    /// the network workload binary.
    pub fn register(&self, host: &Host, cg: &CgroupGuard, spiffe_id: &str) {
        let bin = flow_bin();
        self.plane.entry_under(
            &host.node_id,
            spiffe_id,
            &[
                &format!("cgroup:path:{}", rel(cg)),
                "unix:uid:0",
                &format!("unix:sha256:{}", sha256(bin.to_str().unwrap())),
            ],
            &[],
        );
    }
}

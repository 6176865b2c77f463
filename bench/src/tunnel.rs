//! B7: cross-node tunnels, three arms in the same run on veth paths between two network
//! namespaces ("hosts"), the order alternating from round to round:
//! - `plain`: the client connects straight to the server over the veth (the floor);
//! - `stunnel`: stunnel4 from Debian on both hosts, TLS 1.3 with TLS_AES_128_GCM_SHA256 and
//!   X25519, mutual authentication with P-256 certificates (a CA and two leaves made here);
//!   the client connects to its host's stunnel, which connects to the other host's;
//! - `tether`: a tether-server and two agents (enforcement + tunnel), client and server as
//!   attested workloads in protected cgroups; the client connects to the server's address,
//!   the kernel captures it into the tunnel: HTTP/2 CONNECT over mutual TLS 1.3 with the
//!   same suite and group, P-256 SVIDs.
//!
//! Each arm has its own pair of namespaces (made once, for the whole run), so nothing one
//! arm leaves behind slows another. The same client and server programs (this binary) run
//! in every arm. Measured per round: bulk throughput over one stream and over several,
//! 1-byte request/response latency (p50, p99) over one connection, new connections per
//! second (connect, one byte each way, close: a connection that only reached the local
//! tunnel end would count nothing), and CPU seconds per GB on both ends for the tunnel
//! processes (stunnel's two, Tether's two agents; from /proc/<pid>/stat over the bulk
//! transfers).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use sandbox::{require_root, CgroupGuard, NetnsGuard};

use crate::{
    procs::{die_with_parent, percentile, wait_for, Proc},
    report::{median, Better, Metric},
};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Bulk bytes per round and arm (split over the streams when there are several).
    #[arg(long, default_value_t = 512 << 20)]
    bulk_bytes: u64,
    /// Streams of the multi-stream bulk measurement.
    #[arg(long, default_value_t = 4)]
    streams: u32,
    /// 1-byte exchanges per round and arm.
    #[arg(long, default_value_t = 10000)]
    exchanges: u32,
    /// New connections per round and arm.
    #[arg(long, default_value_t = 2000)]
    connections: u32,
}

const APP_PORT: u16 = 9100;
const STUNNEL_LOCAL: u16 = 9200;
const STUNNEL_REMOTE: u16 = 9300;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arm {
    Plain,
    Stunnel,
    Tether,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::Plain => "plain",
            Arm::Stunnel => "stunnel",
            Arm::Tether => "tether",
        }
    }
}

fn order(round: usize) -> [Arm; 3] {
    let mut o = [Arm::Plain, Arm::Stunnel, Arm::Tether];
    if round % 2 == 1 {
        o.reverse();
    }
    o
}

// ---- The workload programs (this binary, `tunnel-client` / `tunnel-server`).

/// Client modes; prints one line of numbers.
/// - `bulk STREAMS BYTES`: STREAMS connections at once, BYTES in all, each half-closed and
///   answered with the count its server read: elapsed ns.
/// - `rr COUNT`: one connection, COUNT 1-byte exchanges: `p50_ns p99_ns elapsed_ns`.
/// - `conn COUNT`: COUNT times connect, 1 byte each way, close: elapsed ns.
pub fn client(mode: &str, addr: SocketAddrV4, a: u64, b: u64) -> Result<()> {
    let start = Instant::now();
    match mode {
        "bulk" => {
            let streams = a.max(1);
            let per = b / streams;
            let threads: Vec<_> =
                (0..streams).map(|_| std::thread::spawn(move || crate::procs::send_counted(addr, per))).collect();
            for t in threads {
                t.join().map_err(|_| anyhow::anyhow!("a bulk stream panicked"))??;
            }
            println!("{}", start.elapsed().as_nanos());
        }
        "rr" => {
            let mut s = TcpStream::connect(addr).context("connect")?;
            s.set_nodelay(true)?;
            let mut byte = [0u8; 1];
            // A few exchanges first: the tunnel's first stream on a pooled connection, caches.
            for _ in 0..100 {
                s.write_all(b"x")?;
                s.read_exact(&mut byte)?;
            }
            let mut lat = Vec::with_capacity(a as usize);
            let t0 = Instant::now();
            for _ in 0..a {
                let t = Instant::now();
                s.write_all(b"x")?;
                s.read_exact(&mut byte)?;
                lat.push(t.elapsed().as_nanos() as f64);
            }
            let total = t0.elapsed().as_nanos();
            println!("{} {} {total}", percentile(&lat, 0.5), percentile(&lat, 0.99));
        }
        "conn" => {
            let mut byte = [0u8; 1];
            for _ in 0..a {
                let mut s = TcpStream::connect(addr).context("connect")?;
                s.set_nodelay(true)?;
                s.write_all(b"x")?;
                s.read_exact(&mut byte)?;
            }
            println!("{}", start.elapsed().as_nanos());
        }
        other => bail!("unknown mode {other}"),
    }
    Ok(())
}

/// The server: per connection, echo single bytes until EOF, or (after the first read of
/// more than one byte) sink everything and answer with the count. Says `ready`.
pub fn server(addr: SocketAddrV4) -> Result<()> {
    let l = crate::procs::listen_deep(addr)?;
    println!("ready");
    std::io::stdout().flush()?;
    for conn in l.incoming() {
        let mut s = conn?;
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(1) if total == 0 => {
                        if s.write_all(&buf[..1]).is_err() {
                            return;
                        }
                    }
                    Ok(n) => total += n as u64,
                }
                if total > 0 {
                    while let Ok(n @ 1..) = s.read(&mut buf) {
                        total += n as u64;
                    }
                    let _ = writeln!(s, "{total}");
                    return;
                }
            }
        });
    }
    Ok(())
}

// ---- The arms' worlds.

/// Two hosts joined by a veth pair.
struct Hosts {
    client: NetnsGuard,
    server: NetnsGuard,
    client_addr: Ipv4Addr,
    server_addr: Ipv4Addr,
}

impl Hosts {
    fn new(name: &str, net: u8) -> Result<Hosts> {
        let client = NetnsGuard::new(&format!("b7-{name}-c"))?;
        let server = NetnsGuard::new(&format!("b7-{name}-s"))?;
        let (client_addr, server_addr) = (Ipv4Addr::new(10, 81, net, 1), Ipv4Addr::new(10, 81, net, 2));
        client.link(&format!("{client_addr}/24"), &server, &format!("{server_addr}/24"))?;
        Ok(Hosts { client, server, client_addr, server_addr })
    }
}

fn exe() -> Result<String> {
    Ok(std::env::current_exe()?.to_str().context("bench path is not UTF-8")?.to_owned())
}

/// A process in a namespace (and cgroup), killed with the bench; stdout lines readable.
fn spawn(ns: &NetnsGuard, cg: Option<&CgroupGuard>, program: &str, args: &[&str], log: &Path) -> Result<Proc> {
    let mut cmd = ns.command(program);
    cmd.args(args).stdout(Stdio::piped()).stderr(std::fs::File::create(log)?);
    if let Some(cg) = cg {
        cg.place(&mut cmd)?;
    }
    die_with_parent(&mut cmd);
    Ok(Proc(cmd.spawn().with_context(|| format!("starting {program}"))?))
}

fn start_server(ns: &NetnsGuard, cg: Option<&CgroupGuard>, addr: SocketAddrV4, dir: &Path) -> Result<Proc> {
    let mut p = spawn(ns, cg, &exe()?, &["tunnel-server", "--addr", &addr.to_string()], &dir.join("app-server.log"))?;
    let out = p.0.stdout.take().context("server stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("the bench server did not start: {line:?}");
    }
    Ok(p)
}

fn run_client(
    ns: &NetnsGuard,
    cg: Option<&CgroupGuard>,
    mode: &str,
    addr: SocketAddrV4,
    a: u64,
    b: u64,
) -> Result<String> {
    let mut cmd = ns.command(&exe()?);
    cmd.args([
        "tunnel-client",
        "--mode",
        mode,
        "--addr",
        &addr.to_string(),
        "--a",
        &a.to_string(),
        "--b",
        &b.to_string(),
    ]);
    let out = match cg {
        Some(cg) => cg.run(&mut cmd)?,
        None => cmd.output()?,
    };
    if !out.status.success() {
        bail!("{mode} client to {addr} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// CPU seconds (user + system, all threads) of a process so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime: fields 14 and 15 of stat, 12 and 13 after the name.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// An arm: where its client connects, the processes carrying the tunnel (for CPU), and
/// what keeps it running.
struct World {
    arm: Arm,
    hosts: Hosts,
    /// Where the client dials.
    target: SocketAddrV4,
    /// The client's cgroup (Tether: a protected one), if any.
    client_cg: Option<CgroupGuard>,
    tunnel_pids: Vec<u32>,
    _procs: Vec<Proc>,
    _keep: Vec<Box<dyn std::any::Any>>,
}

impl World {
    fn client(&self, mode: &str, a: u64, b: u64) -> Result<String> {
        run_client(&self.hosts.client, self.client_cg.as_ref(), mode, self.target, a, b)
    }

    fn tunnel_cpu(&self) -> f64 {
        self.tunnel_pids.iter().map(|p| cpu_seconds(*p)).sum()
    }
}

fn plain(dir: &Path) -> Result<World> {
    let hosts = Hosts::new("plain", 1)?;
    let target = SocketAddrV4::new(hosts.server_addr, APP_PORT);
    let server = start_server(&hosts.server, None, target, dir)?;
    Ok(World {
        arm: Arm::Plain,
        hosts,
        target,
        client_cg: None,
        tunnel_pids: vec![],
        _procs: vec![server],
        _keep: vec![],
    })
}

/// A P-256 CA and two leaves (client, server), PEM files in `dir`.
fn stunnel_pki(dir: &Path) -> Result<()> {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, "bench CA");
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca = rcgen::CertifiedIssuer::self_signed(p, ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    for name in ["client", "server"] {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = rcgen::CertificateParams::new(vec![format!("{name}.bench")])?;
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &ca)?;
        std::fs::write(dir.join(format!("{name}.pem")), format!("{}{}", cert.pem(), key.serialize_pem()))?;
    }
    Ok(())
}

fn stunnel_conf(dir: &Path, name: &str, client: bool, accept: SocketAddrV4, connect: SocketAddrV4) -> Result<PathBuf> {
    let path = dir.join(format!("stunnel-{name}.conf"));
    std::fs::write(
        &path,
        format!(
            "foreground = yes\npid =\ndebug = 3\noutput = {}\n\
             socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n\
             [b7]\nclient = {}\naccept = {accept}\nconnect = {connect}\n\
             cert = {}\nCAfile = {}\nverifyChain = yes\nrequireCert = yes\n\
             sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3\nciphersuites = TLS_AES_128_GCM_SHA256\ncurves = X25519\n",
            dir.join(format!("stunnel-{name}.log")).display(),
            if client { "yes" } else { "no" },
            dir.join(format!("{name}.pem")).display(),
            dir.join("ca.pem").display(),
        ),
    )?;
    Ok(path)
}

fn stunnel(dir: &Path) -> Result<World> {
    let hosts = Hosts::new("stunnel", 2)?;
    stunnel_pki(dir)?;
    let app = SocketAddrV4::new(Ipv4Addr::LOCALHOST, APP_PORT);
    let server = start_server(&hosts.server, None, app, dir)?;
    let remote = SocketAddrV4::new(hosts.server_addr, STUNNEL_REMOTE);
    let local = SocketAddrV4::new(Ipv4Addr::LOCALHOST, STUNNEL_LOCAL);
    let s_conf = stunnel_conf(dir, "server", false, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, STUNNEL_REMOTE), app)?;
    let c_conf = stunnel_conf(dir, "client", true, local, remote)?;
    let s = spawn(
        &hosts.server,
        None,
        "stunnel4",
        &[s_conf.to_str().unwrap_or_default()],
        &dir.join("stunnel-server.out"),
    )?;
    let c = spawn(
        &hosts.client,
        None,
        "stunnel4",
        &[c_conf.to_str().unwrap_or_default()],
        &dir.join("stunnel-client.out"),
    )?;
    let listening = |ns: &NetnsGuard, port: u16| {
        ns.run_in(|| std::fs::read_to_string("/proc/thread-self/net/tcp"))
            .ok()
            .and_then(|r| r.ok())
            .is_some_and(|t| t.lines().any(|l| l.contains(&format!(":{port:04X} 00000000:0000 0A"))))
    };
    wait_for("stunnel to listen", || {
        listening(&hosts.server, STUNNEL_REMOTE) && listening(&hosts.client, STUNNEL_LOCAL)
    })?;
    let pids = vec![s.pid(), c.pid()];
    Ok(World {
        arm: Arm::Stunnel,
        hosts,
        target: local,
        client_cg: None,
        tunnel_pids: pids,
        _procs: vec![server, s, c],
        _keep: vec![],
    })
}

/// Removes an agent's pins when the bench ends (enforcement outlives agents by design).
struct Unpin(PathBuf);

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = tether_agent::ebpf::Enforcer::detach_pinned(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn output_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tether(dir: &Path) -> Result<World> {
    let hosts = Hosts::new("tether", 3)?;
    let bin = std::env::current_exe()?.parent().context("exe dir")?.to_path_buf();
    let (server_bin, agent_bin) = (bin.join("tether-server"), bin.join("tether-agent"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let sdir = dir.join("server");
    std::fs::create_dir_all(&sdir)?;
    let server_conf = dir.join("server.toml");
    std::fs::write(
        &server_conf,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\nbind_address = \"127.0.0.1:{port}\"\nadmin_socket = \"{}\"\n",
            sdir.display(),
            dir.join("admin.sock").display()
        ),
    )?;
    let mut cmd = Command::new(&server_bin);
    cmd.args(["run", "-c"])
        .arg(&server_conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("server.log"))?);
    die_with_parent(&mut cmd);
    let server = Proc(cmd.spawn().context("starting tether-server")?);
    let admin = dir.join("admin.sock");
    wait_for("the tether server", || admin.exists() && TcpStream::connect(("127.0.0.1", port)).is_ok())?;
    let cli = |args: &[&str]| output_ok(Command::new(&server_bin).arg("-c").arg(&server_conf).args(args));
    let root = CgroupGuard::new("b7-tether")?;
    let (ccg, scg) = (root.child("client")?, root.child("server")?);
    let rel = |cg: &CgroupGuard| -> Result<String> {
        Ok(format!("/{}", cg.path().strip_prefix(sandbox::cgroup2_root()?)?.display()))
    };
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"b7\"\nfrom = { spiffe_id = \"spiffe://example.org/b7/client\" }\nto = { spiffe_id = \"spiffe://example.org/b7/server\" }\n",
    )?;
    let mut agents = Vec::new();
    let mut unpins: Vec<Box<dyn std::any::Any>> = Vec::new();
    for (name, ns, addr, cg, workload) in [
        ("a", &hosts.client, hosts.client_addr, &ccg, "client"),
        ("b", &hosts.server, hosts.server_addr, &scg, "server"),
    ] {
        let node = format!("spiffe://example.org/b7/node/{name}");
        let token = cli(&["token", "generate", "--node-id", &node])?;
        let token = token.trim().trim_start_matches("Token: ").trim().to_owned();
        cli(&[
            "entry",
            "create",
            "--spiffe-id",
            &format!("spiffe://example.org/b7/{workload}"),
            "--parent-id",
            &node,
            "--selector",
            &format!("cgroup:path:{}", rel(cg)?),
            "--selector",
            "unix:uid:0",
        ])?;
        let adir = dir.join(name);
        std::fs::create_dir_all(&adir)?;
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/tether-bench-b7-{}-{name}", std::process::id()));
        unpins.push(Box::new(Unpin(pin_dir.clone())));
        let conf = adir.join("agent.toml");
        std::fs::write(
            &conf,
            format!(
                "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1:{port}\"\ntrust_bundle_path = \"{}\"\njoin_token = \"{token}\"\ndata_dir = \"{}\"\nsocket_path = \"{}\"\nsync_interval_seconds = 1\n\
                 [enforcement]\nprotected_cgroups = [\"{}\"]\npolicy = \"{}\"\npin_dir = \"{}\"\nnode_network_namespaces = [\"/run/netns/{}\"]\n\
                 [tunnel]\nnetwork_namespace = \"/run/netns/{}\"\naddress = \"{addr}\"\n",
                sdir.join("bundle.pem").display(),
                adir.join("data").display(),
                adir.join("agent.sock").display(),
                cg.path().display(),
                policy.display(),
                pin_dir.display(),
                ns.name(),
                ns.name(),
            ),
        )?;
        let mut cmd = Command::new(&agent_bin);
        cmd.args(["run", "-c"])
            .arg(&conf)
            .env("RUST_LOG", std::env::var("TETHER_BENCH_AGENT_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(adir.join("agent.log"))?);
        die_with_parent(&mut cmd);
        agents.push(Proc(cmd.spawn().context("starting tether-agent")?));
    }
    let target = SocketAddrV4::new(hosts.server_addr, APP_PORT);
    let app = start_server(&hosts.server, Some(&scg), target, dir)?;
    // A client process that stays: identities are published for running processes, so the
    // measured clients (same binary, cgroup and uid) have theirs from their first connect.
    let idle = spawn(
        &hosts.client,
        Some(&ccg),
        &exe()?,
        &["tunnel-server", "--addr", "127.0.0.1:9999"],
        &dir.join("idle.log"),
    )?;
    let log = |n: &str| std::fs::read_to_string(dir.join(n).join("agent.log")).unwrap_or_default();
    wait_for("both identities and the capture of the server", || {
        log("a").contains("identity=spiffe://example.org/b7/client")
            && log("b").contains("identity=spiffe://example.org/b7/server")
            && log("a").lines().any(|l| l.contains("remote workloads in the capture table services=1"))
    })
    .with_context(|| format!("agent a:\n{}\nagent b:\n{}", log("a"), log("b")))?;
    let pids = agents.iter().map(Proc::pid).collect();
    let mut procs = vec![app, idle];
    procs.extend(agents);
    procs.push(server);
    // Agents first, then pins (Unpin after them), then the cgroups.
    let mut keep: Vec<Box<dyn std::any::Any>> = unpins;
    // (A cgroup guard dropped ends the processes in it: the server's stays with the arm.)
    keep.push(Box::new(scg));
    keep.push(Box::new(root));
    Ok(World { arm: Arm::Tether, hosts, target, client_cg: Some(ccg), tunnel_pids: pids, _procs: procs, _keep: keep })
}

/// One round of one arm.
struct Sample {
    one_stream: f64,
    multi_stream: f64,
    rr_p50_us: f64,
    rr_p99_us: f64,
    conn_per_s: f64,
    cpu_s_per_gb: f64,
}

fn measure(w: &World, args: &Args) -> Result<Sample> {
    let mb = |bytes: u64, ns: &str| -> Result<f64> { Ok(bytes as f64 / 1e6 / (ns.parse::<f64>()? / 1e9)) };
    let cpu0 = w.tunnel_cpu();
    let one = w.client("bulk", 1, args.bulk_bytes)?;
    let multi = w.client("bulk", u64::from(args.streams), args.bulk_bytes)?;
    let cpu = w.tunnel_cpu() - cpu0;
    let rr = w.client("rr", u64::from(args.exchanges), 0)?;
    let f: Vec<f64> = rr.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    let conn = w.client("conn", u64::from(args.connections), 0)?;
    let gb = 2.0 * args.bulk_bytes as f64 / 1e9;
    Ok(Sample {
        one_stream: mb(args.bulk_bytes, &one)?,
        multi_stream: mb(args.bulk_bytes, &multi)?,
        rr_p50_us: f.first().copied().unwrap_or(f64::NAN) / 1e3,
        rr_p99_us: f.get(1).copied().unwrap_or(f64::NAN) / 1e3,
        conn_per_s: f64::from(args.connections) / (conn.parse::<f64>()? / 1e9),
        cpu_s_per_gb: cpu / gb,
    })
}

pub fn run(args: &Args) -> Result<()> {
    require_root()?;
    let root = tempfile::Builder::new().prefix("tether-bench-tunnel-").tempdir()?;
    // TETHER_BENCH_KEEP=1 keeps the logs (agents, stunnel, servers) for a look afterwards.
    let (root_path, _root) = if std::env::var_os("TETHER_BENCH_KEEP").is_some() {
        let p = root.keep();
        println!("logs kept in {}", p.display());
        (p, None)
    } else {
        (root.path().to_owned(), Some(root))
    };
    let dirs: Vec<PathBuf> = ["plain", "stunnel", "tether"].iter().map(|n| root_path.join(n)).collect();
    for d in &dirs {
        std::fs::create_dir_all(d)?;
    }
    let version = Command::new("stunnel4").arg("-version").output().map(|o| {
        let text = String::from_utf8_lossy(&o.stderr).into_owned();
        let line = text.lines().find(|l| l.starts_with("stunnel ")).unwrap_or("stunnel4");
        line.split(" on ").next().unwrap_or_default().to_owned()
    })?;
    println!(
        "B7 tunnels on veth between two namespaces: plain TCP (the floor) vs {version} vs Tether, TLS 1.3 \
         TLS_AES_128_GCM_SHA256 + X25519, mutual P-256 certificates on both; {} rounds, arms alternating",
        args.rounds
    );
    let worlds = [plain(&dirs[0])?, stunnel(&dirs[1])?, tether(&dirs[2])?];
    // Warm-up: caches, the tunnel's pooled connection, page cache. Tether's workloads are
    // identified again once their binary's measurement is in (the first identification
    // does not wait for it): a few tries until an arm runs clean.
    for w in &worlds {
        let warm = Args { bulk_bytes: 32 << 20, exchanges: 500, connections: 100, ..*args };
        let mut tries = 0;
        while let Err(e) = measure(w, &warm) {
            tries += 1;
            if tries == 20 {
                return Err(e.context(format!("warming up {}", w.arm.name())));
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
    let mut samples: Vec<(Arm, Sample)> = Vec::new();
    for round in 0..args.rounds {
        for arm in order(round) {
            let w = worlds.iter().find(|w| w.arm == arm).context("arm")?;
            let s = measure(w, args).with_context(|| format!("round {round}, {}", arm.name()))?;
            println!(
                "round {round} {:<8} 1 stream {:>7.0} MB/s, {} streams {:>7.0} MB/s, rr p50 {:>6.1} us p99 {:>6.1} us, {:>6.0} conn/s, {:.2} CPU s/GB",
                arm.name(),
                s.one_stream,
                args.streams,
                s.multi_stream,
                s.rr_p50_us,
                s.rr_p99_us,
                s.conn_per_s,
                s.cpu_s_per_gb
            );
            samples.push((arm, s));
        }
    }
    let of = |arm: Arm| samples.iter().filter(move |(a, _)| *a == arm).map(|(_, s)| s);
    let pairs = |f: fn(&Sample) -> f64, base: Arm, value: Arm| -> Vec<(f64, f64)> {
        of(base).map(f).zip(of(value).map(f)).collect()
    };
    let versus = |name: &str, unit: &'static str, better: Better, f: fn(&Sample) -> f64, base: Arm| {
        let mut m = Metric::versus("B7", format!("{name}, tether vs {}", base.name()), unit, better);
        for (b, v) in pairs(f, base, Arm::Tether) {
            m.push(b, v);
        }
        m
    };
    let multi_name = format!("throughput, {} streams", args.streams);
    let metrics = [
        versus("throughput, 1 stream", "MB/s", Better::Higher, |s| s.one_stream, Arm::Stunnel),
        versus(&multi_name, "MB/s", Better::Higher, |s| s.multi_stream, Arm::Stunnel),
        versus("new connections", "conn/s", Better::Higher, |s| s.conn_per_s, Arm::Stunnel),
        versus("1-byte rr p50", "us", Better::Lower, |s| s.rr_p50_us, Arm::Stunnel),
        versus("1-byte rr p99", "us", Better::Lower, |s| s.rr_p99_us, Arm::Stunnel),
        versus("CPU per GB, both ends", "s/GB", Better::Lower, |s| s.cpu_s_per_gb, Arm::Stunnel),
        versus("throughput, 1 stream", "MB/s", Better::Higher, |s| s.one_stream, Arm::Plain),
        versus(&multi_name, "MB/s", Better::Higher, |s| s.multi_stream, Arm::Plain),
        versus("new connections", "conn/s", Better::Higher, |s| s.conn_per_s, Arm::Plain),
        versus("1-byte rr p99", "us", Better::Lower, |s| s.rr_p99_us, Arm::Plain),
    ];
    println!();
    for m in &metrics {
        m.print();
    }
    // Added latency per hop (two hops: the client's tunnel end and the server's).
    for arm in [Arm::Stunnel, Arm::Tether] {
        let added: Vec<f64> = pairs(|s| s.rr_p99_us, Arm::Plain, arm).iter().map(|(p, v)| (v - p) / 2.0).collect();
        let p50: Vec<f64> = pairs(|s| s.rr_p50_us, Arm::Plain, arm).iter().map(|(p, v)| (v - p) / 2.0).collect();
        println!(
            "B7 {:<8} added latency per hop over plaintext: p50 {:.1} us, p99 {:.1} us (median of rounds; target p99 <= 100 us)",
            arm.name(),
            median(&p50),
            median(&added)
        );
        println!(
            "{}",
            serde_json::json!({
                "bench": "B7",
                "metric": format!("added 1-byte rr p99 per hop over plaintext, {}", arm.name()),
                "unit": "us",
                "value": median(&added),
                "p50_value": median(&p50),
                "rounds": added.len(),
            })
        );
    }
    for arm in [Arm::Stunnel, Arm::Tether] {
        let cpu: Vec<f64> = of(arm).map(|s| s.cpu_s_per_gb).collect();
        println!("B7 {:<8} CPU seconds per GB carried, both tunnel ends together: {:.2}", arm.name(), median(&cpu));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arms_alternate() {
        assert_eq!(order(0), [Arm::Plain, Arm::Stunnel, Arm::Tether]);
        assert_eq!(order(1), [Arm::Tether, Arm::Stunnel, Arm::Plain]);
    }

    #[test]
    fn cpu_of_this_process_is_read() {
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_add(1);
        }
        assert!(x > 0 && cpu_seconds(std::process::id()) > 0.0);
    }
}

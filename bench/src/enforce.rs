//! B1–B3: what in-kernel enforcement costs, three arms measured in the same run, their order
//! alternating from round to round (none, floor, tether, then tether, floor, none):
//! - `none`: no programs attached;
//! - `floor`: the same seven hooks with programs that only allow — what the hook set costs by
//!   itself, before any of Tether's logic;
//! - `tether`: the real enforcement programs, with identities for the client and server
//!   workloads and a policy that allows the measured flows.
//!
//! Every arm starts its servers after its programs are attached, so listening sockets are
//! stamped and recorded as a protected workload's are in production, and stops them before
//! the next arm. Each arm runs in network namespaces of its own, made for it and deleted
//! after it: one is "this node", a second joined to it by a veth pair plays another host.
//! Nothing an arm leaves behind (sockets in TIME_WAIT or being retransmitted, listen queues)
//! can slow the next one, whatever the order.
//!
//! - B1: connect()+close() from an attested process, identity to identity on this node
//!   (loopback; the FLOWS path) and by address to the other namespace (the EGRESS path); and
//!   the total BPF time per connect over every hook, from `BPF_ENABLE_STATS`, for Tether and
//!   for the floor.
//! - B2: between two attested workloads on this node: 1-byte request/response over one
//!   connection, and a bulk stream.
//! - B3: connect() from a process with no identity, refused in the kernel: Tether's refusal
//!   against a connect4 program that only refuses (the cheapest in-kernel refusal), and the
//!   connections that reached the listener (must be 0).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use sandbox::{require_root, CgroupGuard, NetnsGuard};
use tether_agent::{
    cgroup::Cgroup,
    ebpf::{Enforcer, Floor},
    process::FileId,
};
use tether_common::{drop_reason, CidrKey, FlowKey, IdentityKey, RuleRef};

use crate::report::Metric;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// connect()+close() per round, arm and destination.
    #[arg(long, default_value_t = 5000)]
    connects: u32,
    /// Request/response exchanges per round and arm.
    #[arg(long, default_value_t = 20000)]
    exchanges: u32,
    /// Bulk bytes per round and arm.
    #[arg(long, default_value_t = 512 * 1024 * 1024)]
    bulk_bytes: u64,
    /// Refused connects per round and arm (B3).
    #[arg(long, default_value_t = 2000)]
    refusals: u32,
}

const CLIENT: u32 = 0x100;
const SERVER: u32 = 0x200;

/// This node's address on the veth pair, and the other host's.
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 1);
const REMOTE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 2);

const PORT_CONNECT: u16 = 7101;
const PORT_RR: u16 = 7102;
const PORT_BULK: u16 = 7103;
const PORT_REMOTE: u16 = 7104;
const PORT_REFUSED: u16 = 7105;

/// Inside a cgroup and namespace: one workload loop, printing elapsed nanoseconds.
pub fn client(mode: &str, addr: SocketAddrV4, count: u64) -> Result<()> {
    let start = Instant::now();
    match mode {
        "connect" => {
            for _ in 0..count {
                let s = TcpStream::connect(addr).context("connect")?;
                // RST on close: no TIME_WAIT, so the loop never waits on ephemeral ports.
                socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
            }
        }
        "refused" => {
            // Every connect must be refused with EPERM; anything else is a leak or an error.
            for _ in 0..count {
                match TcpStream::connect(addr) {
                    Ok(_) => bail!("a connect succeeded"),
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                    Err(e) => bail!("refused with {e}, not EPERM"),
                }
            }
        }
        "rr" => {
            let mut s = TcpStream::connect(addr).context("connect")?;
            s.set_nodelay(true)?;
            let mut b = [0u8; 1];
            for _ in 0..count {
                s.write_all(b"x")?;
                s.read_exact(&mut b)?;
            }
        }
        // The server answers with the byte count it read: all of it arrived.
        "bulk" => crate::procs::send_counted(addr, count)?,
        other => bail!("unknown mode {other}"),
    }
    println!("{}", start.elapsed().as_nanos());
    Ok(())
}

/// A server: accept-and-close (connect), echo (rr), sink (bulk) or count (refused: prints
/// "accepted" per connection that reached it). Says "ready" once listening.
pub fn server(mode: &str, addr: SocketAddrV4) -> Result<()> {
    let l = crate::procs::listen_deep(addr)?;
    println!("ready");
    std::io::stdout().flush()?;
    for conn in l.incoming() {
        let mut s = conn?;
        match mode {
            // Accept and close inline: a thread per connection would make the server, not the
            // hooks, the bottleneck.
            "connect" => drop(s),
            "refused" => {
                println!("accepted");
                std::io::stdout().flush()?;
            }
            "rr" => {
                std::thread::spawn(move || {
                    let _ = s.set_nodelay(true);
                    let mut b = [0u8; 1];
                    while let Ok(1) = s.read(&mut b) {
                        if s.write_all(&b).is_err() {
                            break;
                        }
                    }
                });
            }
            "bulk" => {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut total = 0u64;
                    while let Ok(n @ 1..) = s.read(&mut buf) {
                        total += n as u64;
                    }
                    let _ = writeln!(s, "{total}");
                });
            }
            other => bail!("unknown mode {other}"),
        }
    }
    Ok(())
}

/// A bench process (client or server) in a cgroup and a namespace.
fn bench_command(ns: &NetnsGuard, args: &[&str]) -> Result<Command> {
    let exe = std::env::current_exe()?;
    let mut cmd = ns.command(exe.to_str().context("bench path is not UTF-8")?);
    cmd.args(args);
    Ok(cmd)
}

fn run_client(ns: &NetnsGuard, cg: &CgroupGuard, mode: &str, addr: SocketAddrV4, count: u64) -> Result<f64> {
    let mut cmd = bench_command(
        ns,
        &["enforce-client", "--mode", mode, "--addr", &addr.to_string(), "--count", &count.to_string()],
    )?;
    let out = cg.run(&mut cmd)?;
    if !out.status.success() {
        bail!("{mode} client to {addr} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout).trim().parse::<f64>().context("client output")
}

/// A running server, killed when dropped; its output lines after "ready" are readable.
struct Server {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Server {
    fn start(ns: &NetnsGuard, cg: Option<&CgroupGuard>, mode: &str, addr: SocketAddrV4) -> Result<Server> {
        let mut cmd = bench_command(ns, &["enforce-server", "--mode", mode, "--addr", &addr.to_string()])?;
        cmd.stdout(Stdio::piped());
        if let Some(cg) = cg {
            cg.place(&mut cmd)?;
        }
        let mut child = cmd.spawn()?;
        let out = child.stdout.take().context("server stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        // No probe connect: once enforcement is on, it would be judged like any other.
        match lines.recv_timeout(Duration::from_secs(10)) {
            Ok(l) if l == "ready" => Ok(Server { child, lines }),
            other => {
                let _ = child.kill();
                bail!("{mode} server on {addr} did not start: {other:?}")
            }
        }
    }

    /// Lines printed since the last call.
    fn drain(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn key(cg: &CgroupGuard) -> Result<IdentityKey> {
    let exe = std::fs::canonicalize(std::env::current_exe()?)?;
    Ok(IdentityKey {
        cgroup_id: cg.id()?,
        exe: FileId::from_metadata(&std::fs::metadata(exe)?).key(),
        euid: 0,
        egid: 0,
    })
}

/// ListenOverflows from /proc/net/netstat of a namespace: a nonzero delta means SYN
/// retransmits (1 s each) distorted an arm.
fn listen_overflows(ns: &NetnsGuard) -> u64 {
    // thread-self: the reading thread is the one that joined the namespace.
    let text = ns.run_in(|| std::fs::read_to_string("/proc/thread-self/net/netstat")).ok().and_then(|r| r.ok());
    let text = text.unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    if let [names, values] = lines[..] {
        let i = names.split_whitespace().position(|n| n == "ListenOverflows");
        if let Some(v) = i.and_then(|i| values.split_whitespace().nth(i)) {
            return v.parse().unwrap_or(0);
        }
    }
    0
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arm {
    None,
    Floor,
    Tether,
}

/// What an arm attached; detached when dropped (or explicitly, for Tether's pins).
enum Attached {
    None,
    /// The allow-only hooks, and the refusal floor on the process without identity (held so
    /// it stays attached).
    Floor {
        allow: Box<Floor>,
        _deny: Box<Floor>,
    },
    Tether(Box<Enforcer>),
}

/// The namespaces one arm runs in.
struct Net {
    node: NetnsGuard,
    remote: NetnsGuard,
}

impl Net {
    fn new() -> Result<Net> {
        let node = NetnsGuard::new("bench-node")?;
        let remote = NetnsGuard::new("bench-remote")?;
        node.link(&format!("{NODE_ADDR}/24"), &remote, &format!("{REMOTE_ADDR}/24"))?;
        Ok(Net { node, remote })
    }

    fn listen_overflows(&self) -> u64 {
        listen_overflows(&self.node) + listen_overflows(&self.remote)
    }
}

struct World {
    cli: CgroupGuard,
    srv: CgroupGuard,
    rogue: CgroupGuard,
    protected: Vec<Cgroup>,
    pin_dir: std::path::PathBuf,
    _root: CgroupGuard,
}

impl World {
    fn attach(&self, arm: Arm) -> Result<Attached> {
        Ok(match arm {
            Arm::None => Attached::None,
            // The allow-only hooks where Tether would attach, and for B3 the refusal floor on
            // the process without identity.
            Arm::Floor => Attached::Floor {
                allow: Box::new(Floor::allow_all(&self.protected[..2])?),
                _deny: Box::new(Floor::deny_connect(&self.protected[2..])?),
            },
            Arm::Tether => {
                let mut e = Enforcer::start(&self.pin_dir, &self.protected)?;
                e.set_identities(&[(key(&self.cli)?, CLIENT), (key(&self.srv)?, SERVER)])?;
                let flows: Vec<(FlowKey, RuleRef)> = [PORT_CONNECT, PORT_RR, PORT_BULK]
                    .iter()
                    .map(|&p| (FlowKey { src: CLIENT, dst: SERVER, dport: p, _pad: 0, proto: 6 }, RuleRef { rule: 0 }))
                    .collect();
                let remote = CidrKey {
                    prefixlen: 96,
                    identity: CLIENT,
                    proto: 6,
                    port: PORT_REMOTE,
                    addr: REMOTE_ADDR.octets(),
                };
                e.load_policy(&flows, &[(remote, RuleRef { rule: 1 })], &[])?;
                e.set_lease(Duration::from_secs(600))?;
                Attached::Tether(Box::new(e))
            }
        })
    }

    fn detach(&self, a: Attached) -> Result<()> {
        if let Attached::Tether(e) = a {
            e.detach_all(&self.pin_dir)?;
        }
        Ok(())
    }
}

/// One arm's measurements.
#[derive(Default)]
struct Sample {
    connect_local: f64,
    connect_remote: f64,
    rr: f64,
    bulk: f64,
    /// Microseconds per refused connect (floor and tether arms only).
    refusal_us: Option<f64>,
    leaked: usize,
    /// SYN retransmits from overflowing listen queues (they distort the rates).
    overflows: u64,
    /// Packets or flows Tether dropped in this arm besides the refused connects (the measured
    /// flows are all allowed: any is a fault).
    /// Drops of the allowed flows, by reason.
    unexpected_drops: [u64; drop_reason::COUNT as usize],
}

fn measure(w: &World, arm: Arm, args: &Args) -> Result<Sample> {
    let net = Net::new()?;
    let mut attached = w.attach(arm)?;
    let at = |port| SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let remote = SocketAddrV4::new(REMOTE_ADDR, PORT_REMOTE);
    // Servers after the programs: their sockets are stamped and their ports recorded.
    let s_connect = Server::start(&net.node, Some(&w.srv), "connect", at(PORT_CONNECT))?;
    let s_rr = Server::start(&net.node, Some(&w.srv), "rr", at(PORT_RR))?;
    let s_bulk = Server::start(&net.node, Some(&w.srv), "bulk", at(PORT_BULK))?;
    let s_remote = Server::start(&net.remote, None, "connect", remote)?;
    // B3's listener is not protected: it accepts whatever reaches it.
    let s_refused = Server::start(&net.node, None, "refused", at(PORT_REFUSED))?;

    let rate = |count: u32, ns: f64| f64::from(count) / (ns / 1e9);
    let c = u64::from(args.connects);
    let node = &net.node;
    let mut s = Sample {
        connect_local: rate(args.connects, run_client(node, &w.cli, "connect", at(PORT_CONNECT), c)?),
        connect_remote: rate(args.connects, run_client(node, &w.cli, "connect", remote, c)?),
        rr: rate(args.exchanges, run_client(node, &w.cli, "rr", at(PORT_RR), u64::from(args.exchanges))?),
        bulk: args.bulk_bytes as f64 / 1e6 / (run_client(node, &w.cli, "bulk", at(PORT_BULK), args.bulk_bytes)? / 1e9),
        ..Sample::default()
    };
    let drops_before_refusals = drops(&attached)?;
    if drops_before_refusals.iter().any(|n| *n > 0) {
        print_drop_events(&mut attached);
    }
    if arm != Arm::None {
        let ns = run_client(node, &w.rogue, "refused", at(PORT_REFUSED), u64::from(args.refusals))?;
        s.refusal_us = Some(ns / 1e3 / f64::from(args.refusals));
    }
    std::thread::sleep(Duration::from_millis(50));
    s.leaked = s_refused.drain().iter().filter(|l| *l == "accepted").count();
    s.overflows = net.listen_overflows();
    s.unexpected_drops = drops_before_refusals;
    drop((s_connect, s_rr, s_bulk, s_remote, s_refused));
    w.detach(attached)?;
    Ok(s)
}

/// The first drop events of allowed flows (what to look at when there are any; the audit
/// interval reports the first drop of each source and reason).
fn print_drop_events(a: &mut Attached) {
    let Attached::Tether(e) = a else { return };
    let Ok(mut events) = e.take_drop_events() else { return };
    let got = tokio::runtime::Handle::current()
        .block_on(async { tokio::time::timeout(Duration::from_millis(200), events.next_batch()).await });
    for ev in got.ok().and_then(|r| r.ok()).unwrap_or_default().iter().take(8) {
        let t = ev.tuple;
        println!(
            "  drop: {} {} {}:{} -> {}:{} proto {} src {} dst {} tgid {}",
            drop_reason::name(ev.reason),
            if ev.direction == tether_common::direction::INGRESS { "ingress" } else { "egress" },
            Ipv4Addr::from(u32::from_be(t.saddr)),
            u16::from_be(t.sport),
            Ipv4Addr::from(u32::from_be(t.daddr)),
            u16::from_be(t.dport),
            t.proto,
            ev.src_identity,
            ev.dst_identity,
            ev.tgid
        );
    }
}

/// Flows and packets Tether has dropped so far, by reason (none for the other arms).
fn drops(a: &Attached) -> Result<[u64; drop_reason::COUNT as usize]> {
    Ok(match a {
        Attached::Tether(e) => e.drop_counts()?,
        _ => [0; drop_reason::COUNT as usize],
    })
}

/// Total BPF nanoseconds per operation (`mode`: a connect, or a request/response
/// exchange), over every program, for `arm`, with stats on.
/// Per program: its name, nanoseconds per operation, runs per operation.
type ProgramCost = (String, f64, f64);

fn bpf_ns_per_op(w: &World, arm: Arm, mode: &str, ops: u32) -> Result<(f64, Vec<ProgramCost>)> {
    let net = Net::new()?;
    let attached = w.attach(arm)?;
    let port = if mode == "rr" { PORT_RR } else { PORT_CONNECT };
    let at = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let server = Server::start(&net.node, Some(&w.srv), mode, at)?;
    let stats = tether_agent::ebpf::enable_run_stats()?;
    run_client(&net.node, &w.cli, mode, at, u64::from(ops))?;
    let per_program = match &attached {
        Attached::Tether(e) => e.program_stats(),
        Attached::Floor { allow, .. } => allow.program_stats(),
        Attached::None => Vec::new(),
    };
    drop(stats);
    drop(server);
    w.detach(attached)?;
    let n = f64::from(ops);
    let rows: Vec<ProgramCost> = per_program
        .into_iter()
        .filter(|(_, _, count)| *count > 0)
        .map(|(name, time, count)| (name, time.as_nanos() as f64 / n, count as f64 / n))
        .collect();
    Ok((rows.iter().map(|(_, ns, _)| ns).sum(), rows))
}

pub fn run(args: &Args) -> Result<()> {
    require_root()?;
    let rt = tokio::runtime::Runtime::new()?;
    let _rt = rt.enter();
    let root = CgroupGuard::new("bench-enforce")?;
    let (cli, srv, rogue) = (root.child("client")?, root.child("server")?, root.child("rogue")?);
    let protected: Vec<Cgroup> =
        [&cli, &srv, &rogue].iter().map(|g| Cgroup::open(g.path())).collect::<Result<_, _>>()?;
    let pin_dir = std::path::PathBuf::from(format!("/sys/fs/bpf/tether-bench-{}", std::process::id()));
    // Enforcement outlives its loader by design: remove it also when the bench fails.
    let _unpin = Unpin(pin_dir.clone());
    let w = World { cli, srv, rogue, protected, pin_dir, _root: root };

    let mut connect_local = [
        tether_metric("B1", "connects/s, identity to identity, loopback", "conn/s"),
        floor_metric("B1", "connects/s, identity to identity, loopback", "conn/s"),
    ];
    let mut connect_remote = [
        tether_metric("B1", "connects/s, by address, other netns", "conn/s"),
        floor_metric("B1", "connects/s, by address, other netns", "conn/s"),
    ];
    let mut rr = [
        tether_metric("B2", "1-byte request/response/s", "ex/s"),
        floor_metric("B2", "1-byte request/response/s", "ex/s"),
    ];
    let mut bulk = [tether_metric("B2", "bulk throughput", "MB/s"), floor_metric("B2", "bulk throughput", "MB/s")];
    // Latency: lower is better, so the target is a ratio at most 1.2.
    let mut refusal = Metric::new("B3", "refused connect latency, tether vs deny-only connect4".into(), "us");
    let (mut leaked, mut overflows, mut unexpected_drops) = (0usize, 0u64, [0u64; drop_reason::COUNT as usize]);

    // Warm-up: page cache, socket slabs, the bench binary.
    measure(&w, Arm::Tether, &Args { connects: args.connects / 5, exchanges: 1000, bulk_bytes: 1 << 24, ..*args })?;
    for round in 0..args.rounds {
        let mut order = [Arm::None, Arm::Floor, Arm::Tether];
        if round % 2 == 1 {
            order.reverse();
        }
        let mut got: Vec<(Arm, Sample)> = Vec::new();
        for arm in order {
            got.push((arm, measure(&w, arm, args)?));
        }
        let of = |a: Arm| got.iter().find(|(arm, _)| *arm == a).map(|(_, s)| s).context("arm missing");
        let (none, floor, tether) = (of(Arm::None)?, of(Arm::Floor)?, of(Arm::Tether)?);
        for (m, pick) in [
            (&mut connect_local, (|s: &Sample| s.connect_local) as fn(&Sample) -> f64),
            (&mut connect_remote, |s: &Sample| s.connect_remote),
            (&mut rr, |s: &Sample| s.rr),
            (&mut bulk, |s: &Sample| s.bulk),
        ] {
            m[0].push(pick(none), pick(tether));
            m[1].push(pick(none), pick(floor));
        }
        refusal.push(floor.refusal_us.context("floor refusal")?, tether.refusal_us.context("tether refusal")?);
        leaked += floor.leaked + tether.leaked;
        overflows += none.overflows + floor.overflows + tether.overflows;
        for (sum, n) in unexpected_drops.iter_mut().zip(tether.unexpected_drops) {
            *sum += n;
        }
    }
    let mut per_op = Vec::new();
    for (mode, what, ops) in [("connect", "connect", args.connects), ("rr", "request/response", args.exchanges)] {
        for (arm, name) in [(Arm::Tether, "tether"), (Arm::Floor, "floor")] {
            let (total, rows) = bpf_ns_per_op(&w, arm, mode, ops)?;
            per_op.push((what, name, total, rows));
        }
    }

    println!(
        "B1-B3 enforce: {} rounds, arms in alternating order (none, floor, tether / tether, floor, none); \
         servers started after each arm's programs; cgroups under {}",
        args.rounds,
        w._root.path().display()
    );
    println!("  value/baseline per round: 'tether' = real enforcement vs no programs; 'floor' = allow-only programs on the same hooks vs no programs");
    for m in connect_local.iter().chain(&connect_remote).chain(&rr).chain(&bulk) {
        m.print();
    }
    refusal.print();
    for (what, arm, total, rows) in &per_op {
        let bench = if *what == "connect" { "B1" } else { "B2" };
        println!("{bench}         BPF ns per {what}, {arm:<6} (all hooks, both ends): {total:>8.0} ns");
        for (name, ns, runs) in rows {
            println!("             {name:<24} {ns:>8.0} ns per {what} ({runs:.1} runs)");
        }
        println!(
            "{}",
            serde_json::json!({"bench": bench, "metric": format!("bpf_ns_per_{what} {arm}"), "unit": "ns", "value": total,
                "programs": rows.iter().map(|(n, ns, runs)| serde_json::json!({"program": n, "ns": ns, "runs": runs})).collect::<Vec<_>>()})
        );
    }
    println!("B3         connections that reached the listener from the process without identity: {leaked}");
    println!(
        "{}",
        serde_json::json!({"bench": "B3", "metric": "leaked_connections", "unit": "count", "value": leaked})
    );
    if overflows > 0 {
        println!("warning: {overflows} listen queue overflows during the run (SYN retransmits distort the rates)");
    }
    let by_reason: Vec<String> = (0..drop_reason::COUNT)
        .filter(|r| unexpected_drops[*r as usize] > 0)
        .map(|r| format!("{} {}", drop_reason::name(r), unexpected_drops[r as usize]))
        .collect();
    let unexpected_drops: u64 = unexpected_drops.iter().sum();
    println!(
        "B1-B2      packets of the allowed flows that Tether dropped: {unexpected_drops}{}",
        if by_reason.is_empty() { String::new() } else { format!(" ({})", by_reason.join(", ")) }
    );
    println!(
        "{}",
        serde_json::json!({"bench": "B1-B2", "metric": "allowed_flow_drops", "unit": "count", "value": unexpected_drops})
    );
    if unexpected_drops > 0 {
        println!("warning: enforcement dropped packets of flows its policy allows; the rates above include their retransmits");
    }
    if leaked > 0 {
        bail!("{leaked} connections from a process without identity reached the listener");
    }
    Ok(())
}

fn tether_metric(bench: &'static str, what: &str, unit: &'static str) -> Metric {
    Metric::new(bench, format!("{what}, tether"), unit)
}

fn floor_metric(bench: &'static str, what: &str, unit: &'static str) -> Metric {
    Metric::new(bench, format!("{what}, floor"), unit)
}

struct Unpin(std::path::PathBuf);
impl Drop for Unpin {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = Enforcer::detach_pinned(&self.0);
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

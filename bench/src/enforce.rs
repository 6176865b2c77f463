//! B1–B3 with the real enforcement programs (all seven hooks on the protected cgroups, an
//! identity and a policy that allows the measured flows), against no programs, interleaved
//! in the same run:
//! - B1: connect()+close() over loopback from an attested process (egress rule path);
//!   ns per program run from `BPF_ENABLE_STATS`.
//! - B2: between two attested workloads: 1-byte request/response over one connection, and a
//!   bulk stream (per-packet cgroup_skb programs on both ends).
//! - B3: connect() from an unattested process (EPERM in the kernel) vs connect() to a closed
//!   port (RST); packets that reached the listener (must be 0).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use sandbox::{require_root, CgroupGuard};
use tether_agent::{cgroup::Cgroup, ebpf::Enforcer, process::FileId};
use tether_common::{CidrKey, FlowKey, IdentityKey, RuleRef};

use crate::report::Metric;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    #[arg(long, default_value_t = 5000)]
    connects: u32,
    /// Request/response exchanges per round.
    #[arg(long, default_value_t = 20000)]
    exchanges: u32,
    /// Bulk bytes per round.
    #[arg(long, default_value_t = 512 * 1024 * 1024)]
    bulk_bytes: u64,
}

const CLIENT: u32 = 0x100;
const SERVER: u32 = 0x200;

/// Inside a cgroup: one workload loop, printing elapsed nanoseconds (or failures).
pub fn client(mode: &str, port: u16, count: u64) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let start = Instant::now();
    match mode {
        "connect" => {
            for _ in 0..count {
                let s = TcpStream::connect(addr).context("connect")?;
                socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
            }
        }
        "refused" => {
            // Every connect must fail; any success is a leak.
            for _ in 0..count {
                if TcpStream::connect(addr).is_ok() {
                    bail!("a connect succeeded");
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
        "bulk" => {
            let mut s = TcpStream::connect(addr).context("connect")?;
            let buf = vec![7u8; 256 * 1024];
            let mut left = count;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                s.write_all(&buf[..n])?;
                left -= n as u64;
            }
            s.shutdown(std::net::Shutdown::Write)?;
            let _ = s.read(&mut [0u8; 1]);
        }
        other => bail!("unknown mode {other}"),
    }
    println!("{}", start.elapsed().as_nanos());
    Ok(())
}

fn run_in(cg: &CgroupGuard, mode: &str, port: u16, count: u64) -> Result<f64> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["enforce-client", "--mode", mode, "--port", &port.to_string(), "--count", &count.to_string()]);
    let out = cg.run(&mut cmd)?;
    if !out.status.success() {
        bail!("{mode} client failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout).trim().parse::<f64>().context("client output")
}

/// A server process in the server cgroup: echo (rr), sink (bulk) or accept-and-close.
fn spawn_server(cg: &CgroupGuard, mode: &str, port: u16) -> Result<std::process::Child> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["enforce-server", "--mode", mode, "--port", &port.to_string()]);
    cmd.stdout(std::process::Stdio::piped());
    cg.place(&mut cmd)?;
    let mut child = cmd.spawn()?;
    // A probe connect from here would be dropped once enforcement is on: the server says
    // when it listens.
    let mut line = String::new();
    let out = child.stdout.take().context("server stdout")?;
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
    if line.trim() != "ready" {
        bail!("server did not start: {line:?}");
    }
    Ok(child)
}

pub fn server(mode: &str, port: u16) -> Result<()> {
    // A deep backlog: the default (128) overflows under the connect loop and adds 1 s SYN
    // retransmits to both sides of the ratio.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())?;
    socket.listen(4096)?;
    let l: TcpListener = socket.into();
    println!("ready");
    std::io::stdout().flush()?;
    for conn in l.incoming() {
        let mut s = conn?;
        let mode = mode.to_owned();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            match mode.as_str() {
                "rr" => {
                    let _ = s.set_nodelay(true);
                    while let Ok(1..) = s.read(&mut buf[..1]) {
                        if s.write_all(&buf[..1]).is_err() {
                            break;
                        }
                    }
                }
                "bulk" => while let Ok(1..) = s.read(&mut buf) {},
                // connect+close: nothing to read; do not hold a thread per connection.
                _ => {}
            }
        });
    }
    Ok(())
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

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A listener for B3 that counts what reaches it.
fn counting_listener(port: u16) -> Result<(Arc<AtomicU64>, Arc<AtomicBool>)> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
    l.set_nonblocking(true)?;
    let (n, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let (n2, stop2) = (n.clone(), stop.clone());
    std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            match l.accept() {
                Ok(_) => {
                    n2.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    Ok((n, stop))
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
    let (port_c, port_rr, port_bulk, port_deny, port_closed) =
        (free_port()?, free_port()?, free_port()?, free_port()?, free_port()?);

    // The identities and the policy the measured flows need.
    let attach = || -> Result<Enforcer> {
        let mut e = Enforcer::start(&pin_dir, &protected)?;
        e.set_identities(&[(key(&cli)?, CLIENT), (key(&srv)?, SERVER)])?;
        let lo = |port: u16| CidrKey { prefixlen: 96, identity: CLIENT, proto: 6, port, addr: [127, 0, 0, 1] };
        let flows: Vec<(FlowKey, RuleRef)> = [port_rr, port_bulk]
            .iter()
            .map(|&p| (FlowKey { src: CLIENT, dst: SERVER, dport: p, _pad: 0, proto: 6 }, RuleRef { rule: 0 }))
            .collect();
        e.load_policy(&flows, &[(lo(port_c), RuleRef { rule: 1 })], &[])?;
        e.set_node_attested(true)?;
        Ok(e)
    };
    let detach = |e: Enforcer| -> Result<()> {
        e.detach_all(&pin_dir)?;
        Ok(())
    };

    let accept_server = spawn_server(&srv, "sink", port_c).map(tether_child)?;
    let (leaked, stop_leak) = counting_listener(port_deny)?;
    let mut connects = Metric::new("B1", "connects/s, attested, loopback".into(), "conn/s");
    let mut rr = Metric::new("B2", "request/response exchanges/s".into(), "ex/s");
    let mut bulk = Metric::new("B2", "bulk throughput".into(), "MB/s");
    let mut deny = Metric::new("B3", "failed connect latency (EPERM vs RST)".into(), "us");
    run_in(&cli, "connect", port_c, u64::from(args.connects / 5))?; // warm-up
    for _ in 0..args.rounds {
        // Baseline: no programs. The servers are restarted per mode so their listening
        // sockets are stamped (or not) like the clients'.
        let base_c = f64::from(args.connects) / (run_in(&cli, "connect", port_c, u64::from(args.connects))? / 1e9);
        let s_rr = spawn_server(&srv, "rr", port_rr).map(tether_child)?;
        let s_bulk = spawn_server(&srv, "bulk", port_bulk).map(tether_child)?;
        let base_rr = f64::from(args.exchanges) / (run_in(&cli, "rr", port_rr, u64::from(args.exchanges))? / 1e9);
        let base_bulk = args.bulk_bytes as f64 / 1e6 / (run_in(&cli, "bulk", port_bulk, args.bulk_bytes)? / 1e9);
        let base_deny = run_in(&rogue, "refused", port_closed, 1000)? / 1e3 / 1000.0;
        drop((s_rr, s_bulk));

        let e = attach()?;
        let s_rr = spawn_server(&srv, "rr", port_rr).map(tether_child)?;
        let s_bulk = spawn_server(&srv, "bulk", port_bulk).map(tether_child)?;
        let with_c = f64::from(args.connects) / (run_in(&cli, "connect", port_c, u64::from(args.connects))? / 1e9);
        let with_rr = f64::from(args.exchanges) / (run_in(&cli, "rr", port_rr, u64::from(args.exchanges))? / 1e9);
        let with_bulk = args.bulk_bytes as f64 / 1e6 / (run_in(&cli, "bulk", port_bulk, args.bulk_bytes)? / 1e9);
        let with_deny = run_in(&rogue, "refused", port_deny, 1000)? / 1e3 / 1000.0;
        drop((s_rr, s_bulk));
        detach(e)?;
        connects.push(base_c, with_c);
        rr.push(base_rr, with_rr);
        bulk.push(base_bulk, with_bulk);
        deny.push(base_deny, with_deny);
    }
    // Program cost per run, measured apart (accounting itself costs ~20 ns per run).
    let e = attach()?;
    let stats = tether_agent::ebpf::enable_run_stats()?;
    run_in(&cli, "connect", port_c, u64::from(args.connects))?;
    let runs = e.program_stats();
    drop(stats);
    detach(e)?;
    stop_leak.store(true, Ordering::Relaxed);
    drop(accept_server);

    println!("B1-B3 enforce: {} rounds, cgroups under {}", args.rounds, root.path().display());
    connects.print();
    rr.print();
    bulk.print();
    deny.print();
    for (name, time, count) in runs {
        let ns = if count > 0 { time.as_nanos() as f64 / count as f64 } else { f64::NAN };
        println!("B1         ns per run {name:<22} {ns:>8.1} ns ({count} runs)");
        println!(
            "{}",
            serde_json::json!({"bench": "B1", "metric": format!("ns_per_run {name}"), "unit": "ns", "value": ns, "runs": count})
        );
    }
    let leaked = leaked.load(Ordering::Relaxed);
    println!("B3         packets/connections that reached the listener from the unattested process: {leaked}");
    println!(
        "{}",
        serde_json::json!({"bench": "B3", "metric": "leaked_connections", "unit": "count", "value": leaked})
    );
    Ok(())
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

/// Killed when dropped.
struct ChildGuard(std::process::Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
fn tether_child(c: std::process::Child) -> ChildGuard {
    ChildGuard(c)
}

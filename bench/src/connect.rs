//! B1, first form: connect()+close() over loopback from a process in a test cgroup, with
//! Tether's connect4 program attached to that cgroup vs nothing attached, interleaved.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use sandbox::{require_root, CgroupGuard};
use socket2::{Domain, Socket, Type};
use tether_agent::{cgroup::Cgroup, ebpf};

use crate::report::Metric;

#[derive(clap::Args)]
pub struct Args {
    /// Interleaved rounds (each: baseline then connect4).
    #[arg(long, default_value_t = 11)]
    rounds: usize,
    /// connect()+close() per round and mode.
    #[arg(long, default_value_t = 10000)]
    connects: u32,
}

/// Runs in the test cgroup: `count` connects, each closed with RST (SO_LINGER 0) so the loop
/// does not run out of ephemeral ports in TIME_WAIT. Prints the elapsed nanoseconds.
pub fn client_loop(port: u16, count: u32) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let start = Instant::now();
    for _ in 0..count {
        let stream = TcpStream::connect(addr).context("connect")?;
        socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
    }
    println!("{}", start.elapsed().as_nanos());
    Ok(())
}

fn listen_overflows() -> u64 {
    // /proc/net/netstat: a "TcpExt:" header line followed by a "TcpExt:" value line.
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    if let [names, values] = lines[..] {
        let i = names.split_whitespace().position(|n| n == "ListenOverflows");
        if let Some(v) = i.and_then(|i| values.split_whitespace().nth(i)) {
            return v.parse().unwrap_or(0);
        }
    }
    0
}

struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Server {
    fn start() -> Result<Self> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
        // Rust's default backlog (128) overflows under a connect loop and adds 1 s SYN
        // retransmits to the measurement.
        socket.listen(4096)?;
        let port = socket.local_addr()?.as_socket().context("not inet")?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                drop(socket.accept());
            }
        });
        Ok(Server { port, stop })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        drop(TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)));
    }
}

fn round(cg: &CgroupGuard, port: u16, connects: u32) -> Result<f64> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["connect-loop", "--port", &port.to_string(), "--count", &connects.to_string()]);
    let out = cg.run(&mut cmd)?;
    if !out.status.success() {
        bail!("client loop failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let ns: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().context("client output")?;
    Ok(f64::from(connects) / (ns / 1e9))
}

pub fn run(args: &Args) -> Result<()> {
    require_root()?;
    let rt = tokio::runtime::Runtime::new()?;
    let _rt = rt.enter();
    let server = Server::start()?;
    let cg = CgroupGuard::new("bench-connect")?;
    let scope = Cgroup::open(cg.path())?;
    let overflows_before = listen_overflows();

    // Warm-up: page cache, socket slabs, the client binary.
    round(&cg, server.port, args.connects / 5)?;
    let mut rates = Metric::new("connect", "connects_per_s".into(), "conn/s");
    for _ in 0..args.rounds {
        let baseline = round(&cg, server.port, args.connects)?;
        let hook = ebpf::ConnectHook::attach(ebpf::load()?, &scope)?;
        rates.push(baseline, round(&cg, server.port, args.connects)?);
        drop(hook);
    }

    // Per-run program cost, measured apart so stats accounting does not skew the ratios.
    let hook = ebpf::ConnectHook::attach(ebpf::load()?, &scope)?;
    let stats = ebpf::enable_run_stats()?;
    round(&cg, server.port, args.connects)?;
    let (time, count) = hook.run_stats()?;
    drop(stats);
    let ns_per_run = if count > 0 { time.as_nanos() as f64 / count as f64 } else { f64::NAN };

    println!(
        "B1 connect: {} rounds x {} connect+close over loopback, cgroup {}",
        args.rounds,
        args.connects,
        cg.path().display()
    );
    rates.print();
    println!(
        "connect      ns_per_program_run      {ns_per_run:>8.1} ns  ({count} runs, includes ~20 ns stats accounting)"
    );
    println!(
        "{}",
        serde_json::json!({"bench": "connect", "metric": "ns_per_program_run", "unit": "ns", "value": ns_per_run, "runs": count})
    );
    let overflows = listen_overflows() - overflows_before;
    if overflows > 0 {
        println!("warning: {overflows} listen queue overflows during the run (SYN retransmits distort the rates)");
    }
    Ok(())
}

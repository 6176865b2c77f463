//! B4: exec identity. fork+exec loops of a small and a 10 MB binary from a test cgroup with
//! Tether's process programs attached (and the agent measuring on exec) against no programs,
//! and against hashing the binary in user space at every exec (what a /proc-based attestor
//! does); plus the cost of a cold and a warm measurement against one plain sha256.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use sandbox::{cgroup2_root, require_root, CgroupGuard};
use tether_agent::{
    cgroup::Cgroup,
    ebpf,
    process::{caller::Resolver, measure, measure::Measurer, pidfd::PidFd},
};

use crate::report::{median, Metric};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// fork+exec per round and mode.
    #[arg(long, default_value_t = 300)]
    execs: u32,
}

/// Runs in the test cgroup: `count` fork+exec+wait of `binary`; with `hash`, also reads
/// and hashes the binary at every exec. Prints elapsed nanoseconds.
pub fn exec_loop(binary: &Path, count: u32, hash: bool) -> Result<()> {
    let start = Instant::now();
    for _ in 0..count {
        let status = Command::new(binary).status().context("exec")?;
        if !status.success() {
            bail!("{} failed", binary.display());
        }
        if hash {
            measure::sha256_reader(std::fs::File::open(binary)?)?;
        }
    }
    println!("{}", start.elapsed().as_nanos());
    Ok(())
}

fn round(cg: &CgroupGuard, binary: &Path, execs: u32, hash: bool) -> Result<f64> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["exec-loop", "--count", &execs.to_string(), "--binary"]).arg(binary);
    if hash {
        cmd.arg("--hash");
    }
    let out = cg.run(&mut cmd)?;
    if !out.status.success() {
        bail!("exec loop failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let ns: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().context("loop output")?;
    Ok(f64::from(execs) / (ns / 1e9))
}

/// A runnable copy of `true`, padded to `size` bytes (the padding changes nothing it does).
fn make_binary(dir: &Path, name: &str, size: usize) -> Result<PathBuf> {
    let mut content = std::fs::read("/usr/bin/true")?;
    if content.len() < size {
        content.resize(size, 0xa5);
    }
    let path = dir.join(name);
    std::fs::write(&path, content)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// Programs attached, the agent consuming exec events and measuring (warm: already cached).
struct Agent {
    _consumer: tokio::task::JoinHandle<()>,
}

fn start_agent(rt: &tokio::runtime::Runtime, scope: &Cgroup, warm: &[&Path]) -> Result<Agent> {
    let _enter = rt.enter();
    let mut monitor = ebpf::Monitor::start(ebpf::load()?, ebpf::TraceScope::Cgroup(scope))?;
    let mut events = monitor.take_events()?;
    let resolver = Arc::new(Resolver::new(
        monitor,
        Measurer::new(tether_agent::config::DEFAULT_MAX_MEASURE_BYTES),
        cgroup2_root()?,
    ));
    for path in warm {
        resolver.measurer().measure_path(path)?;
    }
    let consumer = rt.spawn(async move {
        while let Ok(batch) = events.next_batch().await {
            for (record, pid) in batch {
                resolver.on_exec(&record, pid);
            }
        }
    });
    Ok(Agent { _consumer: consumer })
}

pub fn run(args: &Args) -> Result<()> {
    require_root()?;
    let rt = tokio::runtime::Runtime::new()?;
    let dir = tempfile::tempdir()?;
    let small = make_binary(dir.path(), "small", 0)?;
    let large = make_binary(dir.path(), "large", 10 * 1024 * 1024)?;
    let cg = CgroupGuard::new("bench-exec")?;
    let scope = Cgroup::open(cg.path())?;

    println!(
        "B4 exec: {} rounds x {} fork+exec+wait per mode, from cgroup {}",
        args.rounds,
        args.execs,
        cg.path().display()
    );
    for (label, binary) in [("small", &small), ("10MB", &large)] {
        round(&cg, binary, args.execs / 5, false)?; // warm-up
        let mut programs = Metric::new("exec", format!("{label}_execs_per_s_programs"), "exec/s");
        let mut userspace = Metric::new("exec", format!("{label}_execs_per_s_hash_per_exec"), "exec/s");
        for _ in 0..args.rounds {
            let none = round(&cg, binary, args.execs, false)?;
            let agent = start_agent(&rt, &scope, &[binary])?;
            let with = round(&cg, binary, args.execs, false)?;
            drop(agent);
            let hashing = round(&cg, binary, args.execs, true)?;
            programs.push(none, with);
            userspace.push(none, hashing);
        }
        programs.print();
        userspace.print();
    }

    // Measurement cost on the 10 MB binary: cold (first sight of a file identity: open,
    // identity checks, hash, re-check) and warm (cache hit), against one plain sha256.
    let mut cold = Metric::new("exec", "cold_measure_vs_sha256".into(), "ms");
    let mut warm_ns = Vec::new();
    let me = PidFd::open(std::process::id())?;
    for i in 0..args.rounds {
        // A fresh file (identity) each round, in the page cache for both.
        let path = make_binary(dir.path(), &format!("cold{i}"), 10 * 1024 * 1024)?;
        let t = Instant::now();
        measure::sha256_reader(std::fs::File::open(&path)?)?;
        let plain = t.elapsed().as_secs_f64() * 1e3;
        let measurer = Measurer::new(tether_agent::config::DEFAULT_MAX_MEASURE_BYTES);
        let t = Instant::now();
        let (id, _) = measurer.measure_path(&path)?;
        cold.push(plain, t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        measurer.measure_process(&me, std::process::id(), &id, measure::Wait::Deadline);
        warm_ns.push(t.elapsed().as_nanos() as f64);
    }
    cold.print();
    println!(
        "exec       warm_measure           {:>12.0} ns (cache hit, median of {})",
        median(&warm_ns),
        warm_ns.len()
    );
    println!(
        "{}",
        serde_json::json!({"bench": "exec", "metric": "warm_measure_ns", "unit": "ns", "value": median(&warm_ns), "rounds": warm_ns.len()})
    );
    Ok(())
}

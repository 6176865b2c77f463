use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tether_agent::{cgroup::Cgroup, ebpf, telemetry};

/// Tether node agent: kernel-observed workload identity and in-kernel enforcement.
#[derive(Parser)]
#[command(name = "tether-agent", version)]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print exec events as the kernel records them, live.
    TraceExec {
        /// Only processes in this cgroup's subtree (absolute, or relative to the cgroup2 root).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Report which BPF program and map types this kernel accepts, and the path Tether uses.
    Probe,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_json);
    match cli.command {
        Command::Probe => {
            let support = ebpf::probe_kernel();
            println!("{}", serde_json::to_string_pretty(&support)?);
            Ok(())
        }
        Command::TraceExec { cgroup, json } => trace_exec(cgroup, json).await,
    }
}

fn log_kernel_support() {
    let support = ebpf::probe_kernel();
    tracing::info!(
        kernel = %support.kernel,
        tp_btf = support.tp_btf,
        fentry = support.fentry,
        cgroup_sock_addr = support.cgroup_sock_addr,
        task_storage = support.task_storage,
        bpf_lsm = support.bpf_lsm,
        "kernel support probed; using {}",
        support.path
    );
}

async fn trace_exec(cgroup: Option<PathBuf>, json: bool) -> Result<()> {
    log_kernel_support();
    let scope = cgroup.map(|p| Cgroup::open(&p).with_context(|| format!("--cgroup {}", p.display()))).transpose()?;
    let mut tracer = ebpf::ExecTracer::start(ebpf::load()?, scope.as_ref())?;
    match &scope {
        Some(cg) => tracing::info!(cgroup = %cg.path.display(), cgroup_id = cg.id, "tracing execs"),
        None => tracing::info!("tracing every exec on this machine"),
    }
    loop {
        let batch = tokio::select! {
            batch = tracer.next_batch() => batch?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        for record in batch {
            if json {
                println!("{}", serde_json::to_string(&record)?);
            } else {
                println!("{record}");
            }
        }
    }
}

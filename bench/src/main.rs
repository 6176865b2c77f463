//! tether-bench: the measurements behind `cargo xtask bench`. Each benchmark runs its
//! baseline in the same run, interleaved, and reports ratios (see ../shared/BENCHMARKS.md).

mod attest;
mod enforce;
mod exec;
mod procs;
mod report;
mod server;
mod spire;
mod tunnel;
mod workload_api;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tether-bench")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// B8: quote + verify on a private swtpm vs tpm2_quote + tpm2_checkquote; verifications/s.
    Attest(attest::Args),
    /// B1-B3: the real enforcement programs vs none vs allow-only programs on the same hooks:
    /// connects, request/response and bulk between attested workloads, the denial path.
    Enforce(enforce::Args),
    /// Internal: an enforcement bench client run inside a bench cgroup.
    #[command(hide = true)]
    EnforceClient {
        #[arg(long)]
        mode: String,
        #[arg(long)]
        addr: std::net::SocketAddrV4,
        #[arg(long)]
        count: u64,
    },
    /// Internal: an enforcement bench server run inside a bench cgroup.
    #[command(hide = true)]
    EnforceServer {
        #[arg(long)]
        mode: String,
        #[arg(long)]
        addr: std::net::SocketAddrV4,
    },
    /// B4: fork+exec with the process programs (and measuring agent) vs none vs hashing
    /// per exec; cold and warm measurement cost.
    Exec(exec::Args),
    /// B9: X.509-SVID issuance vs raw ECDSA signing; entry sync for 100k entries.
    Server(server::Args),
    /// B5, B9, B10 against SPIRE 1.13.3 (server + agent) on the same machine, same run.
    Spire(spire::Args),
    /// B7: tunnels between two hosts: plaintext vs stunnel4 vs Tether (throughput, latency,
    /// connection rate, CPU per GB).
    Tunnel(tunnel::Args),
    /// Internal: a tunnel bench client run inside a host namespace.
    #[command(hide = true)]
    TunnelClient {
        #[arg(long)]
        mode: String,
        #[arg(long)]
        addr: std::net::SocketAddrV4,
        #[arg(long)]
        a: u64,
        #[arg(long)]
        b: u64,
    },
    /// Internal: a tunnel bench server run inside a host namespace.
    #[command(hide = true)]
    TunnelServer {
        #[arg(long)]
        addr: std::net::SocketAddrV4,
    },
    /// B5: Workload API latency vs a minimal tonic UDS service; memory per cached SVID.
    WorkloadApi(workload_api::Args),
    /// Internal: the Workload API client run inside the bench cgroup.
    #[command(hide = true)]
    ApiClient {
        #[arg(long)]
        socket: std::path::PathBuf,
        #[arg(long)]
        method: String,
        #[arg(long)]
        callers: usize,
        #[arg(long)]
        calls: usize,
    },
    /// Internal: the exec loop run inside the test cgroup.
    #[command(hide = true)]
    ExecLoop {
        #[arg(long)]
        binary: std::path::PathBuf,
        #[arg(long)]
        count: u32,
        #[arg(long)]
        hash: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().bench {
        Bench::Attest(args) => attest::run(&args),
        Bench::Enforce(args) => enforce::run(&args),
        Bench::EnforceClient { mode, addr, count } => enforce::client(&mode, addr, count),
        Bench::EnforceServer { mode, addr } => enforce::server(&mode, addr),
        Bench::Exec(args) => exec::run(&args),
        Bench::Server(args) => server::run(&args),
        Bench::Spire(args) => spire::run(&args),
        Bench::Tunnel(args) => tunnel::run(&args),
        Bench::TunnelClient { mode, addr, a, b } => tunnel::client(&mode, addr, a, b),
        Bench::TunnelServer { addr } => tunnel::server(addr),
        Bench::WorkloadApi(args) => workload_api::run(&args),
        Bench::ApiClient { socket, method, callers, calls } => {
            tokio::runtime::Runtime::new()?.block_on(workload_api::client(&socket, &method, callers, calls))
        }
        Bench::ExecLoop { binary, count, hash } => exec::exec_loop(&binary, count, hash),
    }
}

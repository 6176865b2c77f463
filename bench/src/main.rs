//! tether-bench: the measurements behind `cargo xtask bench`. Each benchmark runs its
//! baseline in the same run, interleaved, and reports ratios (see ../shared/BENCHMARKS.md).

mod connect;
mod report;

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
    /// B1: TCP connect+close from a test cgroup, connect4 attached vs nothing attached.
    Connect(connect::Args),
    /// Internal: the client loop run inside the test cgroup.
    #[command(hide = true)]
    ConnectLoop {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        count: u32,
    },
}

fn main() -> Result<()> {
    match Cli::parse().bench {
        Bench::Connect(args) => connect::run(&args),
        Bench::ConnectLoop { port, count } => connect::client_loop(port, count),
    }
}

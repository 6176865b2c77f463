//! The project's commands: `cargo xtask setup | test | bench | demo | fuzz`.

mod demo;
mod fuzz;
mod peers;
mod postgres;
mod setup;

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and the tests need (Debian packages, bpf-linker); a fast
    /// no-op when everything is present.
    Setup,
    /// Everything CI runs: setup, fmt, clippy (host and eBPF), unit and privileged tests, a
    /// fuzz smoke run.
    Test,
    /// Benchmarks from ../shared/BENCHMARKS.md, as ratios against a same-run baseline.
    Bench {
        /// Which one (enforce = B1-B3, exec = B4, workload-api = B5, tunnel = B7,
        /// attest = B8, server = B9, spire = B5/B9/B10 against SPIRE).
        #[arg(value_parser = ["attest", "enforce", "exec", "server", "spire", "tunnel", "workload-api"])]
        name: String,
        /// Passed to the benchmark (e.g. --rounds 11 --connects 10000).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The main job: shows a workload's exec observed by the kernel in a demo cgroup.
    Demo,
    /// Fuzzes the parsers of outside input (cargo-fuzz targets in fuzz/).
    Fuzz {
        /// One target; all of them when omitted.
        #[arg(value_parser = fuzz::TARGETS)]
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::Test => test(),
        Cmd::Bench { name, args } => {
            setup::run()?;
            if name == "spire" {
                // Only this benchmark runs SPIRE, so only it builds SPIRE (once).
                peers::ensure(&peers::SPIRE)?;
            }
            cargo(&["build", "--release", "-p", "tether-bench", "-p", "tether-agent", "-p", "tether-server"])?;
            run(Command::new(workspace().join("target/release/tether-bench")).arg(&name).args(&args))
        }
        Cmd::Demo => {
            setup::run()?;
            demo::run()
        }
        Cmd::Fuzz { target, seconds } => fuzz::run(target.as_deref(), seconds),
    }
}

pub fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(|p| p.to_path_buf()).unwrap_or_default()
}

fn step(what: &str) {
    println!("\n==> {what}");
}

pub fn run(cmd: &mut Command) -> Result<()> {
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(workspace());
    }
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args(args))
}

fn test() -> Result<()> {
    let started = std::time::Instant::now();
    setup::run()?;
    // Privileged tests must fail loudly, not be skipped, when not root.
    sandbox::require_root().context("the privileged tests load eBPF programs and create cgroups")?;
    step("cargo fmt --check");
    cargo(&["fmt", "--all", "--check"])?;
    step("clippy, host crates");
    cargo(&["clippy", "--workspace", "--exclude", "tether-agent-ebpf", "--all-targets", "--", "-D", "warnings"])?;
    step("clippy, eBPF crate (Debian's clippy matching rustc 1.96)");
    run(Command::new("/usr/bin/cargo-clippy")
        .args([
            "clippy",
            "-p",
            "tether-agent-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
            "target/ebpf-clippy",
            "--",
            "-D",
            "warnings",
        ])
        .env("CARGO", "/usr/bin/cargo")
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_BOOTSTRAP", "1"))?;
    step("build (the agent embeds the eBPF object)");
    cargo(&["build", "--workspace", "--exclude", "tether-agent-ebpf", "--all-targets"])?;
    step("unit tests (the server's store against SQLite and a private PostgreSQL on loopback)");
    let pg = postgres::Postgres::start()?;
    let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo_bin)
        .args(["test", "--workspace", "--exclude", "tether-agent-ebpf", "--exclude", "tether-tests"])
        .env("TETHER_TEST_POSTGRES", pg.conninfo()))?;
    step("privileged integration tests (real kernel, test-owned cgroups and namespaces)");
    run(Command::new(&cargo_bin).args(["test", "-p", "tether-tests"]).env("TETHER_TEST_POSTGRES", pg.conninfo()))?;
    drop(pg);
    fuzz::smoke()?;
    println!("\nall checks passed in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A server built on its own (as a release is) has no fault-injection switch: only the
    /// test crate turns that feature on.
    #[test]
    fn a_server_built_alone_has_no_fault_injection() {
        let out = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["tree", "--offline", "-p", "tether-server", "-e", "features,normal", "-i", "tether-server"])
            .current_dir(super::workspace())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "cargo tree: {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("tether-server"), "{text}");
        assert!(!text.contains("fault-injection"), "the server alone enables fault injection:\n{text}");
    }
}

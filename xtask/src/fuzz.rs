//! `cargo xtask fuzz`: the cargo-fuzz targets in fuzz/ (parsers of outside input), built with
//! AddressSanitizer. The committed seeds in fuzz/corpus are only read: corpus growth and crash
//! artifacts go under target/fuzz.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

/// Every fuzz target (a `[[bin]]` in fuzz/Cargo.toml).
pub const TARGETS: [&str; 5] =
    ["tpms_attest", "tpmt_public", "tpmt_signature", "attestation_messages", "hbone_request"];

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// What `cargo xtask test` spends per target: enough to replay the seeds and mutate them a
/// few thousand times, so a parser that panics on a near-miss of real input fails CI.
const SMOKE_SECONDS: u64 = 3;

/// No input reaches a single allocation this large unless a length field is trusted.
const MALLOC_LIMIT_MB: &str = "64";

/// Fuzzes `target` (all when None) for `seconds` each, keeping the grown corpus in
/// target/fuzz/corpus for the next run.
pub fn run(target: Option<&str>, seconds: u64) -> Result<()> {
    let targets: Vec<&str> = match target {
        Some(t) => vec![t],
        None => TARGETS.to_vec(),
    };
    build()?;
    for t in targets {
        fuzz(t, seconds, &work_dir().join("corpus").join(t))?;
    }
    Ok(())
}

/// A short run of every target from the committed seeds only, for `cargo xtask test`.
pub fn smoke() -> Result<()> {
    crate::step(&format!("fuzz smoke: {} targets, {SMOKE_SECONDS} s each", TARGETS.len()));
    build()?;
    for t in TARGETS {
        let corpus = work_dir().join("smoke-corpus").join(t);
        // A fresh corpus each time: CI runs from the same seeds, and startup stays short.
        let _ = std::fs::remove_dir_all(&corpus);
        fuzz(t, SMOKE_SECONDS, &corpus)?;
    }
    Ok(())
}

fn fuzz_dir() -> PathBuf {
    crate::workspace().join("fuzz")
}

fn work_dir() -> PathBuf {
    crate::workspace().join("target/fuzz")
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // cargo-fuzz needs -Z flags (-Zsanitizer); this lets the stable compiler that builds
    // everything else accept them, rather than depending on a nightly toolchain.
    cmd.env("RUSTC_BOOTSTRAP", "1");
    cmd
}

fn build() -> Result<()> {
    ensure_tools()?;
    crate::step("building fuzz targets (release, AddressSanitizer; a few minutes the first time)");
    crate::run(
        cargo()
            .args(["fuzz", "build", "--sanitizer", "address"])
            .arg("--fuzz-dir")
            .arg(fuzz_dir())
            .arg("--target-dir")
            .arg(work_dir()),
    )
}

fn ensure_tools() -> Result<()> {
    // libfuzzer-sys compiles libFuzzer itself.
    if !Command::new("c++").arg("--version").output().is_ok_and(|o| o.status.success()) {
        bail!("fuzz: no C++ compiler for libFuzzer: apt-get install g++");
    }
    let present = cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION));
    if !present {
        println!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        crate::run(cargo().args(["install", &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"), "--locked"]))
            .context("installing cargo-fuzz")?;
    }
    Ok(())
}

fn host_triple() -> Result<String> {
    let out = Command::new("rustc").arg("-vV").output().context("rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("no host triple in rustc -vV")
}

/// Runs one target's binary directly (not `cargo fuzz run`, which would write into fuzz/).
fn fuzz(target: &str, seconds: u64, corpus: &Path) -> Result<()> {
    let binary = work_dir().join(host_triple()?).join("release").join(target);
    let artifacts = work_dir().join("artifacts").join(target);
    std::fs::create_dir_all(corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    let started = Instant::now();
    let out = Command::new(&binary)
        // libFuzzer writes new inputs to the first directory only; the seeds are read-only.
        .arg(corpus)
        .arg(fuzz_dir().join("corpus").join(target))
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"))
        .arg("-timeout=10")
        // libFuzzer joins the prefix and the file name by concatenation: keep the slash.
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .output()
        .with_context(|| format!("starting {}", binary.display()))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        for line in tail.into_iter().rev() {
            eprintln!("{line}");
        }
        bail!(
            "fuzz target {target} failed ({}); crashing input in {} (reproduce: {} <file>)",
            out.status,
            artifacts.display(),
            binary.display()
        );
    }
    let done = log.lines().find(|l| l.contains("DONE")).unwrap_or("no final stats");
    println!("fuzz {target}: ok in {:.0} s: {}", started.elapsed().as_secs_f64(), done.trim());
    Ok(())
}

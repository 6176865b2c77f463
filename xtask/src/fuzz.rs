//! `cargo xtask fuzz`: the cargo-fuzz targets in fuzz/ (parsers of outside input), built with
//! AddressSanitizer. The committed seeds in fuzz/corpus are only read: corpus growth and crash
//! artifacts go under target/fuzz.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

/// Every fuzz target (a `[[bin]]` in fuzz/Cargo.toml, with seeds in fuzz/corpus/<target>; a
/// test below holds the three lists together).
pub const TARGETS: [&str; 14] = [
    // TPM structures and the attestation messages carrying them (server side).
    "tpms_attest",
    "tpmt_public",
    "tpmt_signature",
    "attestation_messages",
    // Node API requests and the CSRs in them (server side).
    "node_api",
    "csr",
    // What the agent reads from the server (SVID chains) and from workloads (HTTP/2, JWTs).
    "x509_svid",
    "jwt_svid",
    "h2_authority",
    // What a node tunnel takes from the network before any policy check.
    "hbone_request",
    // Files: the agent's policy and config, the server's config and golden PCR policies.
    "agent_policy",
    "agent_config",
    "server_config",
    // SPIFFE IDs, selectors, patterns and hex, which every one of the above speaks.
    "spiffe_id_selector",
];

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
            .arg(work_dir())
            .env("TETHER_EBPF_OBJECT", no_ebpf()?),
    )
}

/// The agent embeds its kernel programs, which agent/build.rs builds with a nested cargo for
/// the BPF target. The fuzz targets never load them: empty stand-ins (the agent's build takes
/// a prebuilt object from TETHER_EBPF_OBJECT) spare the fuzz build a second eBPF build.
fn no_ebpf() -> Result<PathBuf> {
    let dir = work_dir().join("no-ebpf");
    std::fs::create_dir_all(&dir)?;
    for name in ["tether-agent-ebpf", "tether-floor-ebpf"] {
        let path = dir.join(name);
        if !path.exists() {
            std::fs::write(&path, [])?;
        }
    }
    Ok(dir.join("tether-agent-ebpf"))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The `name`s of the `[[bin]]` tables of fuzz/Cargo.toml.
    fn bins() -> Vec<String> {
        let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        let mut names = Vec::new();
        let mut in_bin = false;
        for line in manifest.lines().map(str::trim) {
            if line.starts_with('[') {
                in_bin = line == "[[bin]]";
            } else if let Some(value) = line.strip_prefix("name").map(str::trim).and_then(|l| l.strip_prefix('=')) {
                if in_bin {
                    names.push(value.trim().trim_matches('"').to_owned());
                }
            }
        }
        names
    }

    /// A target added to fuzz/Cargo.toml but not here would never run in `cargo xtask test`,
    /// and one without seeds would start from nothing in its 3 s.
    #[test]
    fn every_target_is_listed_and_has_seeds() {
        let mut bins = bins();
        bins.sort();
        let mut listed: Vec<String> = TARGETS.iter().map(|t| t.to_string()).collect();
        listed.sort();
        assert_eq!(bins, listed, "the [[bin]]s of fuzz/Cargo.toml and fuzz::TARGETS differ");
        for t in TARGETS {
            let dir = fuzz_dir().join("corpus").join(t);
            let seeds = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .filter(|p| p.metadata().is_ok_and(|m| m.is_file() && m.len() > 0))
                .count();
            assert!(seeds > 0, "{t}: no committed seed in {}", dir.display());
            assert!(fuzz_dir().join("fuzz_targets").join(format!("{t}.rs")).is_file(), "{t}: no source");
        }
    }
}

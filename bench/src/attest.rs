//! B8: node attestation on a private swtpm, both sides measured the same way: as the processes
//! an operator runs, in the same run, in alternating order.
//! - TPM time: `tether-agent tpm quote` (open the TPM, load the EK and the persistent AK,
//!   quote, read the PCRs, write the evidence) against `tpm2_quote` (persistent AK, quote,
//!   write the evidence);
//! - verification time: `tether-server tpm check-quote` (AK under the EK, signature, nonce
//!   bound to a CSR's key, PCR digest, golden policy) against `tpm2_checkquote` (signature,
//!   nonce, PCR digest);
//! - verifications per second on one core, in process (what the server spends per node and
//!   interval), as an absolute figure, beside an estimate of `tpm2_checkquote`'s own
//!   verification cost: its process time minus that of a `tpm2_print` of the same quote (the
//!   same tools start-up, library load and parse, no verification). tpm2-tools offer no
//!   in-process API to time.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use sandbox::swtpm::Swtpm;
use tether_attestors::tpm::{
    device::{Device, EkAlgorithm},
    verify::{AkVerifier, PcrValues},
    wire::Public,
};

use crate::report::{median, Metric};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// Quotes per round and side.
    #[arg(long, default_value_t = 10)]
    quotes: usize,
    /// Seconds of in-process verification per round.
    #[arg(long, default_value_t = 1.0)]
    verify_seconds: f64,
}

const PCRS: &[u32] = &[0, 1, 2, 3, 4, 5, 6, 7];

/// Runs a command to completion; its wall time in milliseconds.
fn timed(cmd: &mut Command) -> Result<f64> {
    let start = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!("{cmd:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(ms)
}

fn bin(name: &str) -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.exists() {
        bail!("{} not built (cargo xtask bench builds it)", path.display());
    }
    Ok(path)
}

/// Mean (quote ms, verify ms) over `n` rounds of tpm2-tools.
fn tools_round(tpm: &Swtpm, dir: &Path, n: usize, salt: usize) -> Result<(f64, f64)> {
    let (mut quote, mut verify) = (0.0, 0.0);
    for i in 0..n {
        let nonce = format!("{:064x}", salt * 1000 + i + 1);
        quote += timed(tpm.tool("tpm2_quote").current_dir(dir).args([
            "-c",
            "0x81010002",
            "-l",
            "sha256:0,1,2,3,4,5,6,7",
            "-q",
            &nonce,
            "-m",
            "q.msg",
            "-s",
            "q.sig",
            "-o",
            "q.pcrs",
            "-g",
            "sha256",
        ]))?;
        verify += timed(
            tpm.tool("tpm2_checkquote")
                .current_dir(dir)
                .args(["-u", "ak.pub", "-m", "q.msg", "-s", "q.sig", "-f", "q.pcrs", "-g", "sha256", "-q", &nonce]),
        )?;
    }
    Ok((quote / n as f64, verify / n as f64))
}

/// Mean (quote ms, verify ms) over `n` rounds of Tether's own commands.
fn tether_round(tpm: &Swtpm, dir: &Path, policies: &Path, n: usize, salt: usize) -> Result<(f64, f64)> {
    let (agent, server) = (bin("tether-agent")?, bin("tether-server")?);
    let (mut quote, mut verify) = (0.0, 0.0);
    for i in 0..n {
        let nonce = format!("{:064x}", salt * 1000 + i + 1);
        quote += timed(Command::new(&agent).current_dir(dir).env("RUST_LOG", "error").args([
            "tpm",
            "quote",
            "--tcti",
            &tpm.tcti(),
            "--ak-dir",
            "tether-ak",
            "--nonce",
            &nonce,
            "--csr",
            "t.csr",
            "--hello",
            "t.hello",
            "--evidence",
            "t.evidence",
        ]))?;
        verify += timed(Command::new(&server).current_dir(dir).env("RUST_LOG", "error").args([
            "tpm",
            "check-quote",
            "--hello",
            "t.hello",
            "--evidence",
            "t.evidence",
            "--nonce",
            &nonce,
            "--csr",
            "t.csr",
            "--policy-dir",
            policies.to_str().context("policy dir is not UTF-8")?,
        ]))?;
    }
    Ok((quote / n as f64, verify / n as f64))
}

pub fn run(args: &Args) -> Result<()> {
    let tpm = Swtpm::start();
    let work = tempfile::tempdir()?;
    let dir = work.path();
    // tpm2-tools' AK (its own context file, as its users keep one), made persistent: without
    // a resource manager each tpm2_quote would otherwise leak a transient object.
    timed(tpm.tool("tpm2_createak").current_dir(dir).args([
        "-C",
        "0x81010001",
        "-c",
        "ak.ctx",
        "-u",
        "ak.pub",
        "-f",
        "pem",
        "-G",
        "rsa",
        "-g",
        "sha256",
        "-s",
        "rsassa",
    ]))?;
    timed(tpm.tool("tpm2_evictcontrol").current_dir(dir).args(["-C", "o", "-c", "ak.ctx", "0x81010002"]))?;
    timed(tpm.tool("tpm2_flushcontext").current_dir(dir).arg("-t"))?;
    // The golden policy check-quote compares against: this TPM's current PCRs.
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(
        policies.join("bench.toml"),
        tether_agent::tpm::policy_snippet(&tpm.tcti(), "bench", "sha256", PCRS)?,
    )?;
    // The CSR Tether's quotes cover, as a node SVID request's (tpm2-tools' quote the bare nonce).
    let key = rcgen::KeyPair::generate()?;
    std::fs::write(dir.join("t.csr"), rcgen::CertificateParams::default().serialize_request(&key)?.der())?;
    // Tether's persistent AK (created by the first quote, as the agent's first start does),
    // and an in-process verifier for the rate.
    let (verifier, sample) = {
        let mut dev = Device::open(&tpm.tcti())?;
        let ek = dev.endorsement(EkAlgorithm::Rsa)?;
        let ak = dev.attestation_key(&ek, &dir.join("tether-ak"))?;
        let verifier = AkVerifier::new(&Public::parse(&ak.public)?, &Public::parse(&ek.public)?)?;
        (verifier, dev.quote(&ak, b"sample", "sha256", PCRS)?)
    };
    let mut sample_values = PcrValues::new();
    for (bank, index, value) in &sample.pcrs {
        sample_values.insert_named(bank, *index, value.clone())?;
    }
    // Warm-up: binaries in the page cache.
    tools_round(&tpm, dir, 1, 0)?;
    tether_round(&tpm, dir, &policies, 1, 0)?;

    let mut quote = Metric::new("B8", "quote, TPM time (process), tether vs tpm2_quote".into(), "ms");
    let mut verify = Metric::new("B8", "verify (process), tether vs tpm2_checkquote".into(), "ms");
    let mut total = Metric::new("B8", "quote+verify latency (processes)".into(), "ms");
    let (mut rate, mut checkquote_ms, mut print_ms) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let salt = round + 1;
        let (tools, ours) = if round % 2 == 0 {
            let t = tools_round(&tpm, dir, args.quotes, salt)?;
            (t, tether_round(&tpm, dir, &policies, args.quotes, salt)?)
        } else {
            let o = tether_round(&tpm, dir, &policies, args.quotes, salt)?;
            (tools_round(&tpm, dir, args.quotes, salt)?, o)
        };
        quote.push(tools.0, ours.0);
        verify.push(tools.1, ours.1);
        total.push(tools.0 + tools.1, ours.0 + ours.1);
        // tpm2_checkquote's verification alone: its process time less a tpm2_print of the
        // same quote (same start-up and parse, no verification).
        let nonce = format!("{:064x}", salt * 1000 + args.quotes);
        checkquote_ms.push(timed(
            tpm.tool("tpm2_checkquote")
                .current_dir(dir)
                .args(["-u", "ak.pub", "-m", "q.msg", "-s", "q.sig", "-f", "q.pcrs", "-g", "sha256", "-q", &nonce]),
        )?);
        print_ms.push(timed(tpm.tool("tpm2_print").current_dir(dir).args(["-t", "TPMS_ATTEST", "q.msg"]))?);
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed().as_secs_f64() < args.verify_seconds {
            for _ in 0..100 {
                verifier.verify_quote(&sample.attest, &sample.signature, b"sample", &sample_values)?;
            }
            n += 100;
        }
        rate.push(n as f64 / start.elapsed().as_secs_f64());
    }
    println!(
        "B8 attest: {} rounds x {} quotes per side on a private swtpm, alternating order; both sides as processes",
        args.rounds, args.quotes
    );
    quote.print();
    verify.print();
    total.print();
    let rate = median(&rate);
    let tools_verify_ms = (median(&checkquote_ms) - median(&print_ms)).max(0.0);
    println!("B8         verifications/s on one core, in process (Tether): {rate:>10.0} /s (target >= 2,000)");
    println!(
        "B8         tpm2_checkquote's verification alone, estimated: {:.3} ms ({:.0} /s) = checkquote {:.2} ms - tpm2_print {:.2} ms",
        tools_verify_ms,
        if tools_verify_ms > 0.0 { 1e3 / tools_verify_ms } else { f64::NAN },
        median(&checkquote_ms),
        median(&print_ms)
    );
    println!(
        "{}",
        serde_json::json!({"bench": "B8", "metric": "verifications_per_s_one_core", "unit": "/s", "value": rate, "rounds": args.rounds})
    );
    println!(
        "{}",
        serde_json::json!({"bench": "B8", "metric": "checkquote_verify_estimate_ms", "unit": "ms", "value": tools_verify_ms,
            "checkquote_ms": median(&checkquote_ms), "print_ms": median(&print_ms)})
    );
    Ok(())
}

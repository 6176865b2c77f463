//! B8: node attestation on a private swtpm. Latency of one quote + its verification, Tether's
//! path (tss-esapi quote, pure-Rust verify) against tpm2-tools' (`tpm2_quote` then
//! `tpm2_checkquote`) in the same run, interleaved; and quote verifications per second on one
//! core (the server's cost per node and interval), against `tpm2_checkquote` calls.

use std::{path::Path, time::Instant};

use anyhow::{bail, Context, Result};
use sandbox::swtpm::Swtpm;
use tether_attestors::tpm::{
    device::{Device, EkAlgorithm},
    verify::{AkVerifier, PcrValues},
    wire::Public,
};

use crate::report::Metric;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Quotes per round and side.
    #[arg(long, default_value_t = 20)]
    quotes: usize,
    /// Seconds of verification per round.
    #[arg(long, default_value_t = 1.0)]
    verify_seconds: f64,
}

const PCRS: &[u32] = &[0, 1, 2, 3, 4, 5, 6, 7];

fn tool(tpm: &Swtpm, dir: &Path, name: &str, args: &[&str]) -> Result<()> {
    let out = tpm.tool(name).args(args).current_dir(dir).output().with_context(|| format!("running {name}"))?;
    if !out.status.success() {
        bail!("{name} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// tpm2-tools: one quote and its check, as a shell-scripted attestation would do it.
fn tools_round(tpm: &Swtpm, dir: &Path, n: usize) -> Result<f64> {
    let start = Instant::now();
    for i in 0..n {
        let nonce = format!("{:064x}", i + 1);
        tool(
            tpm,
            dir,
            "tpm2_quote",
            &[
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
            ],
        )?;
        tool(
            tpm,
            dir,
            "tpm2_checkquote",
            &["-u", "ak.pub", "-m", "q.msg", "-s", "q.sig", "-f", "q.pcrs", "-g", "sha256", "-q", &nonce],
        )?;
    }
    Ok(start.elapsed().as_secs_f64() * 1e3 / n as f64)
}

/// Tether: what the agent does per re-attestation (open the TPM, load the EK and the
/// persistent AK, quote, read the PCRs) and what the server does (verify).
fn tether_round(tpm: &Swtpm, ak_dir: &Path, verifier: &AkVerifier, n: usize) -> Result<f64> {
    let start = Instant::now();
    for i in 0..n {
        let nonce = (i as u64 + 1).to_be_bytes();
        let mut dev = Device::open(&tpm.tcti())?;
        let ek = dev.endorsement(EkAlgorithm::Rsa)?;
        let ak = dev.attestation_key(&ek, ak_dir)?;
        let q = dev.quote(&ak, &nonce, "sha256", PCRS)?;
        let mut values = PcrValues::new();
        for (bank, index, value) in q.pcrs {
            values.insert_named(&bank, index, value)?;
        }
        verifier.verify_quote(&q.attest, &q.signature, &nonce, &values)?;
    }
    Ok(start.elapsed().as_secs_f64() * 1e3 / n as f64)
}

pub fn run(args: &Args) -> Result<()> {
    let tpm = Swtpm::start();
    let work = tempfile::tempdir()?;
    let dir = work.path();
    // tpm2-tools' AK (its own context file, as its users keep one).
    tool(
        &tpm,
        dir,
        "tpm2_createak",
        &["-C", "0x81010001", "-c", "ak.ctx", "-u", "ak.pub", "-f", "pem", "-G", "rsa", "-g", "sha256", "-s", "rsassa"],
    )?;
    // Persistent, as tpm2_quote on a TPM without a resource manager would otherwise leak a
    // transient object per call.
    tool(&tpm, dir, "tpm2_evictcontrol", &["-C", "o", "-c", "ak.ctx", "0x81010002"])?;
    tool(&tpm, dir, "tpm2_flushcontext", &["-t"])?;
    // Tether's persistent AK, and the server's verifier for it.
    let ak_dir = dir.join("tether-ak");
    let (verifier, sample) = {
        let mut dev = Device::open(&tpm.tcti())?;
        let ek = dev.endorsement(EkAlgorithm::Rsa)?;
        let ak = dev.attestation_key(&ek, &ak_dir)?;
        let verifier = AkVerifier::new(&Public::parse(&ak.public)?, &Public::parse(&ek.public)?)?;
        let q = dev.quote(&ak, b"sample", "sha256", PCRS)?;
        (verifier, q)
    };
    let mut sample_values = PcrValues::new();
    for (bank, index, value) in &sample.pcrs {
        sample_values.insert_named(bank, *index, value.clone())?;
    }

    let mut latency = Metric::new("B8", "quote+verify latency".into(), "ms");
    let mut rate = Metric::new("B8", "verifications per second, 1 core".into(), "/s");
    for _ in 0..args.rounds {
        let tools = tools_round(&tpm, dir, args.quotes)?;
        let ours = tether_round(&tpm, &ak_dir, &verifier, args.quotes)?;
        latency.push(tools, ours);
        // The baseline rate: tpm2_checkquote invocations per second (each a process).
        let start = Instant::now();
        let mut checks = 0u32;
        while start.elapsed().as_secs_f64() < args.verify_seconds / 4.0 {
            tool(
                &tpm,
                dir,
                "tpm2_checkquote",
                &[
                    "-u",
                    "ak.pub",
                    "-m",
                    "q.msg",
                    "-s",
                    "q.sig",
                    "-f",
                    "q.pcrs",
                    "-g",
                    "sha256",
                    "-q",
                    &format!("{:064x}", args.quotes),
                ],
            )?;
            checks += 1;
        }
        let baseline = f64::from(checks) / start.elapsed().as_secs_f64();
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed().as_secs_f64() < args.verify_seconds {
            for _ in 0..100 {
                verifier.verify_quote(&sample.attest, &sample.signature, b"sample", &sample_values)?;
            }
            n += 100;
        }
        rate.push(baseline, n as f64 / start.elapsed().as_secs_f64());
    }
    latency.print();
    rate.print();
    Ok(())
}

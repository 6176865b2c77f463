//! B9: server issuance. X.509-SVIDs issued per second on one core from CSRs (parse, verify
//! the CSR signature, build, sign) against the raw ECDSA P-256 sign rate of the same crypto
//! library (ring) in the same run; and the server-side cost of syncing 100,000 entries.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use ring::{
    rand::SystemRandom,
    signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING},
};
use tether_attestors::{Selector, SpiffeId};
use tether_server::{
    api::entry_to_proto,
    ca::{CaState, SvidRequest},
    store::{Entry, Store},
};

use crate::report::{median, Metric};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Length of each timed phase.
    #[arg(long, default_value_t = 1000)]
    millis: u64,
    #[arg(long, default_value_t = 100_000)]
    entries: usize,
}

/// Operations per second over `window`. Only operations that succeed count, and one failure
/// ends the benchmark: a failed signing is not an issued SVID.
fn rate(window: Duration, mut op: impl FnMut() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < window {
        op()?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

pub fn run(args: &Args) -> Result<()> {
    let now = tether_server::api::now();
    let ca = CaState::new("bench.tether", now, 86_400)?;
    let id = SpiffeId::parse("spiffe://bench.tether/workload")?;
    let csrs: Vec<Vec<u8>> = (0..64)
        .map(|_| {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            Ok(CertificateParams::default().serialize_request(&key)?.der().to_vec())
        })
        .collect::<Result<_>>()?;
    let rng = SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).map_err(|e| anyhow::anyhow!("{e}"))?;
    let raw_key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let tbs = vec![0x5au8; 400]; // about the size of an SVID's to-be-signed part

    let sig = raw_key.sign(&rng, &tbs).map_err(|e| anyhow::anyhow!("{e}"))?;
    let public = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        ring::signature::KeyPair::public_key(&raw_key).as_ref().to_vec(),
    );

    let window = Duration::from_millis(args.millis);
    let mut issue = Metric::new("server", "svids_issued_per_s_vs_raw_sign".into(), "op/s");
    // Issuing must also verify the CSR's signature (proof of possession): the floor for
    // "one verify + one sign" is the harmonic combination of the two raw rates.
    let mut floor = Metric::new("server", "svids_issued_vs_raw_verify_plus_sign".into(), "op/s");
    for _ in 0..args.rounds {
        let raw =
            rate(window, || raw_key.sign(&rng, &tbs).map(drop).map_err(|e| anyhow::anyhow!("raw sign failed: {e}")))?;
        let verify =
            rate(window, || public.verify(&tbs, sig.as_ref()).map_err(|e| anyhow::anyhow!("raw verify failed: {e}")))?;
        let mut i = 0;
        let issued = rate(window, || {
            let req = SvidRequest { spiffe_id: &id, ttl: 3600, dns_names: &[] };
            let chain = ca.sign_x509_svid(&csrs[i % csrs.len()], &req, now).context("issuing an X.509-SVID")?;
            i += 1;
            if chain.is_empty() {
                bail!("issuance returned an empty chain");
            }
            Ok(())
        })?;
        issue.push(raw, issued);
        floor.push(1.0 / (1.0 / raw + 1.0 / verify), issued);
    }
    println!(
        "B9 server: issuance on one core, {} rounds of {} ms each, interleaved with raw ECDSA P-256 signing (ring); \
         only successful issuances count (any failure stops the bench)",
        args.rounds, args.millis
    );
    issue.print();
    floor.print();

    // Entry sync: the server's side of SyncEntries for a node with many entries (store query
    // + protobuf conversion), on a file-backed SQLite store.
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("bench.db"))?;
    let parent = SpiffeId::parse("spiffe://bench.tether/node/big")?;
    let entries: Vec<Entry> = (0..args.entries)
        .map(|i| -> Result<Entry> {
            Ok(Entry {
                id: String::new(),
                spiffe_id: SpiffeId::parse(&format!("spiffe://bench.tether/w/{i}"))?,
                parent_id: parent.clone(),
                selectors: vec![Selector::parse(&format!("unix:uid:{i}"))?, Selector::parse("cgroup:path:/bench")?],
                x509_ttl: 0,
                jwt_ttl: 0,
                dns_names: vec![],
                hint: String::new(),
                admin: false,
                namespace: "default".into(),
                labels: BTreeMap::new(),
                revision: 0,
            })
        })
        .collect::<Result<_>>()?;
    let t = Instant::now();
    store.create_entries(entries, "bench.tether")?;
    let insert = t.elapsed();
    let mut sync_ms = Vec::new();
    for _ in 0..args.rounds {
        let t = Instant::now();
        let listed = store.list_entries(None, Some(&parent.to_string()))?;
        let protos: Vec<_> = listed.iter().map(entry_to_proto).collect();
        assert_eq!(protos.len(), args.entries);
        sync_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let median_ms = median(&sync_ms);
    println!(
        "server     entry_sync_{}            {:>10.1} ms (median of {}; one transaction to insert them: {:.1} s)",
        args.entries,
        median_ms,
        sync_ms.len(),
        insert.as_secs_f64()
    );
    println!(
        "{}",
        serde_json::json!({"bench": "server", "metric": format!("entry_sync_{}_ms", args.entries), "unit": "ms", "value": median_ms, "rounds": sync_ms.len()})
    );
    Ok(())
}

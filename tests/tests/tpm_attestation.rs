//! TPM node attestation end to end: a private swtpm per test, the real server binary, the real
//! agent. Forged evidence is built from a real TPM's output and then altered, each forgery
//! refused with its own error and nothing issued.

mod common;

use std::{path::Path, process::Command};

use common::{agents, matches_pattern, refused, zero_policy, Forge, Node};
use sandbox::swtpm::{Swtpm, Vendor};
use sandbox::{cgroup2_root, require_root, CgroupGuard};
use tether_attestors::tpm::device::EkAlgorithm;
use tether_proto::node;
use tether_tests::{plane::Plane, wait_for};

const SPIFFE_CLIENT: &str = env!("CARGO_BIN_EXE_tether-spiffe-client");

/// A golden policy directory holding the TPM's current PCRs 0-7, written by the agent's own
/// `tpm pcrs` command (what an image builder runs).
fn policy_from(tpm: &Swtpm, dir: &Path, name: &str) -> String {
    let out = Command::new(tether_tests::agent_bin())
        .args(["tpm", "pcrs", "--tcti", &tpm.tcti(), "--name", name])
        .output()
        .unwrap();
    assert!(out.status.success(), "tpm pcrs: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    std::fs::write(dir.join(format!("{name}.toml")), &text).unwrap();
    text
}

/// The EK hash computed independently of Tether: the certificate read with tpm2-tools, its
/// public key hashed with openssl.
fn ek_hash_by_tools(tpm: &Swtpm, dir: &Path) -> String {
    let nv = dir.join("ek-nv.bin");
    let out = tpm.tool("tpm2_nvread").args(["0x1c00002", "-C", "o", "-o"]).arg(&nv).output().unwrap();
    assert!(out.status.success(), "tpm2_nvread: {}", String::from_utf8_lossy(&out.stderr));
    let script = format!(
        "openssl x509 -inform der -in {} -pubkey -noout | openssl pkey -pubin -outform der | sha256sum",
        nv.display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let hash = text.split_whitespace().next().unwrap_or_default().to_owned();
    assert_eq!(hash.len(), 64, "openssl: {text} {}", String::from_utf8_lossy(&out.stderr));
    hash
}

fn cgroup_selector(cg: &CgroupGuard) -> String {
    format!("cgroup:path:/{}", cg.path().strip_prefix(cgroup2_root().unwrap()).unwrap().display())
}

fn fetch(plane: &Plane, cg: &CgroupGuard) -> (bool, String, String) {
    let out = cg.run(plane.workload(Path::new(SPIFFE_CLIENT)).arg("x509")).unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tpm_node_attests_and_its_workloads_get_svids() {
    require_root().unwrap();
    let tpm = Swtpm::start();
    let policies = tempfile::tempdir().unwrap();
    let snippet = policy_from(&tpm, policies.path(), "base");
    assert_eq!(snippet.lines().filter(|l| l.contains(" = \"0000")).count(), 8, "PCRs 0-7, zero on swtpm:\n{snippet}");
    let expected_hash = ek_hash_by_tools(&tpm, policies.path());

    let plane = Plane::start_tpm(1, &tpm, policies.path(), "rsa", 60);
    assert_eq!(plane.node_id, format!("spiffe://example.org/tether/agent/tpm/{expected_hash}"));
    assert!(plane.log("agent").contains("RUNNING ON A SOFTWARE TPM"), "the agent must say so loudly");
    let list = agents(&plane);
    for sel in [
        format!("tpm:ek-hash:{expected_hash}"),
        "tpm:policy:base".into(),
        "tpm:ek-type:rsa-2048".into(),
        "tpm:ca-subject:".into(),
    ] {
        assert!(list.contains(&sel), "node selector {sel} missing:\n{list}");
    }

    // A workload entry directly under the node, and one under a node alias chosen by node
    // selector (every node whose TPM matched the golden policy "base").
    let cg = CgroupGuard::new("tpm-wl").unwrap();
    let cg2 = CgroupGuard::new("tpm-wl-alias").unwrap();
    plane.entry("spiffe://example.org/tpm-web", &[&cgroup_selector(&cg), "unix:uid:0"], &[]);
    let alias = "spiffe://example.org/fleet/golden";
    plane.entry_under("spiffe://example.org/tether/server", alias, &["tpm:policy:base"], &[]);
    plane.entry_under(alias, "spiffe://example.org/fleet-web", &[&cgroup_selector(&cg2), "unix:uid:0"], &[]);
    plane.wait_issued("spiffe://example.org/tpm-web");
    plane.wait_issued("spiffe://example.org/fleet-web");
    let (ok, out, err) = fetch(&plane, &cg);
    assert!(ok && out.contains("spiffe://example.org/tpm-web"), "{out}{err}");
    let (ok, out, err) = fetch(&plane, &cg2);
    assert!(ok && out.contains("spiffe://example.org/fleet-web"), "{out}{err}");
}

#[test]
fn a_changed_boot_measurement_revokes_and_a_staged_policy_restores() {
    require_root().unwrap();
    let tpm = Swtpm::start();
    let policies = tempfile::tempdir().unwrap();
    policy_from(&tpm, policies.path(), "image-v1");
    let plane = Plane::start_tpm(1, &tpm, policies.path(), "ecc", 1);
    let cg = CgroupGuard::new("tpm-drift").unwrap();
    plane.entry("spiffe://example.org/drift", &[&cgroup_selector(&cg), "unix:uid:0"], &[]);
    plane.wait_issued("spiffe://example.org/drift");
    assert!(fetch(&plane, &cg).0);

    // The node "boots" something else: PCR 7 changes.
    let out = tpm.tool("tpm2_pcrextend").arg(format!("7:sha256={}", "ab".repeat(32))).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("the agent to report the node unattested", || {
        plane.log("agent").contains("NODE NOT ATTESTED").then_some(())
    });
    let server = plane.log("server");
    assert!(server.contains("TPM re-attestation failed") && server.contains("PCR 7 is"), "{server}");
    // The agent's own client shows the status the Workload API answers with (the SPIFFE
    // libraries retry PermissionDenied silently).
    let out = cg.run(plane.workload(&tether_tests::agent_bin()).args(["api", "fetch", "x509"])).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not attested"), "workload SVIDs must stop at once: {err}");
    assert!(!agents(&plane).contains(&plane.node_id), "the server revoked the node");
    let status = std::fs::read_to_string(plane.dir.path().join("agent/node-status.json")).unwrap();
    assert!(status.contains("\"attested\":false") && status.contains("PCR 7"), "{status}");

    // The operator stages the new image's golden values: the node attests again by itself.
    policy_from(&tpm, policies.path(), "image-v2");
    wait_for("the node to attest again", || plane.log("agent").contains("node attested again").then_some(()));
    wait_for("a workload SVID again", || fetch(&plane, &cg).0.then_some(()));
    assert!(agents(&plane).contains("tpm:policy:image-v2"));
}

/// A node whose last accepted quote is older than `max_evidence_age_seconds` is refused
/// service (its workloads lose their SVIDs), while a node that keeps re-attesting within the
/// limit keeps being served.
#[test]
fn evidence_older_than_the_limit_is_refused_service() {
    require_root().unwrap();
    let (tpm_fresh, tpm_stale) = (Swtpm::start(), Swtpm::start());
    let policies = tempfile::tempdir().unwrap();
    policy_from(&tpm_fresh, policies.path(), "base");
    let limit = "max_evidence_age_seconds = 6\n";
    let (cg_fresh, cg_stale) = (CgroupGuard::new("tpm-age-fresh").unwrap(), CgroupGuard::new("tpm-age-stale").unwrap());
    // Re-attests every second: always within the limit.
    let fresh = Plane::start_tpm_with(1, &tpm_fresh, policies.path(), "rsa", 1, limit);
    fresh.entry("spiffe://example.org/fresh", &[&cgroup_selector(&cg_fresh), "unix:uid:0"], &[]);
    // Re-attests every 10 minutes (and at node SVID renewal, half an hour away): its evidence
    // outlives the limit 6 s after it attested.
    let stale = Plane::start_tpm_with(1, &tpm_stale, policies.path(), "rsa", 600, limit);
    stale.entry("spiffe://example.org/stale", &[&cgroup_selector(&cg_stale), "unix:uid:0"], &[]);
    stale.wait_issued("spiffe://example.org/stale");
    assert!(fetch(&stale, &cg_stale).0, "served while its quote is fresh");
    fresh.wait_issued("spiffe://example.org/fresh");

    wait_for("the server to refuse the stale node", || stale.log("agent").contains("NODE NOT ATTESTED").then_some(()));
    let log = stale.log("agent");
    assert!(log.contains("last TPM quote is") && log.contains("(limit 6 s): re-attest"), "{log}");
    let out = cg_stale.run(stale.workload(&tether_tests::agent_bin()).args(["api", "fetch", "x509"])).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not attested"), "stale evidence still served: {err}");

    // The node that re-attests is served past the limit.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (ok, out, err) = fetch(&fresh, &cg_fresh);
    assert!(ok && out.contains("spiffe://example.org/fresh"), "{out}{err}\n{}", fresh.log("agent"));
    assert!(!fresh.log("agent").contains("NODE NOT ATTESTED"), "{}", fresh.log("agent"));
}

// ---- forgeries, against the server's node API directly (helpers in common/) ----

#[test]
fn patterns_match_whole_messages_only() {
    assert!(matches_pattern("quote: nonce", "quote: nonce"));
    assert!(!matches_pattern("quote: nonce!", "quote: nonce"));
    assert!(matches_pattern("node abc is banned", "node * is banned"));
    assert!(!matches_pattern("node abc is not banned", "node * is banned"));
    assert!(matches_pattern("a x b y c", "a * b * c"));
    assert!(!matches_pattern("a x c", "a * b * c"));
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_identities_are_refused_and_nothing_is_issued() {
    let mut f = Forge::new(zero_policy()).await;
    let tpm_a = Swtpm::start();
    let tpm_b = Swtpm::start_vendor(Vendor::B);
    let mut a = Node::open(&tpm_a, EkAlgorithm::Rsa);
    let mut b = Node::open(&tpm_b, EkAlgorithm::Rsa);
    use tonic::Code::{InvalidArgument, PermissionDenied};

    // EK certificate from a manufacturer the server does not trust.
    refused(
        f.begin(&b.hello()).await,
        PermissionDenied,
        // Vendor B's CAs carry the same names as vendor A's: found by name, refused by key.
        "EK certificate: signature on certificate CN=unknown does not verify with its issuer's key",
    );
    f.assert_nothing_issued();

    // A genuine certificate that is not this EK's (the ECC EK's certificate, the RSA EK).
    let a_ecc = Node::open(&tpm_a, EkAlgorithm::Ecc);
    let mut h = a.hello();
    h.ek_certificate = a_ecc.ek.certificate.clone();
    refused(
        f.begin(&h).await,
        PermissionDenied,
        "EK public key does not match its certificate: ek public key does not match the ek certificate",
    );
    f.assert_nothing_issued();

    // An AK with the wrong attributes: `restricted` cleared (TPMT_PUBLIC bytes 4..8).
    let mut h = a.hello();
    h.ak_public[5] &= !0x01; // restricted is bit 16
    refused(f.begin(&h).await, PermissionDenied, "attestation key: ak attribute restricted must be set");
    f.assert_nothing_issued();

    // An AK not in the EK's TPM: A's EK and certificate, B's AK. B cannot activate a
    // credential made for A's EK; a made-up secret is refused.
    let mut h = a.hello();
    h.ak_public = b.ak.public.clone();
    let (id, c) = f.begin(&h).await.unwrap();
    assert!(b.dev.activate_credential(&b.ek, &b.ak, &c.credential_blob, &c.encrypted_secret).is_err());
    let mut ev = b.quote(&c, &b.bound(&c));
    ev.activated_secret = vec![7; 32];
    refused(
        f.attest(&id, &ev, &b.csr).await,
        PermissionDenied,
        "credential activation failed: the AK is not in the same TPM as the EK",
    );
    f.assert_nothing_issued();

    // A quote signed by another key (B's AK) for A's attestation.
    let (id, c) = f.begin(&a.hello()).await.unwrap();
    let mut ev = a.answer(&c);
    let forged = b.quote(&c, &a.bound(&c));
    ev.quote = forged.quote;
    ev.signature = forged.signature;
    refused(f.attest(&id, &ev, &a.csr).await, PermissionDenied, "quote: quote signature does not verify with the ak");
    f.assert_nothing_issued();

    // A stale nonce: a quote made for another challenge.
    let (id, c) = f.begin(&a.hello()).await.unwrap();
    let mut ev = a.answer(&c);
    let stale = a.quote(&c, b"an old nonce from another round");
    ev.quote = stale.quote;
    ev.signature = stale.signature;
    refused(
        f.attest(&id, &ev, &a.csr).await,
        PermissionDenied,
        "quote: quote nonce does not match the challenge (stale or replayed quote)",
    );
    f.assert_nothing_issued();

    // PCR values that are not the ones quoted.
    let (id, c) = f.begin(&a.hello()).await.unwrap();
    let mut ev = a.answer(&c);
    ev.pcr_values[3].value[0] ^= 1;
    refused(
        f.attest(&id, &ev, &a.csr).await,
        PermissionDenied,
        "quote: reported pcr values do not match the quoted pcr digest",
    );
    f.assert_nothing_issued();

    // Truncated and garbage structures.
    let mut h = a.hello();
    h.ek_public.truncate(20);
    refused(f.begin(&h).await, InvalidArgument, "malformed EK public (TPMT_PUBLIC): *");
    f.assert_nothing_issued();
    let r = f
        .client
        .begin_attestation(node::BeginAttestationRequest { attestor: "tpm".into(), payload: vec![0xff; 40] })
        .await;
    refused(r, InvalidArgument, "malformed hello: *");
    f.assert_nothing_issued();
    let (id, c) = f.begin(&a.hello()).await.unwrap();
    let mut ev = a.answer(&c);
    ev.quote.truncate(ev.quote.len() / 2);
    refused(
        f.attest(&id, &ev, &a.csr).await,
        PermissionDenied,
        "quote: tpms_attest truncated at offset 44: extraData needs 32 bytes, 28 left",
    );
    f.assert_nothing_issued();

    // The genuine flow passes; replaying it, whole or with a new challenge, does not.
    let (id, c) = f.begin(&a.hello()).await.unwrap();
    let ev = a.answer(&c);
    let ok = f.attest(&id, &ev, &a.csr).await.unwrap();
    assert!(ok.node_id.starts_with("spiffe://example.org/tether/agent/tpm/"));
    assert!(agents(&f.plane).starts_with("Found 1 attested agents"), "the genuine node is stored");
    refused(
        f.attest(&id, &ev, &a.csr).await,
        PermissionDenied,
        "unknown, expired, evicted or already used challenge (replayed attestation?)",
    );
    let (id2, _) = f.begin(&a.hello()).await.unwrap();
    refused(
        f.attest(&id2, &ev, &a.csr).await,
        PermissionDenied,
        "credential activation failed: the AK is not in the same TPM as the EK",
    );
    assert!(agents(&f.plane).starts_with("Found 1 attested agents"), "a replay stored another node");
}

#[tokio::test(flavor = "multi_thread")]
async fn evidence_outside_policy_rolled_back_tpms_and_banned_eks_are_refused() {
    let mut f = Forge::new(zero_policy()).await;
    let mut tpm = Swtpm::start();
    let snapshot = tempfile::tempdir().unwrap();

    // First attestation, then a reboot whose pre-reboot state we keep.
    let ok = {
        let mut a = Node::open(&tpm, EkAlgorithm::Rsa);
        let (id, c) = f.begin(&a.hello()).await.unwrap();
        let ev = a.answer(&c);
        f.attest(&id, &ev, &a.csr).await.unwrap()
    };
    tpm.snapshot_and_reboot(snapshot.path());
    // Booting the snapshot would itself be one reboot; a second real one puts it behind.
    tpm.reboot();
    {
        let mut a = Node::open(&tpm, EkAlgorithm::Rsa);
        let (id, c) = f.begin(&a.hello()).await.unwrap();
        let ev = a.answer(&c);
        f.attest(&id, &ev, &a.csr).await.unwrap();
    }
    // The TPM rolled back to its state from before that reboot: its counters are behind.
    let old = Swtpm::start_from_state(snapshot.path());
    {
        let mut a = Node::open(&old, EkAlgorithm::Rsa);
        let (id, c) = f.begin(&a.hello()).await.unwrap();
        let ev = a.answer(&c);
        refused(
            f.attest(&id, &ev, &a.csr).await,
            tonic::Code::PermissionDenied,
            "TPM clock: tpm reset count went back from * to *: quote from before a reboot (replayed)",
        );
        assert!(agents(&f.plane).starts_with("Found 1 attested agents"), "only the genuine node is stored");
    }

    // A genuine quote of PCR values outside every golden set.
    {
        let mut a = Node::open(&tpm, EkAlgorithm::Rsa);
        a.dev.extend("sha256", 4, &[0x42; 32]).unwrap();
        let (id, c) = f.begin(&a.hello()).await.unwrap();
        let ev = a.answer(&c);
        refused(
            f.attest(&id, &ev, &a.csr).await,
            tonic::Code::PermissionDenied,
            &format!("PCR values match no golden policy (zeros: PCR 4 is * (expected {}))", "00".repeat(32)),
        );
        // Refused, nothing new stored (the node attested before stays as it was).
        assert!(agents(&f.plane).starts_with("Found 1 attested agents"), "{}", agents(&f.plane));
    }

    // Banned by EK hash: this EK never attests again (whatever its PCRs).
    let hash = ok.node_id.rsplit('/').next().unwrap().to_owned();
    f.plane.cli_ok(&["agent", "evict", "--spiffe-id", &format!("tpm:ek-hash:{hash}"), "--ban"]);
    // Refused before the server makes it any credential.
    let fresh = Swtpm::start();
    let a = Node::open(&fresh, EkAlgorithm::Rsa);
    refused(
        f.begin(&a.hello()).await,
        tonic::Code::PermissionDenied,
        &format!("node spiffe://example.org/tether/agent/tpm/{hash} is banned"),
    );
    f.assert_nothing_issued();
}

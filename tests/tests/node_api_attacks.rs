//! Attacks on the node API played against the real server binary, private swtpms and the
//! agent's own node client:
//! - a challenge flood with public EK certificates must not starve attested nodes'
//!   re-attestation (I5), nor first attestations from other addresses;
//! - many challenges for one EK evict only that EK's oldest;
//! - a relay that forwards a node's evidence with its own CSR gets nothing (I8);
//! - IDs under `/tether/` (the server's and its agents') cannot be registered (I1, I6).

mod common;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::{agents, refused, zero_policy, Forge, Node};
use prost::Message;
use sandbox::{require_root, swtpm::Swtpm};
use tether_agent::{config::AgentConfig, node_client::NodeSession, svid::new_key};
use tether_attestors::tpm::{binding::BoundKey, device::EkAlgorithm};
use tether_proto::{node, node::node_client::NodeClient};
use tether_tests::plane::Plane;
use tonic::Code::{PermissionDenied, ResourceExhausted};

/// An agent configuration attesting with `tpm`'s `ek` ("rsa" or "ecc"), for the agent's node
/// client in process.
fn tpm_agent(plane: &Plane, name: &str, tpm: &Swtpm, ek: &str) -> AgentConfig {
    let text = format!(
        "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1:{}\"\ntrust_bundle_path = \"{}\"\ndata_dir = \"{}\"\nsocket_path = \"/unused/{name}.sock\"\n[tpm]\ntcti = \"{}\"\nek = \"{ek}\"\n",
        plane.port,
        plane.dir.path().join("server/bundle.pem").display(),
        plane.dir.path().join(name).display(),
        tpm.tcti()
    );
    AgentConfig::parse(&text, Path::new("generated")).unwrap()
}

/// What the flood saw.
#[derive(Default)]
struct Tally {
    sent: AtomicUsize,
    accepted: AtomicUsize,
    exhausted: AtomicUsize,
    first_refusal: Mutex<Option<String>>,
    other: Mutex<Vec<String>>,
}

/// BeginAttestation with `hellos` in turn, from `tasks` concurrent loops on one connection,
/// as fast as the server answers, until `stop` (or 100,000 requests).
fn flood(
    client: NodeClient<tonic::transport::Channel>,
    hellos: Vec<Vec<u8>>,
    tasks: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..tasks)
        .map(|t| {
            let (mut client, hellos, stop, tally) = (client.clone(), hellos.clone(), stop.clone(), tally.clone());
            tokio::spawn(async move {
                let mut i = t;
                while !stop.load(Relaxed) && tally.sent.fetch_add(1, Relaxed) < 100_000 {
                    let payload = hellos[i % hellos.len()].clone();
                    i += 1;
                    match client
                        .begin_attestation(node::BeginAttestationRequest { attestor: "tpm".into(), payload })
                        .await
                    {
                        Ok(_) => {
                            tally.accepted.fetch_add(1, Relaxed);
                        }
                        Err(s) if s.code() == ResourceExhausted => {
                            tally.exhausted.fetch_add(1, Relaxed);
                            tally.first_refusal.lock().unwrap().get_or_insert_with(|| s.message().to_owned());
                        }
                        Err(s) => tally.other.lock().unwrap().push(format!("{:?}: {}", s.code(), s.message())),
                    }
                }
            })
        })
        .collect()
}

/// `fut` must finish within `limit` (generous: the point is that it is not starved).
async fn within<T>(what: &str, limit: Duration, fut: impl std::future::Future<Output = T>) -> (T, Duration) {
    let start = Instant::now();
    let out =
        tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| panic!("{what} did not complete within {limit:?}"));
    (out, start.elapsed())
}

/// One address floods BeginAttestation, as fast as the server answers, with public EK
/// certificates: the very ones of the two nodes below (the RSA and the ECC EK of the test
/// manufacturer's TPM; every swtpm copy has both). Meanwhile the RSA node, attested before,
/// re-attests and renews its node SVID with fresh evidence, and the ECC node attests for the
/// first time from another address: all succeed promptly, and the flood is told
/// ResourceExhausted. (With one table for all challenges, 4,096 of the flood's filled it and
/// all three were refused.)
#[tokio::test(flavor = "multi_thread")]
async fn a_challenge_flood_starves_neither_reattestation_nor_other_addresses() {
    require_root().unwrap();
    // Six per address, so two EKs (four each at most) exceed it and the flood is refused.
    let f = Forge::with(zero_policy(), "max_pending_challenges_per_source = 6\n").await;
    let (tpm_node, tpm_new, tpm_flood) = (Swtpm::start(), Swtpm::start(), Swtpm::start());
    let config = tpm_agent(&f.plane, "node", &tpm_node, "rsa");
    let mut node = NodeSession::establish(&config).await.expect("the node attests before the flood");

    let hellos: Vec<Vec<u8>> = [EkAlgorithm::Rsa, EkAlgorithm::Ecc]
        .into_iter()
        .map(|alg| Node::open(&tpm_flood, alg).hello().encode_to_vec())
        .collect();
    let flooder = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let client = NodeClient::new(Forge::channel(&f.plane, Some(flooder)).await);
    let (stop, tally) = (Arc::new(AtomicBool::new(false)), Arc::new(Tally::default()));
    let tasks = flood(client, hellos, 16, stop.clone(), tally.clone());
    // The flood is on: well past its own limit, and refused at least once.
    let deadline = Instant::now() + Duration::from_secs(120);
    while tally.sent.load(Relaxed) < 1000 || tally.exhausted.load(Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the flood never got going: {} sent, {} refused, other errors {:?}",
            tally.sent.load(Relaxed),
            tally.exhausted.load(Relaxed),
            tally.other.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent_before = tally.sent.load(Relaxed);

    let limit = Duration::from_secs(10);
    let (r, reattest_took) = within("re-attestation", limit, node.reattest()).await;
    r.expect("re-attestation during the flood");
    let (r, renew_took) = within("node SVID renewal with evidence", limit, node.renew(&config)).await;
    r.expect("renewal during the flood");
    let config_new = tpm_agent(&f.plane, "new", &tpm_new, "ecc");
    let (r, attest_took) = within("a first attestation", limit, NodeSession::establish(&config_new)).await;
    r.expect("a first attestation from another address during the flood");
    let during = tally.sent.load(Relaxed) - sent_before;

    stop.store(true, Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (sent, accepted, exhausted) =
        (tally.sent.load(Relaxed), tally.accepted.load(Relaxed), tally.exhausted.load(Relaxed));
    eprintln!(
        "flood: {sent} sent ({during} while the nodes worked), {accepted} accepted, {exhausted} refused; \
         re-attestation {reattest_took:?}, renewal {renew_took:?}, first attestation {attest_took:?}"
    );
    assert!(during > 0, "the flood stopped while the nodes worked");
    assert!(tally.other.lock().unwrap().is_empty(), "{:?}", tally.other.lock().unwrap());
    assert_eq!(
        tally.first_refusal.lock().unwrap().as_deref(),
        Some(
            "too many pending TPM challenges from 127.0.0.2 (limit tpm.max_pending_challenges_per_source = 6): \
             answer them or let them expire (60 s)"
        )
    );
    let list = agents(&f.plane);
    assert!(list.starts_with("Found 2 attested agents"), "{list}");
    let log = f.plane.log("server");
    assert!(
        log.lines().any(|l| l.contains("TPM attestation refused") && l.contains("127.0.0.2")),
        "refusals are audited"
    );
    assert!(!log.contains("TPM re-attestation failed"), "{log}");
}

/// Ten challenges for one EK: its six oldest are evicted (answering them is refused, and
/// issues nothing), its four newest stand; a challenge another EK got before them stands too.
#[tokio::test(flavor = "multi_thread")]
async fn challenges_for_one_ek_evict_only_that_eks_oldest() {
    require_root().unwrap();
    let mut f = Forge::new(zero_policy()).await;
    // Two TPMs (one client each); every copy has the same two EKs, so one uses each.
    let (tpm_a, tpm_b) = (Swtpm::start(), Swtpm::start());
    let (mut a, mut b) = (Node::open(&tpm_a, EkAlgorithm::Rsa), Node::open(&tpm_b, EkAlgorithm::Ecc));

    let (b_id, b_challenge) = f.begin(&b.hello()).await.unwrap();
    let mut a_challenges = Vec::new();
    for _ in 0..10 {
        a_challenges.push(f.begin(&a.hello()).await.expect("one EK is never refused, it evicts"));
    }
    let evicted = "unknown, expired, evicted or already used challenge (replayed attestation?)";
    for (id, c) in &a_challenges[..6] {
        let ev = a.answer(c);
        refused(f.attest(id, &ev, &a.csr).await, PermissionDenied, evicted);
    }
    f.assert_nothing_issued();
    // The other EK's challenge, older than all of them, was not touched.
    let ev = b.answer(&b_challenge);
    f.attest(&b_id, &ev, &b.csr).await.expect("another EK's challenge survives");
    // The EK's newest are answerable (each answers once: the node attests again each time).
    for (id, c) in &a_challenges[6..] {
        let ev = a.answer(c);
        f.attest(id, &ev, &a.csr).await.expect("the EK's newest challenges stand");
    }
    let list = agents(&f.plane);
    assert!(list.starts_with("Found 2 attested agents"), "{list}");
}

/// A relay (e.g. a rogue server the node was talked into) forwards the node's challenge,
/// takes its genuine evidence and submits it with a CSR for its own key. The quote's
/// qualifying data covers the node's CSR key, so the server refuses and issues nothing;
/// rewriting the evidence's key claim changes only the message. The node, asking itself,
/// gets its SVID for its own key.
#[tokio::test(flavor = "multi_thread")]
async fn relayed_evidence_with_another_csr_is_refused() {
    require_root().unwrap();
    let mut f = Forge::new(zero_policy()).await;
    let tpm = Swtpm::start();
    let mut node = Node::open(&tpm, EkAlgorithm::Rsa);
    let relay_csr = new_key().unwrap().csr_der;

    let (id, c) = f.begin(&node.hello()).await.unwrap();
    let genuine = node.answer(&c);
    refused(
        f.attest(&id, &genuine, &relay_csr).await,
        PermissionDenied,
        "quote does not cover the CSR's key: it answers this challenge for another key (relayed evidence?)",
    );
    f.assert_nothing_issued();
    // The challenge is spent: the node's own answer to it is refused too (it asks again).
    refused(
        f.attest(&id, &genuine, &node.csr).await,
        PermissionDenied,
        "unknown, expired, evicted or already used challenge (replayed attestation?)",
    );

    // The relay claims its own key in the evidence: still refused, now as a stale quote.
    let (id, c) = f.begin(&node.hello()).await.unwrap();
    let mut ev = node.answer(&c);
    ev.bound_key_sha256 = BoundKey::Csr(&relay_csr).key_hash().unwrap().to_vec();
    refused(
        f.attest(&id, &ev, &relay_csr).await,
        PermissionDenied,
        "quote: quote nonce does not match the challenge (stale or replayed quote)",
    );
    f.assert_nothing_issued();

    // A quote over the bare nonce (an agent from before key binding) binds no key.
    let (id, c) = f.begin(&node.hello()).await.unwrap();
    let mut ev = node.answer(&c);
    let bare = node.quote(&c, &c.nonce);
    (ev.quote, ev.signature) = (bare.quote, bare.signature);
    refused(
        f.attest(&id, &ev, &relay_csr).await,
        PermissionDenied,
        "quote does not cover the CSR's key: its qualifying data is the bare nonce (an agent from before key binding?)",
    );
    f.assert_nothing_issued();

    // The node itself: its SVID certifies the key its quote covered.
    let (id, c) = f.begin(&node.hello()).await.unwrap();
    let ev = node.answer(&c);
    let ok = f.attest(&id, &ev, &node.csr).await.expect("the genuine node attests");
    let leaf = x509_parser::parse_x509_certificate(&ok.svid_chain).unwrap().1;
    assert_eq!(
        tether_attestors::tpm::binding::key_hash(leaf.public_key().raw),
        node.key_hash(),
        "the node SVID is for the key the quote covered"
    );
    assert!(agents(&f.plane).starts_with("Found 1 attested agents"));
}

/// `spiffe://<td>/tether/...` names the server and the nodes it attests: neither an entry nor
/// a join token's chosen node ID may take such an ID, through the CLI (admin API), and
/// nothing is stored.
#[test]
fn ids_under_tether_cannot_be_registered() {
    require_root().unwrap();
    let plane = Plane::server_only("");
    let reserved = |id: &str| {
        format!(
            "error: The caller does not have permission to execute the specified operation: {id} is reserved: \
             IDs under /tether/ name the server and the nodes it attests, and cannot be registered\n"
        )
    };
    let create = |id: &str, parent: &str| {
        plane.cli(&["entry", "create", "--spiffe-id", id, "--parent-id", parent, "--selector", "unix:uid:0"])
    };
    for (id, parent) in [
        // The server's own identity: a workload holding it could pose as the server to agents.
        ("spiffe://example.org/tether/server", "spiffe://example.org/node/a"),
        // A TPM node's ID (as the server derives it), under a node alias.
        ("spiffe://example.org/tether/agent/tpm/ab12", "spiffe://example.org/tether/server"),
        ("spiffe://example.org/tether", "spiffe://example.org/node/a"),
    ] {
        let out = create(id, parent);
        assert!(!out.status.success(), "{id} was registered");
        assert_eq!(String::from_utf8_lossy(&out.stderr), reserved(id));
    }
    let out = plane.cli(&["token", "generate", "--node-id", "spiffe://example.org/tether/server"]);
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), reserved("spiffe://example.org/tether/server"));
    assert_eq!(plane.cli_ok(&["entry", "show"]), "Found 0 entries\n", "nothing stored");

    // An entry may be parented there (node aliases are), and a look-alike path is not
    // reserved; but it cannot be moved under /tether/.
    let id = plane.entry_under(
        "spiffe://example.org/tether/server",
        "spiffe://example.org/tethered",
        &["tpm:policy:x"],
        &[],
    );
    let out = plane.cli(&[
        "entry",
        "update",
        "--id",
        &id,
        "--spiffe-id",
        "spiffe://example.org/tether/agent/x",
        "--parent-id",
        "spiffe://example.org/tether/server",
        "--selector",
        "tpm:policy:x",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stderr), reserved("spiffe://example.org/tether/agent/x"));
    let show = plane.cli_ok(&["entry", "show"]);
    assert!(
        show.starts_with("Found 1 entries") && show.contains("SPIFFE ID     : spiffe://example.org/tethered\n"),
        "{show}"
    );
    let log = plane.log("server");
    assert_eq!(log.matches("refused: reserved SPIFFE ID").count(), 5, "each refusal is audited:\n{log}");
}

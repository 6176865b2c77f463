//! The node API's authorisation: a node can only obtain SVIDs for entries it may serve,
//! bad CSRs issue nothing, and an evicted node is cut off.

use std::path::Path;

use tether_agent::{config::AgentConfig, node_client::NodeSession, svid::new_key};
use tether_tests::plane::Plane;

fn agent_config(plane: &Plane, name: &str, token: &str) -> AgentConfig {
    let text = format!(
        "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1:{}\"\ntrust_bundle_path = \"{}\"\njoin_token = \"{token}\"\ndata_dir = \"{}\"\nsocket_path = \"/unused/{name}.sock\"\n",
        plane.port,
        plane.dir.path().join("server/bundle.pem").display(),
        plane.dir.path().join(name).display()
    );
    AgentConfig::parse(&text, Path::new("generated")).unwrap()
}

fn token(plane: &Plane, node_id: &str) -> String {
    plane.token(node_id)
}

#[tokio::test]
async fn nodes_only_get_what_they_may_serve() {
    sandbox::require_root().unwrap();
    let plane = tokio::task::spawn_blocking(|| Plane::start(5)).await.unwrap();
    let a_entry = plane.entry("spiffe://example.org/a-only", &["unix:uid:1"], &[]);
    let b_id = "spiffe://example.org/node/b";
    let b_token = token(&plane, b_id);
    let mut b = NodeSession::establish(&agent_config(&plane, "b", &b_token)).await.unwrap();
    assert_eq!(b.node_svid.spiffe_id.to_string(), b_id);
    assert!(b.sync().await.unwrap().is_empty(), "node b sees none of node a's entries");

    // Asking for node a's entry: refused, naming why; nothing is issued.
    let csr = new_key().unwrap().csr_der;
    let err = b.sign(vec![(a_entry.clone(), csr)]).await.unwrap_err().to_string();
    assert!(err.contains("may not request spiffe://example.org/a-only"), "{err}");
    let err = b.mint_jwt(&a_entry, &["aud".into()]).await.unwrap_err().to_string();
    assert!(err.contains("may not request"), "{err}");

    // Its own entry, but one garbage CSR in the batch: the whole batch is refused.
    let own = plane.entry_under(b_id, "spiffe://example.org/b-svc", &["unix:uid:2"], &[]);
    let good = new_key().unwrap().csr_der;
    let err =
        b.sign(vec![(own.clone(), good.clone()), (own.clone(), b"garbage".to_vec())]).await.unwrap_err().to_string();
    assert!(err.contains("CSR is malformed"), "{err}");
    let ok = b.sign(vec![(own.clone(), good)]).await.unwrap();
    assert_eq!(ok.len(), 1);

    // Evicted: the node SVID no longer opens the node API; banned: it cannot attest again.
    plane.cli_ok(&["agent", "evict", "--spiffe-id", b_id, "--ban"]);
    let err = b.sync().await.unwrap_err().to_string();
    assert!(err.contains("not an attested agent"), "{err}");
    let again = token(&plane, b_id);
    let err = NodeSession::establish(&agent_config(&plane, "b2", &again))
        .await
        .err()
        .expect("banned node attested")
        .to_string();
    assert!(err.contains("banned"), "{err}");
}

/// The server dies in the middle of an attestation (between claiming the token and
/// committing): after a restart the token is still unused and nothing of the node exists.
#[tokio::test(flavor = "multi_thread")]
async fn server_killed_mid_attestation_leaves_nothing_half_written() {
    sandbox::require_root().unwrap();
    let mut plane = tokio::task::spawn_blocking(|| Plane::start(5)).await.unwrap();
    let node = "spiffe://example.org/node/crash";
    let tok = token(&plane, node);
    plane.stop_server();
    plane.server_env = vec![("TETHER_FAULT_ATTEST_DELAY_MS".into(), "3000".into())];
    let mut plane = tokio::task::spawn_blocking(move || {
        plane.start_server();
        plane
    })
    .await
    .unwrap();

    let config = agent_config(&plane, "crash", &tok);
    let attempt = tokio::spawn(async move { NodeSession::establish(&config).await.map(|_| ()) });
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await; // inside the transaction now
    assert!(plane.log("server").contains("fault injection active"));
    plane.stop_server(); // SIGKILL
    assert!(attempt.await.unwrap().is_err(), "attestation cannot have completed");

    plane.server_env.clear();
    let plane = tokio::task::spawn_blocking(move || {
        plane.start_server();
        plane
    })
    .await
    .unwrap();
    let agents = plane.cli_ok(&["agent", "list"]);
    assert!(!agents.contains(node), "a half-attested node was stored: {agents}");
    let session =
        NodeSession::establish(&agent_config(&plane, "crash2", &tok)).await.expect("the token is still unused");
    assert_eq!(session.node_svid.spiffe_id.to_string(), node);
}

//! X.509-SVID chains as they arrive: the agent reads `svid_chain` from the server's answers
//! (`split_chain`, `X509Svid::received_at`) and the server reads a node's TLS client
//! certificate for its SPIFFE ID (`api::cert_spiffe_id`). Any bytes: no panic. A chain splits
//! into certificates that concatenate back to the input, and both sides read the same SPIFFE
//! ID from the leaf.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use tether_agent::svid::{split_chain, X509Svid};
use tether_server::api::cert_spiffe_id;

/// `X509Svid` keeps the key it was given; which key does not matter here.
static KEY: LazyLock<KeyPair> = LazyLock::new(|| KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key"));

fuzz_target!(|data: &[u8]| {
    let chain = split_chain(data);
    if let Ok(chain) = &chain {
        assert!(!chain.is_empty());
        assert_eq!(chain.concat(), data, "the split lost or invented bytes");
    }
    let server_view = chain.as_ref().ok().and_then(|c| cert_spiffe_id(&c[0]));
    let received = X509Svid::received_at(&KEY, data, tether_fuzz::SERVER_NOW);
    assert_eq!(received.as_ref().ok().map(|s| &s.spiffe_id), server_view.as_ref(), "agent and server disagree");
    if let Ok(svid) = received {
        // Renewal is due by half life: never after the SVID expires (or arrives, if expired).
        let start = tether_fuzz::SERVER_NOW.max(svid.not_before);
        assert!(svid.renew_after <= svid.not_after.max(start));
        let _ = (svid.chain_pem(), svid.key_pem());
    }
});

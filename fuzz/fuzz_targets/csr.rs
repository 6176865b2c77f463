//! CSRs as the server takes them from nodes and agents (`CaState::sign_x509_svid`: PKCS#10
//! DER in `AttestRequest.csr`, `RenewRequest.csr`, `SignRequest.csrs`). Anything not a CSR
//! whose signature verifies is refused without a panic. A CSR that is signed becomes an SVID
//! that the agent's and the server's own certificate parsers read back as the requested SPIFFE
//! ID, for exactly the key the CSR holds, not a CA, signed by the CA, within the CA's life.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use tether_agent::svid::X509Svid;
use tether_attestors::SpiffeId;
use tether_fuzz::{CA, SERVER_NOW};
use tether_server::{api::cert_spiffe_id, ca::SvidRequest};
use x509_parser::prelude::*;

static WEB: LazyLock<SpiffeId> = LazyLock::new(|| SpiffeId::parse("spiffe://example.org/web").expect("id"));
/// `X509Svid` keeps the key it was given; which key does not matter here.
static KEY: LazyLock<KeyPair> = LazyLock::new(|| KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key"));

fuzz_target!(|data: &[u8]| {
    let dns = ["web.internal".to_owned()];
    let req = SvidRequest { spiffe_id: &WEB, ttl: 3600, dns_names: &dns };
    let Ok(chain) = CA.sign_x509_svid(data, &req, SERVER_NOW) else { return };
    assert_eq!(chain.len(), 1, "no upstream CA: the leaf alone");
    let leaf_der = &chain[0];

    let svid = X509Svid::received_at(&KEY, leaf_der, SERVER_NOW).expect("the agent reads the SVID it was issued");
    assert_eq!(svid.spiffe_id, *WEB);
    assert_eq!(cert_spiffe_id(leaf_der).as_ref(), Some(&*WEB));
    assert!(svid.not_before < SERVER_NOW && svid.not_after <= SERVER_NOW + 3600);

    let (_, leaf) = X509Certificate::from_der(leaf_der).expect("leaf parses");
    let (_, csr) = X509CertificationRequest::from_der(data).expect("a signed CSR parses");
    assert_eq!(
        leaf.public_key().raw,
        csr.certification_request_info.subject_pki.raw,
        "the SVID is not for the CSR's key"
    );
    assert!(!leaf.is_ca());
    let roots = CA.x509_authorities();
    let (_, root) = X509Certificate::from_der(&roots[0]).expect("root parses");
    leaf.verify_signature(Some(root.public_key())).expect("signed by the CA");
    assert!(leaf.validity().not_after <= root.validity().not_after);
});

//! Node API requests as the server's handlers take them (`tether.node.v1`, and the admin API's
//! `Entry`): decoded by prost as tonic does, then through the server's pure checks and the CA.
//!
//! The first byte (mod 7) picks the request type, the rest is its protobuf encoding:
//! - 0 `AttestRequest`: a join token names the node (`join_token::default_node_id`), the CSR
//!   is signed for it; a TPM answer decodes as `tpm.v1.Evidence`.
//! - 1 `RenewRequest`, 2 `SignRequest`: each CSR signed (`CaState::sign_x509_svid`).
//! - 3 `ReattestRequest`: the evidence decodes as `tpm.v1.Evidence`.
//! - 4 `MintJwtRequest`: audiences the handler accepts are minted into a JWT-SVID that the
//!   agent's `validate_jwt` accepts for each of them, naming the entry's SPIFFE ID.
//! - 5 `Entry` (admin CreateEntry/UpdateEntry): `entry_from_proto` then `Entry::validate`;
//!   a valid entry keeps its invariants and round-trips through `entry_to_proto` unchanged.
//! - 6 `BeginAttestationRequest`: a TPM payload decodes as `tpm.v1.Hello` (everything after
//!   that is the `attestation_messages` target).
//!
//! Failures must be errors, never panics.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tether_agent::{identity::Snapshot, svid::now, workload_api::validate_jwt};
use tether_attestors::{join_token, SpiffeId};
use tether_fuzz::{CA, SERVER_NOW, TRUST_DOMAIN};
use tether_proto::{node, tpm};
use tether_server::{
    api::{entry_from_proto, entry_to_proto},
    ca::SvidRequest,
};

static WEB: LazyLock<SpiffeId> = LazyLock::new(|| SpiffeId::parse("spiffe://example.org/web").expect("id"));
static SNAPSHOT: LazyLock<Snapshot> = LazyLock::new(tether_fuzz::agent_snapshot);

/// More CSRs than this in one SignRequest only repeat the work.
const MAX_CSRS: usize = 4;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, msg)) = data.split_first() else { return };
    match kind % 7 {
        0 => attest(msg),
        1 => {
            if let Ok(r) = node::RenewRequest::decode(msg) {
                sign(&r.csr, &WEB);
                if !r.challenge_id.is_empty() {
                    let _ = tpm::Evidence::decode(r.evidence.as_slice());
                }
            }
        }
        2 => {
            if let Ok(r) = node::SignRequest::decode(msg) {
                for csr in r.csrs.iter().take(MAX_CSRS) {
                    sign(&csr.csr, &WEB);
                }
            }
        }
        3 => {
            if let Ok(r) = node::ReattestRequest::decode(msg) {
                let _ = tpm::Evidence::decode(r.evidence.as_slice());
            }
        }
        4 => mint_jwt(msg),
        5 => entry(msg),
        6 => {
            if let Ok(r) = node::BeginAttestationRequest::decode(msg) {
                if r.attestor == "tpm" {
                    let _ = tpm::Hello::decode(r.payload.as_slice());
                }
            }
        }
        _ => unreachable!(),
    }
});

fn sign(csr: &[u8], id: &SpiffeId) {
    let req = SvidRequest { spiffe_id: id, ttl: 3600, dns_names: &[] };
    if let Ok(chain) = CA.sign_x509_svid(csr, &req, SERVER_NOW) {
        assert_eq!(tether_server::api::cert_spiffe_id(&chain[0]).as_ref(), Some(id));
    }
}

fn attest(msg: &[u8]) {
    let Ok(r) = node::AttestRequest::decode(msg) else { return };
    match r.attestor.as_str() {
        join_token::ATTESTOR => {
            // As the handler: a token that is not UTF-8 is refused.
            let Ok(token) = String::from_utf8(r.payload) else { return };
            let id = join_token::default_node_id(TRUST_DOMAIN, &token).expect("a node ID for any token");
            assert_eq!(id.trust_domain(), TRUST_DOMAIN);
            sign(&r.csr, &id);
        }
        "tpm" => {
            let _ = tpm::Evidence::decode(r.payload.as_slice());
        }
        _ => {}
    }
}

fn mint_jwt(msg: &[u8]) {
    let Ok(r) = node::MintJwtRequest::decode(msg) else { return };
    // The handler's own check, before anything is minted.
    if r.audience.is_empty() || r.audience.iter().any(String::is_empty) {
        return;
    }
    let token = CA.mint_jwt(&WEB, &r.audience, 300, now()).expect("minting never fails for a valid request");
    for aud in r.audience.iter().take(4) {
        match validate_jwt(&SNAPSHOT, &token, aud) {
            Ok((sub, _)) => assert_eq!(sub, *WEB),
            Err(e) => panic!("the agent refuses a token the server minted for audience {aud:?}: {e}"),
        }
    }
}

fn entry(msg: &[u8]) {
    let Ok(p) = node::Entry::decode(msg) else { return };
    let Ok(mut e) = entry_from_proto(p) else { return };
    if e.validate(TRUST_DOMAIN).is_err() {
        return;
    }
    assert_eq!(e.spiffe_id.trust_domain(), TRUST_DOMAIN);
    assert!(!e.spiffe_id.is_trust_domain_id());
    assert_eq!(e.parent_id.trust_domain(), TRUST_DOMAIN);
    assert!(!e.selectors.is_empty() && e.selectors.windows(2).all(|w| w[0] < w[1]));
    assert!(e.x509_ttl >= 0 && e.jwt_ttl >= 0);
    // What the store keeps and agents receive reads back as the same entry.
    let mut again = entry_from_proto(entry_to_proto(&e)).expect("a valid entry reads back");
    again.validate(TRUST_DOMAIN).expect("a valid entry stays valid");
    assert_eq!(again, e);
}

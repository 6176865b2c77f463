//! JWT-SVIDs as the agent reads them: `validate_jwt` (ValidateJWTSVID: any local process
//! hands the agent a token string) and `jwt_claims` (the expiry of tokens the server mints).
//!
//! First byte 0: the rest is a token, as a workload sends it; it must be refused (nothing here
//! holds a trust domain key) without a panic. First byte 1: the rest is a JOSE header and
//! claims split at the first NUL, each base64url-encoded as given and signed with a key of the
//! agent's bundle, so the checks after the signature are reached too: a token is accepted only
//! if it is ES256 with a kid of the bundle, for this trust domain's SPIFFE ID, the audience
//! asked for, and not expired.
#![no_main]

use std::sync::LazyLock;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64URL, Engine};
use libfuzzer_sys::fuzz_target;
use ring::{
    rand::SystemRandom,
    signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING},
};
use serde_json::{json, Value};
use tether_agent::{
    identity::{jwt::jwt_claims, Snapshot},
    workload_api::validate_jwt,
};
use tether_attestors::SpiffeId;

/// The agent's view of the trust domain: the fuzz CA's bundle plus one key this target signs
/// with (kid "fuzz").
static SIGNER: LazyLock<EcdsaKeyPair> = LazyLock::new(|| {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("pkcs8");
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).expect("key")
});
static SNAPSHOT: LazyLock<Snapshot> = LazyLock::new(|| {
    let mut snap = tether_fuzz::agent_snapshot();
    let mut jwks: Value = serde_json::from_slice(&snap.bundle.jwks).expect("jwks");
    let point = SIGNER.public_key().as_ref();
    let jwk = json!({"kty": "EC", "crv": "P-256", "use": "jwt-svid", "kid": "fuzz",
                     "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..65])});
    jwks["keys"].as_array_mut().expect("keys").push(jwk);
    snap.bundle.jwks = jwks.to_string().into_bytes();
    snap
});

const AUDIENCE: &str = "db";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode {
        0 => {
            let token = String::from_utf8_lossy(rest);
            let _ = jwt_claims(&token);
            assert!(validate_jwt(&SNAPSHOT, &token, AUDIENCE).is_err(), "a forged token validated");
        }
        1 => {
            let (header, claims) = match rest.iter().position(|&b| b == 0) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            let input = format!("{}.{}", B64URL.encode(header), B64URL.encode(claims));
            let sig = SIGNER.sign(&SystemRandom::new(), input.as_bytes()).expect("sign");
            let token = format!("{input}.{}", B64URL.encode(sig.as_ref()));
            assert_eq!(jwt_claims(&token), serde_json::from_slice::<Value>(claims).ok());
            if let Ok((sub, got)) = validate_jwt(&SNAPSHOT, &token, AUDIENCE) {
                check_accepted(header, claims, &sub, &got);
            }
        }
        _ => {}
    }
});

fn check_accepted(header: &[u8], claims: &[u8], sub: &SpiffeId, got: &Value) {
    let header: Value = serde_json::from_slice(header).expect("accepted header is JSON");
    let claims: Value = serde_json::from_slice(claims).expect("accepted claims are JSON");
    assert_eq!(&claims, got);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], "fuzz");
    if let Some(typ) = header.get("typ") {
        assert!(matches!(typ.as_str(), Some("JWT" | "JOSE")), "accepted typ {typ}");
    }
    assert_eq!(claims["sub"].as_str(), Some(sub.to_string().as_str()));
    assert_eq!(sub.trust_domain(), tether_fuzz::TRUST_DOMAIN);
    let aud_ok = claims["aud"] == AUDIENCE || claims["aud"].as_array().is_some_and(|a| a.iter().any(|x| x == AUDIENCE));
    assert!(aud_ok, "accepted for an audience it does not name");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    assert!(claims["exp"].as_i64().is_some_and(|e| e > now as i64 - 5), "accepted an expired token");
}

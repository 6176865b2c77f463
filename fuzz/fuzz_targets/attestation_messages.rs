//! The attestation messages as they arrive over gRPC (tether.tpm.v1 Hello and Evidence),
//! decoded with prost and fed to everything the server runs on their fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tether_attestors::tpm::{
    credential::make_credential,
    verify::{check_ak_attributes, check_ek_matches_certificate, verify_ek_certificate, AkVerifier, PcrValues},
    wire::Public,
};
use tether_fuzz::{AK_RSA, AK_RSA_NAME, CA_STORE, NOW, QUOTE_RSA_NONCE};
use tether_proto::tpm::{Evidence, Hello};

fuzz_target!(|data: &[u8]| {
    if let Ok(hello) = Hello::decode(data) {
        let ek = Public::parse(&hello.ek_public);
        let cert = verify_ek_certificate(&CA_STORE, &hello.ek_certificate, &hello.ek_intermediates, NOW);
        if let (Ok(ek), Ok(cert)) = (&ek, &cert) {
            let _ = check_ek_matches_certificate(ek, cert);
        }
        if let Ok(ak) = Public::parse(&hello.ak_public) {
            let _ = check_ak_attributes(&ak);
            if let Ok(ek) = &ek {
                let _ = AkVerifier::new(&ak, ek);
                let _ = make_credential(ek, &ak.name(), b"0123456789abcdef");
            }
        }
        if let Ok(ek) = &ek {
            let _ = make_credential(ek, AK_RSA_NAME, b"0123456789abcdef");
        }
    }
    if let Ok(evidence) = Evidence::decode(data) {
        let mut pcrs = PcrValues::new();
        for v in evidence.pcr_values {
            let _ = pcrs.insert_named(&v.bank, v.index, v.value);
        }
        let _ = AK_RSA.verify_quote(&evidence.quote, &evidence.signature, QUOTE_RSA_NONCE, &pcrs);
    }
});

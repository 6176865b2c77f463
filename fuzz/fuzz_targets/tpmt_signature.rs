//! TPMT_SIGNATURE: the quote signature a node sends. Whatever parses re-marshals to the same
//! bytes, and verifying real quotes with it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_attestors::tpm::{
    verify::{PcrValues, VerifyError},
    wire::Signature,
};
use tether_fuzz::{AK_ECC, AK_RSA, QUOTE_ECC, QUOTE_RSA, QUOTE_RSA_NONCE, QUOTE_RSA_SIG};

fuzz_target!(|data: &[u8]| {
    if let Ok(sig) = Signature::parse(data) {
        assert_eq!(sig.marshal().as_deref(), Ok(data));
    }
    // Without PCR values nothing verifies; getting as far as the PCR check means the signature
    // held, which for RSA PKCS#1 v1.5 (deterministic, unique) only the real one does.
    let pcrs = PcrValues::new();
    match AK_RSA.verify_quote(QUOTE_RSA, data, QUOTE_RSA_NONCE, &pcrs) {
        Ok(_) => panic!("a quote verified without its pcr values"),
        Err(VerifyError::PcrValueMissing { .. }) => assert_eq!(data, QUOTE_RSA_SIG),
        Err(_) => {}
    }
    // ECDSA signatures are malleable (s and n - s, leading zeros): only check for panics.
    assert!(AK_ECC.verify_quote(QUOTE_ECC, data, QUOTE_RSA_NONCE, &pcrs).is_err());
});

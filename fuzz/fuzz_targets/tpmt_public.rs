//! TPMT_PUBLIC: the EK and AK public areas a node presents. Whatever parses must re-marshal
//! to the same bytes (the name hashes them), and go through the AK checks and MakeCredential
//! (the server encrypts to this EK) without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_attestors::tpm::{
    credential::make_credential,
    verify::{check_ak_attributes, AkVerifier},
    wire::Public,
};
use tether_fuzz::{AK_RSA_NAME, EK_RSA};

fuzz_target!(|data: &[u8]| {
    let Ok(public) = Public::parse(data) else { return };
    assert_eq!(public.marshal().as_deref(), Ok(data));
    assert_eq!(public.name().len(), 2 + public.name_alg().digest_len());
    let _ = check_ak_attributes(&public);
    let _ = AkVerifier::new(&public, &EK_RSA);
    if let Ok(made) = make_credential(&public, AK_RSA_NAME, b"0123456789abcdef") {
        assert!(!made.credential_blob.is_empty() && !made.encrypted_secret.is_empty());
    }
});

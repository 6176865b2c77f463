//! TPMS_ATTEST: the quote a node sends. Parsing must never panic, and what parses must
//! survive the full verification path against a real AK without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_attestors::tpm::{
    verify::PcrValues,
    wire::{Attest, PcrSelection},
};
use tether_fuzz::{AK_RSA, QUOTE_RSA, QUOTE_RSA_NONCE, QUOTE_RSA_SIG};

fuzz_target!(|data: &[u8]| {
    if let Ok(attest) = Attest::parse(data) {
        // The selection re-marshals to what was parsed.
        let selection = attest.pcr_select.marshal();
        assert_eq!(PcrSelection::parse(&selection).as_ref(), Ok(&attest.pcr_select));
        assert!(attest.pcr_select.iter().count() <= 16 * 64);
    }
    // Only the real quote verifies with the real signature.
    let verified = AK_RSA.verify_quote(data, QUOTE_RSA_SIG, QUOTE_RSA_NONCE, &PcrValues::new());
    assert!(verified.is_err() || data == QUOTE_RSA);
});

//! The TPM verifier against real TPM output: committed fixtures from swtpm (see
//! fixtures/tpm/README.md) and a live private swtpm driven with tpm2-tools.

// Test helpers outside #[test] functions: failing loudly is their job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "tpm_verify/ek_chain.rs"]
mod ek_chain;
#[path = "tpm_verify/live.rs"]
mod live;
#[path = "tpm_verify/swtpm.rs"]
mod swtpm;

use std::path::PathBuf;

use tether_attestors::tpm::{
    verify::{
        check_ak_attributes, check_clock, AkVerifier, ClockProgress, ClockState, PcrValues, QuoteInfo, VerifyError,
    },
    wire::{Attest, Attribute, HashAlg, PcrSelection, Public, Signature, WireError},
};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tpm")
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

pub fn public(name: &str) -> Public {
    Public::parse(&fixture(name)).unwrap()
}

/// `bank:index=hex` lines.
pub fn parse_pcrs(text: &str) -> PcrValues {
    let mut values = PcrValues::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let (bank, rest) = line.split_once(':').unwrap();
        let (index, hex) = rest.split_once('=').unwrap();
        values.insert_named(bank, index.parse().unwrap(), unhex(hex)).unwrap();
    }
    values
}

pub fn unhex(s: &str) -> Vec<u8> {
    tether_attestors::hex::decode(s).unwrap()
}

struct Quote {
    attest: Vec<u8>,
    sig: Vec<u8>,
    nonce: Vec<u8>,
    pcrs: PcrValues,
}

fn quote(name: &str) -> Quote {
    Quote {
        attest: fixture(&format!("{name}.attest")),
        sig: fixture(&format!("{name}.sig")),
        nonce: fixture(&format!("{name}.nonce")),
        pcrs: parse_pcrs(&String::from_utf8(fixture(&format!("{name}.pcrs"))).unwrap()),
    }
}

/// (quote, its AK, the EK the AK was created under)
const QUOTES: [(&str, &str, &str); 3] = [
    ("quote_rsa", "ak_rsa.pub", "ek_rsa.pub"),
    ("quote_pss", "ak_pss.pub", "ek_rsa.pub"),
    ("quote_ecc", "ak_ecc.pub", "ek_ecc.pub"),
];

fn verifier(ak: &str, ek: &str) -> AkVerifier {
    AkVerifier::new(&public(ak), &public(ek)).unwrap()
}

fn verify(v: &AkVerifier, q: &Quote) -> Result<QuoteInfo, VerifyError> {
    v.verify_quote(&q.attest, &q.sig, &q.nonce, &q.pcrs)
}

#[test]
fn publics_parse_round_trip_and_name_like_the_tpm() {
    for name in ["ek_rsa", "ek_ecc", "ak_rsa", "ak_rsa_other", "ak_pss", "ak_ecc"] {
        let bytes = fixture(&format!("{name}.pub"));
        let p = Public::parse(&bytes).unwrap();
        assert_eq!(p.marshal().unwrap(), bytes, "{name}");
        assert_eq!(p.as_bytes(), bytes);
        if name.starts_with("ak") {
            assert_eq!(p.name(), fixture(&format!("{name}.name")), "{name}");
        }
    }
    let ek = public("ek_ecc.pub");
    assert_eq!(ek.name_alg(), HashAlg::Sha384);
    let sym = ek.symmetric().unwrap();
    assert_eq!((sym.key_bits, sym.mode), (256, 0x43));
    assert!(ek.attributes().user_with_auth() && ek.attributes().restricted() && ek.attributes().decrypt());
}

#[test]
fn good_quotes_verify() {
    for (q, ak, ek) in QUOTES {
        let v = verifier(ak, ek);
        let quote = quote(q);
        let info = verify(&v, &quote).unwrap_or_else(|e| panic!("{q}: {e}"));
        assert!(info.selection.same_pcrs(&quote.pcrs.selection().unwrap()), "{q}");
        assert!(info.clock > 0 && info.safe, "{q}: {info:?}");
        // The signer is the AK's qualified name under its EK, as the TPM computed it.
        assert_eq!(Attest::parse(&quote.attest).unwrap().qualified_signer, v.qualified_name());
        // The free function does the same.
        tether_attestors::tpm::verify::verify_quote(
            &public(ak),
            &public(ek),
            &quote.attest,
            &quote.sig,
            &quote.nonce,
            &quote.pcrs,
        )
        .unwrap();
    }
}

#[test]
fn quote_selection_keeps_bank_order() {
    let attest = Attest::parse(&quote("quote_ecc").attest).unwrap();
    let order: Vec<_> = attest.pcr_select.iter().collect();
    assert_eq!(order, [(HashAlg::Sha1, 7), (HashAlg::Sha256, 1), (HashAlg::Sha256, 7)]);
}

#[test]
fn altered_signature_is_refused() {
    for (q, ak, ek) in QUOTES {
        let v = verifier(ak, ek);
        let good = quote(q);
        // Every byte of the signature value (after the algorithm, hash and size fields).
        for i in 6..good.sig.len() {
            let mut bad = quote(q);
            bad.sig[i] ^= 0x01;
            match verify(&v, &bad) {
                Err(VerifyError::SignatureInvalid) => {}
                // ECDSA: flipping a TPM2B size byte breaks the structure instead.
                Err(VerifyError::Wire(_)) if ak == "ak_ecc.pub" => {}
                other => panic!("{q} byte {i}: {other:?}"),
            }
        }
    }
}

#[test]
fn altered_quote_is_refused() {
    let v = verifier("ak_rsa.pub", "ek_rsa.pub");
    let good = quote("quote_rsa");
    for i in 0..good.attest.len() {
        let mut bad = quote("quote_rsa");
        bad.attest[i] ^= 0x80;
        let err = verify(&v, &bad).unwrap_err();
        match i {
            0..=3 => assert!(matches!(err, VerifyError::Wire(WireError::WrongMagic { .. })), "{i}: {err}"),
            4..=5 => assert!(matches!(err, VerifyError::Wire(WireError::WrongType { .. })), "{i}: {err}"),
            _ => assert!(matches!(err, VerifyError::SignatureInvalid | VerifyError::Wire(_)), "{i}: {err}"),
        }
    }
}

#[test]
fn quote_by_another_key_is_refused() {
    let q = quote("quote_rsa");
    let other = verifier("ak_rsa_other.pub", "ek_rsa.pub");
    assert!(matches!(verify(&other, &q), Err(VerifyError::SignatureInvalid)));
    // Another scheme than the AK's: a restricted key never signs that way.
    let pss = verifier("ak_pss.pub", "ek_rsa.pub");
    assert!(matches!(verify(&pss, &q), Err(VerifyError::SignatureSchemeMismatch { .. })), "{:?}", verify(&pss, &q));
    let ecc = verifier("ak_ecc.pub", "ek_ecc.pub");
    assert!(matches!(verify(&ecc, &q), Err(VerifyError::SignatureSchemeMismatch { .. })));
}

#[test]
fn signer_must_be_the_ak_under_its_ek() {
    // The right AK, but assumed to be under the other EK: the qualified name differs.
    let v = AkVerifier::new(&public("ak_rsa.pub"), &public("ek_ecc.pub")).unwrap();
    assert!(matches!(verify(&v, &quote("quote_rsa")), Err(VerifyError::SignerMismatch { .. })));
    let v = AkVerifier::with_qualified_name(&public("ak_rsa.pub"), fixture("ak_rsa.name")).unwrap();
    assert!(matches!(verify(&v, &quote("quote_rsa")), Err(VerifyError::SignerMismatch { .. })));
}

#[test]
fn wrong_nonce_is_refused() {
    let v = verifier("ak_rsa.pub", "ek_rsa.pub");
    let mut q = quote("quote_rsa");
    q.nonce[0] ^= 1;
    assert!(matches!(verify(&v, &q), Err(VerifyError::NonceMismatch)));
    q.nonce.clear();
    assert!(matches!(verify(&v, &q), Err(VerifyError::NonceMismatch)));
}

#[test]
fn pcr_values_must_be_exactly_the_quoted_ones() {
    let v = verifier("ak_rsa.pub", "ek_rsa.pub");
    let good = quote("quote_rsa");
    let text = String::from_utf8(fixture("quote_rsa.pcrs")).unwrap();

    // A changed value.
    for (i, line) in text.lines().enumerate() {
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let last = line.len() - 1;
        let flipped = if &line[last..] == "0" { "1" } else { "0" };
        lines[i] = format!("{}{flipped}", &line[..last]);
        let q = Quote { pcrs: parse_pcrs(&lines.join("\n")), ..quote("quote_rsa") };
        assert!(matches!(verify(&v, &q), Err(VerifyError::PcrDigestMismatch)), "line {i}");
    }
    // A missing value.
    let fewer: Vec<&str> = text.lines().skip(1).collect();
    let q = Quote { pcrs: parse_pcrs(&fewer.join("\n")), ..quote("quote_rsa") };
    assert!(matches!(verify(&v, &q), Err(VerifyError::PcrValueMissing { bank: HashAlg::Sha256, index: 0 })));
    // An extra value the quote does not cover.
    let mut extra = good.pcrs.clone();
    extra.insert(HashAlg::Sha256, 10, vec![0; 32]).unwrap();
    let q = Quote { pcrs: extra, ..quote("quote_rsa") };
    assert!(matches!(verify(&v, &q), Err(VerifyError::PcrValueNotQuoted { bank: HashAlg::Sha256, index: 10 })));
    // Values of the wrong size never get that far.
    let mut values = PcrValues::new();
    assert!(matches!(values.insert(HashAlg::Sha1, 0, vec![0; 32]), Err(VerifyError::PcrValueLength { .. })));
    assert!(matches!(values.insert_named("md5", 0, vec![0; 16]), Err(VerifyError::PcrBankUnknown { .. })));
    assert!(matches!(values.insert_named("sha1", 300, vec![0; 20]), Err(VerifyError::PcrIndex { .. })));
    values.insert(HashAlg::Sha1, 0, vec![0; 20]).unwrap();
    assert!(matches!(values.insert(HashAlg::Sha1, 0, vec![0; 20]), Err(VerifyError::PcrValueDuplicate { .. })));
}

#[test]
fn truncated_structures_error_at_every_length() {
    let v = verifier("ak_rsa.pub", "ek_rsa.pub");
    let q = quote("quote_rsa");
    for len in 0..q.attest.len() {
        let err = v.verify_quote(&q.attest[..len], &q.sig, &q.nonce, &q.pcrs).unwrap_err();
        assert!(
            matches!(err, VerifyError::Wire(WireError::Truncated { structure: "tpms_attest", .. })),
            "{len}: {err}"
        );
    }
    for len in 0..q.sig.len() {
        let err = v.verify_quote(&q.attest, &q.sig[..len], &q.nonce, &q.pcrs).unwrap_err();
        assert!(matches!(err, VerifyError::Wire(WireError::Truncated { structure: "tpmt_signature", .. })), "{len}");
    }
    for name in ["ek_rsa.pub", "ek_ecc.pub", "ak_rsa.pub", "ak_ecc.pub"] {
        let bytes = fixture(name);
        for len in 0..bytes.len() {
            assert!(matches!(Public::parse(&bytes[..len]), Err(WireError::Truncated { .. })), "{name} {len}");
        }
    }
    let mut long = q.attest.clone();
    long.push(0);
    assert!(matches!(
        v.verify_quote(&long, &q.sig, &q.nonce, &q.pcrs),
        Err(VerifyError::Wire(WireError::TrailingBytes { extra: 1, .. }))
    ));
}

#[test]
fn garbage_never_panics() {
    let v = verifier("ak_ecc.pub", "ek_ecc.pub");
    let q = quote("quote_ecc");
    // A cheap deterministic generator: the point is variety, not quality.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..2000 {
        let len = (next() % 300) as usize;
        let mut junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if round % 2 == 0 && junk.len() >= 6 {
            // Past the magic and type, into the deeper fields.
            junk[..6].copy_from_slice(&q.attest[..6]);
        }
        assert!(v.verify_quote(&junk, &q.sig, &q.nonce, &q.pcrs).is_err());
        assert!(v.verify_quote(&q.attest, &junk, &q.nonce, &q.pcrs).is_err());
        let _ = Public::parse(&junk);
        let _ = Signature::parse(&junk);
        let _ = PcrSelection::parse(&junk);
    }
}

/// Rewrites an AK public area's attributes (bytes 4..8 of a TPMT_PUBLIC).
fn with_attributes(bytes: &[u8], set: u32, clear: u32) -> Public {
    let mut b = bytes.to_vec();
    let attrs = (u32::from_be_bytes([b[4], b[5], b[6], b[7]]) | set) & !clear;
    b[4..8].copy_from_slice(&attrs.to_be_bytes());
    Public::parse(&b).unwrap()
}

#[test]
fn ak_attributes_are_checked_one_by_one() {
    let ak = fixture("ak_rsa.pub");
    check_ak_attributes(&Public::parse(&ak).unwrap()).unwrap();
    for attribute in [
        Attribute::FixedTpm,
        Attribute::FixedParent,
        Attribute::SensitiveDataOrigin,
        Attribute::Restricted,
        Attribute::Sign,
    ] {
        let err = check_ak_attributes(&with_attributes(&ak, 0, attribute.bit())).unwrap_err();
        assert!(matches!(err, VerifyError::AkAttribute { attribute: a, required: true } if a == attribute), "{err}");
        assert!(err.to_string().contains(attribute.name()));
    }
    let err = check_ak_attributes(&with_attributes(&ak, Attribute::Decrypt.bit(), 0)).unwrap_err();
    assert!(matches!(err, VerifyError::AkAttribute { attribute: Attribute::Decrypt, required: false }));
    assert_eq!(err.to_string(), "ak attribute decrypt must be clear");
    // An EK is no AK.
    assert!(matches!(
        check_ak_attributes(&public("ek_rsa.pub")),
        Err(VerifyError::AkAttribute { attribute: Attribute::Sign, required: true })
    ));
    // AkVerifier refuses what check_ak_attributes refuses.
    assert!(AkVerifier::new(&with_attributes(&ak, 0, Attribute::Restricted.bit()), &public("ek_rsa.pub")).is_err());
}

#[test]
fn ak_key_and_scheme_are_checked() {
    // ak_rsa: type, nameAlg, attributes, empty authPolicy, NULL symmetric, then the scheme
    // (0x0014, hash) at 12..16 and keyBits at 16..18.
    let ak = fixture("ak_rsa.pub");
    assert_eq!(&ak[12..18], &[0x00, 0x14, 0x00, 0x0b, 0x08, 0x00]);
    let mut sha384 = ak.clone();
    sha384[14..16].copy_from_slice(&[0x00, 0x0c]);
    assert!(matches!(
        check_ak_attributes(&Public::parse(&sha384).unwrap()),
        Err(VerifyError::AkSchemeUnsupported { found }) if found == "rsassa-sha384"
    ));
    let mut null_scheme = ak[..12].to_vec();
    null_scheme.extend_from_slice(&[0x00, 0x10]);
    null_scheme.extend_from_slice(&ak[16..]);
    assert!(matches!(
        check_ak_attributes(&Public::parse(&null_scheme).unwrap()),
        Err(VerifyError::AkSchemeUnsupported { found }) if found == "null"
    ));
    let mut rsa3072 = ak.clone();
    rsa3072[16..18].copy_from_slice(&3072u16.to_be_bytes());
    assert!(matches!(
        check_ak_attributes(&Public::parse(&rsa3072).unwrap()),
        Err(VerifyError::AkKeyUnsupported { .. })
    ));
}

#[test]
fn make_credential_shapes_and_refusals() {
    use tether_attestors::tpm::credential::{make_credential, CredentialError};
    let name = fixture("ak_rsa.name");
    let rsa = make_credential(&public("ek_rsa.pub"), &name, b"0123456789abcdef").unwrap();
    // TPM2B_DIGEST(SHA-256 HMAC) || AES-CFB(u16 size || secret); an RSA-2048 OAEP block.
    assert_eq!(rsa.credential_blob.len(), 2 + 32 + 2 + 16);
    assert_eq!(rsa.encrypted_secret.len(), 256);
    // Fresh randomness every time.
    assert_ne!(make_credential(&public("ek_rsa.pub"), &name, b"0123456789abcdef").unwrap(), rsa);
    let ecc = make_credential(&public("ek_ecc.pub"), &name, &[7; 48]).unwrap();
    assert_eq!(ecc.credential_blob.len(), 2 + 48 + 2 + 48);
    // TPMS_ECC_POINT of a P-384 ephemeral key.
    assert_eq!(ecc.encrypted_secret.len(), 2 + 48 + 2 + 48);
    assert_eq!(&ecc.encrypted_secret[..2], &[0, 48]);

    assert!(matches!(
        make_credential(&public("ak_rsa.pub"), &name, b"s"),
        Err(CredentialError::EkNotStorageKey { .. })
    ));
    assert!(matches!(
        make_credential(&public("ek_rsa.pub"), &name, &[0; 33]),
        Err(CredentialError::SecretSize { len: 33, max: 32 })
    ));
    assert!(matches!(make_credential(&public("ek_rsa.pub"), &name, b""), Err(CredentialError::SecretSize { .. })));
    assert!(matches!(
        make_credential(&public("ek_rsa.pub"), &name[..10], b"s"),
        Err(CredentialError::AkNameInvalid { len: 10 })
    ));
}

fn info(reset_count: u32, restart_count: u32, clock: u64) -> QuoteInfo {
    QuoteInfo { clock, reset_count, restart_count, safe: true, firmware_version: 0, selection: PcrSelection::new() }
}

#[test]
fn clock_must_move_forward() {
    let previous = ClockState::from(&info(5, 2, 1000));
    assert_eq!(check_clock(&previous, &info(5, 2, 1001)).unwrap(), ClockProgress::Advanced);
    assert_eq!(check_clock(&previous, &info(5, 3, 10)).unwrap(), ClockProgress::Resumed);
    assert_eq!(check_clock(&previous, &info(6, 0, 10)).unwrap(), ClockProgress::Rebooted);
    assert!(matches!(
        check_clock(&previous, &info(4, 9, 99999)),
        Err(VerifyError::ClockResetCountDecreased { previous: 5, current: 4 })
    ));
    assert!(matches!(check_clock(&previous, &info(5, 1, 99999)), Err(VerifyError::ClockRestartCountDecreased { .. })));
    assert!(matches!(check_clock(&previous, &info(5, 2, 1000)), Err(VerifyError::ClockNotAdvanced { .. })));
    assert!(matches!(check_clock(&previous, &info(5, 2, 999)), Err(VerifyError::ClockNotAdvanced { .. })));
}

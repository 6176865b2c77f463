//! The agent's TPM client against a private swtpm: EKs and certificates, the persistent AK,
//! quotes, PCR extends. (The verifier's side of the same flows is in tpm_attestation.rs.)

use sandbox::swtpm::Swtpm;
use tether_attestors::tpm::device::{Device, EkAlgorithm};

#[test]
fn endorsement_keys_and_their_certificates() {
    let tpm = Swtpm::start();
    let mut dev = Device::open(&tpm.tcti()).unwrap();
    let (vendor, software) = dev.vendor().unwrap();
    assert!(software, "swtpm must be recognised as a software TPM ({vendor})");
    for alg in [EkAlgorithm::Rsa, EkAlgorithm::Ecc] {
        let ek = dev.endorsement(alg).unwrap();
        assert_eq!(ek.certificate[0], 0x30, "{alg:?}: DER certificate");
        assert!(ek.public.len() > 64, "{alg:?}: TPMT_PUBLIC");
    }
}

#[test]
fn the_attestation_key_is_created_once_and_reused() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let mut dev = Device::open(&tpm.tcti()).unwrap();
        let ek = dev.endorsement(EkAlgorithm::Rsa).unwrap();
        let ak = dev.attestation_key(&ek, dir.path()).unwrap();
        assert!(ak.created);
        ak.public.clone()
    };
    // A restarted agent (new context) loads the same key instead of generating one.
    let mut dev = Device::open(&tpm.tcti()).unwrap();
    let ek = dev.endorsement(EkAlgorithm::Rsa).unwrap();
    let ak = dev.attestation_key(&ek, dir.path()).unwrap();
    assert!(!ak.created, "the AK must persist across restarts");
    assert_eq!(ak.public, first);
}

#[test]
fn quotes_cover_the_values_read_and_follow_extends() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let mut dev = Device::open(&tpm.tcti()).unwrap();
    let ek = dev.endorsement(EkAlgorithm::Ecc).unwrap();
    let ak = dev.attestation_key(&ek, dir.path()).unwrap();
    let q = dev.quote(&ak, b"nonce-0123456789", "sha256", &[7, 0, 1]).unwrap();
    assert_eq!(q.pcrs.iter().map(|p| p.1).collect::<Vec<_>>(), vec![0, 1, 7]);
    assert!(q.pcrs.iter().all(|p| p.2 == vec![0u8; 32]), "swtpm PCRs start at zero");
    dev.extend("sha256", 7, &[0xab; 32]).unwrap();
    let after = dev.read_pcrs("sha256", &[7]).unwrap();
    assert_ne!(after[0].2, vec![0u8; 32]);
}

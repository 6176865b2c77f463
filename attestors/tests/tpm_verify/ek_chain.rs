//! EK certificate chains: swtpm's real ones, and chains built with rcgen for the cases a
//! manufacturer CA would not produce.

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tether_attestors::tpm::verify::{
    check_ek_matches_certificate, verify_ek_certificate, EkCaStore, EkCertKey, VerifyError,
};

use super::{fixture, fixtures, public};

fn now() -> i64 {
    String::from_utf8(fixture("generated-at")).unwrap().trim().parse::<i64>().unwrap() + 60
}

fn pem_der(name: &str) -> Vec<u8> {
    let pem = fixture(name);
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    pem.contents
}

#[test]
fn swtpm_ek_certificates_chain_to_the_manufacturer_ca() {
    let store = EkCaStore::load_dir(fixtures().join("ca")).unwrap();
    assert_eq!(store.len(), 2);
    for kind in ["rsa", "ecc"] {
        let der = fixture(&format!("ek_{kind}.crt"));
        let cert = verify_ek_certificate(&store, &der, &[], now()).unwrap();
        assert_eq!(cert.subject, "CN=unknown");
        assert_eq!(cert.leaf_issuer, "CN=swtpm-localca");
        // The intermediate is itself trusted: the chain ends there.
        assert_eq!(cert.anchor_subject, "CN=swtpm-localca");
        assert_eq!(cert.tpm_manufacturer.as_deref(), Some("id:00001014"));
        assert_eq!(cert.tpm_model.as_deref(), Some("swtpm"));
        assert_eq!(cert.sha256.as_slice(), ring::digest::digest(&ring::digest::SHA256, &der).as_ref());
        check_ek_matches_certificate(&public(&format!("ek_{kind}.pub")), &cert).unwrap();
        // NV indices may be larger than the certificate: zero padding is fine, junk is not.
        let mut padded = der.clone();
        padded.extend_from_slice(&[0; 24]);
        assert_eq!(verify_ek_certificate(&store, &padded, &[], now()).unwrap().sha256, cert.sha256);
        padded.push(1);
        assert!(matches!(
            verify_ek_certificate(&store, &padded, &[], now()),
            Err(VerifyError::EkCertificateMalformed { .. })
        ));
    }
    let rsa = verify_ek_certificate(&store, &fixture("ek_rsa.crt"), &[], now()).unwrap();
    assert!(matches!(rsa.public_key, EkCertKey::Rsa { .. }));
    assert!(matches!(
        check_ek_matches_certificate(&public("ek_ecc.pub"), &rsa),
        Err(VerifyError::EkCertificateMismatch)
    ));
    let ecc = verify_ek_certificate(&store, &fixture("ek_ecc.crt"), &[], now()).unwrap();
    assert!(matches!(
        check_ek_matches_certificate(&public("ek_rsa.pub"), &ecc),
        Err(VerifyError::EkCertificateMismatch)
    ));
}

#[test]
fn intermediates_from_the_node_lead_to_a_trusted_root() {
    let root_only = EkCaStore::from_ders([pem_der("ca/root.pem")]).unwrap();
    let leaf = fixture("ek_rsa.crt");
    assert!(matches!(
        verify_ek_certificate(&root_only, &leaf, &[], now()),
        Err(VerifyError::UnknownEkCa { issuer }) if issuer == "CN=swtpm-localca"
    ));
    let cert = verify_ek_certificate(&root_only, &leaf, &[pem_der("ca/intermediate.pem")], now()).unwrap();
    assert_eq!(cert.anchor_subject, "CN=swtpm-localca-rootca");
    // Unrelated or repeated intermediates do not confuse the search.
    let noise = vec![fixture("ek_ecc.crt"), pem_der("ca/root.pem"), pem_der("ca/intermediate.pem")];
    verify_ek_certificate(&root_only, &leaf, &noise, now()).unwrap();
    // Hostile input: malformed intermediates are named by position, too many are refused.
    assert!(matches!(
        verify_ek_certificate(&root_only, &leaf, &[vec![0x30, 0x03, 1, 2, 3]], now()),
        Err(VerifyError::IntermediateMalformed { index: 0, .. })
    ));
    assert!(matches!(
        verify_ek_certificate(&root_only, &leaf, &vec![pem_der("ca/intermediate.pem"); 9], now()),
        Err(VerifyError::ChainTooLong { .. })
    ));
}

#[test]
fn validity_and_tampering() {
    let store = EkCaStore::load_dir(fixtures().join("ca")).unwrap();
    let leaf = fixture("ek_rsa.crt");
    assert!(matches!(
        verify_ek_certificate(&store, &leaf, &[], now() - 3 * 86400),
        Err(VerifyError::CertificateNotYetValid { .. })
    ));
    // swtpm's certificates run to 9999-12-31.
    assert!(matches!(
        verify_ek_certificate(&store, &leaf, &[], 253_402_300_800),
        Err(VerifyError::CertificateExpired { .. })
    ));
    let mut tampered = leaf.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(matches!(
        verify_ek_certificate(&store, &tampered, &[], now()),
        Err(VerifyError::CertificateSignature { subject }) if subject == "CN=unknown"
    ));
    for len in 0..leaf.len() {
        assert!(verify_ek_certificate(&store, &leaf[..len], &[], now()).is_err(), "{len}");
    }
}

#[test]
fn ca_store_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(EkCaStore::load_dir(dir.path()), Err(VerifyError::CaStoreEmpty { .. })));
    std::fs::write(dir.path().join("root.der"), pem_der("ca/root.pem")).unwrap();
    assert_eq!(EkCaStore::load_dir(dir.path()).unwrap().len(), 1);
    std::fs::write(dir.path().join("junk.pem"), "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        .unwrap();
    let err = EkCaStore::load_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("junk.pem"), "{err}");
    std::fs::remove_file(dir.path().join("junk.pem")).unwrap();
    // A leaf is not a CA.
    std::fs::write(dir.path().join("leaf.der"), fixture("ek_rsa.crt")).unwrap();
    let err = EkCaStore::load_dir(dir.path()).unwrap_err();
    assert!(matches!(&err, VerifyError::CaCertificate { origin, .. } if origin.ends_with("leaf.der")), "{err}");
    assert!(matches!(EkCaStore::load_dir(dir.path().join("missing")), Err(VerifyError::CaFile { .. })));
}

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    der: Vec<u8>,
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn ca(cn: &str, constraints: Option<BasicConstraints>, issuer: Option<&Ca>) -> Ca {
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.distinguished_name = name(cn);
    params.is_ca = constraints.map_or(IsCa::ExplicitNoCa, IsCa::Ca);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let key = KeyPair::generate().unwrap();
    let der = match issuer {
        None => params.self_signed(&key).unwrap().der().to_vec(),
        Some(i) => params.signed_by(&key, &Issuer::from_params(&i.params, &i.key)).unwrap().der().to_vec(),
    };
    Ca { params, key, der }
}

fn leaf(issuer: &Ca, critical: Option<&[u64]>) -> Vec<u8> {
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.distinguished_name = name("ek");
    if let Some(oid) = critical {
        let mut ext = CustomExtension::from_oid_content(oid, vec![0x05, 0x00]);
        ext.set_criticality(true);
        params.custom_extensions.push(ext);
    }
    let key = KeyPair::generate().unwrap();
    params.signed_by(&key, &Issuer::from_params(&issuer.params, &issuer.key)).unwrap().der().to_vec()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[test]
fn issuers_must_be_cas_within_their_path_length() {
    let root = ca("root", Some(BasicConstraints::Constrained(0)), None);
    let store = EkCaStore::from_ders([&root.der]).unwrap();
    // Directly under the root: fine, and an EC P-256 EK certificate parses.
    let cert = verify_ek_certificate(&store, &leaf(&root, None), &[], unix_now()).unwrap();
    assert!(matches!(cert.public_key, EkCertKey::Ecc { .. }));
    // An intermediate under a root with pathLen 0.
    let mid = ca("mid", Some(BasicConstraints::Unconstrained), Some(&root));
    let err = verify_ek_certificate(&store, &leaf(&mid, None), std::slice::from_ref(&mid.der), unix_now()).unwrap_err();
    assert!(
        matches!(err, VerifyError::IssuerNotCa { ref subject, reason } if subject == "CN=root" && reason.contains("pathLen")),
        "{err}"
    );
    // A non-CA "intermediate" that signed the leaf.
    let root = ca("root", Some(BasicConstraints::Unconstrained), None);
    let store = EkCaStore::from_ders([&root.der]).unwrap();
    let not_ca = ca("not-a-ca", None, Some(&root));
    let err =
        verify_ek_certificate(&store, &leaf(&not_ca, None), std::slice::from_ref(&not_ca.der), unix_now()).unwrap_err();
    assert!(matches!(err, VerifyError::IssuerNotCa { ref subject, .. } if subject == "CN=not-a-ca"), "{err}");
    // Both succeed when the issuer is a proper CA.
    let mid = ca("mid", Some(BasicConstraints::Unconstrained), Some(&root));
    verify_ek_certificate(&store, &leaf(&mid, None), std::slice::from_ref(&mid.der), unix_now()).unwrap();
}

#[test]
fn unknown_critical_extensions_are_refused() {
    let root = ca("root", Some(BasicConstraints::Unconstrained), None);
    let store = EkCaStore::from_ders([&root.der]).unwrap();
    let err =
        verify_ek_certificate(&store, &leaf(&root, Some(&[1, 3, 6, 1, 4, 1, 99999, 1])), &[], unix_now()).unwrap_err();
    assert!(
        matches!(err, VerifyError::UnhandledCriticalExtension { ref oid, .. } if oid == "1.3.6.1.4.1.99999.1"),
        "{err}"
    );
}

#[test]
fn ca_store_from_a_pem_bundle() {
    let bundle = [fixture("ca/root.pem"), fixture("ca/intermediate.pem")].concat();
    let store = EkCaStore::from_pem(&bundle).unwrap();
    assert_eq!(store.len(), 2);
    verify_ek_certificate(&store, &fixture("ek_ecc.crt"), &[], now()).unwrap();
    assert!(matches!(EkCaStore::from_pem(b"not pem"), Err(VerifyError::CaCertificate { .. })));
}

#[test]
fn pem_after_explanatory_text_loads() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = b"Certificate:\n    Subject: CN=swtpm-localca-rootca\n".to_vec();
    text.extend_from_slice(&fixture("ca/root.pem"));
    std::fs::write(dir.path().join("root.crt"), text).unwrap();
    assert_eq!(EkCaStore::load_dir(dir.path()).unwrap().len(), 1);
}
